"""Sealing values at rest with AES-GCM under the broker's master key, and that key's keeping.

Owns: the master key (256 bits, created on first use, kept base64 in the secret store under
`store:master_key`), the sealed format (key id byte, 96-bit random nonce, ciphertext and tag),
the associated data binding a sealed value to its place (a grant's route, client and user; a
connect state's id), and the key check that tells a lost or replaced key from a damaged row.
Must never: write the key anywhere but the secret store, or put a key, a plaintext or a sealed
value into an exception or a log event. Calls block (the secret store): engines run them off
the event loop.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.auth.secret_store import SecretStore, SecretStoreError, resolve
from broker.config import SecretRef
from broker.store.base import StoreError

MASTER_KEY_ACCOUNT = "store:master_key"
KEY_ID = 1  # the id sealed with today's key; a rotation adds keys under new ids and reseals
NONCE_BYTES = 12
_DOMAIN = b"agentcard-broker/store"
_KEY_CHECK_PLAINTEXT = b"agentcard-broker master key check"


class SealBroken(StoreError):
    """A sealed value does not open here: altered, moved to another place, or another key's."""


class MasterKeyError(StoreError):
    """The master key is missing, unreadable, or not the one the stored data was sealed with."""


def grant_place(route: str, client: str, user: str) -> tuple[str, ...]:
    return ("grant", route, client, user)


def connect_place(connect_id: str) -> tuple[str, ...]:
    return ("connect", connect_id)


def doc_place(name: str) -> tuple[str, ...]:
    return ("doc", name)


_KEY_CHECK_PLACE = ("key-check",)


def _associated_data(key_id: int, place: tuple[str, ...]) -> bytes:
    # each part length-prefixed: ("a", "bc") and ("ab", "c") must not bind alike
    parts = [_DOMAIN, bytes([key_id])]
    for p in place:
        raw = p.encode("utf-8")
        parts.append(struct.pack(">I", len(raw)) + raw)
    return b"".join(parts)


class Sealer:
    """AES-GCM under the master key(s). `seal` uses the current key; `open` the blob's own key id."""

    def __init__(self, keys: Mapping[int, bytes], current: int = KEY_ID) -> None:
        self._aead = {kid: AESGCM(key) for kid, key in keys.items()}
        self._current = current

    def __repr__(self) -> str:
        return f"Sealer(key ids {sorted(self._aead)}, current {self._current})"

    def seal(self, plaintext: bytes, place: tuple[str, ...]) -> bytes:
        nonce = os.urandom(NONCE_BYTES)  # random per seal: safe for 2^32 seals per key (SP 800-38D)
        ct = self._aead[self._current].encrypt(nonce, plaintext, _associated_data(self._current, place))
        return bytes([self._current]) + nonce + ct

    def open(self, sealed: bytes, place: tuple[str, ...]) -> bytes:
        if len(sealed) < 1 + NONCE_BYTES + 16:
            raise SealBroken("the sealed value is truncated")
        key_id = sealed[0]
        aead = self._aead.get(key_id)
        if aead is None:
            raise SealBroken(f"the value was sealed with key id {key_id}, which this broker does not have")
        nonce, ct = sealed[1 : 1 + NONCE_BYTES], sealed[1 + NONCE_BYTES :]
        try:
            return aead.decrypt(nonce, ct, _associated_data(key_id, place))
        except InvalidTag:
            raise SealBroken(
                "the value does not open: altered, moved from another place, or sealed with another key"
            ) from None

    def key_check(self) -> bytes:
        """A sealed constant stored beside the data: the next start knows whether its key is the same."""
        return self.seal(_KEY_CHECK_PLAINTEXT, _KEY_CHECK_PLACE)

    def matches(self, stored_check: bytes) -> bool:
        """Was `stored_check` made by this sealer's key?"""
        try:
            self.open(stored_check, _KEY_CHECK_PLACE)
        except SealBroken:
            return False
        return True


@dataclass(frozen=True, slots=True)
class Unlocked:
    sealer: Sealer
    new_check: bytes | None  # a key check to store: the data had none yet


def _where(secrets: SecretStore) -> str:
    # only for errors: a keyring's description probes its backends (tens of ms at every start)
    return f"account {MASTER_KEY_ACCOUNT!r} in {secrets.description}"


def _parse_key(raw: str, where: str) -> bytes:
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise MasterKeyError(f"the master key ({where}) is not a base64 256-bit key")
    return key


def unlock(
    secrets: SecretStore, stored_check: bytes | None, data_place: str, given: SecretRef | None = None
) -> Unlocked:
    """The sealer for data at `data_place` (a file, a Redis URL) whose key check is `stored_check`.

    The key is `given` (an `env:` or `file:` reference: replicas on several machines share one
    key that way; never created here) or else the secret store's `store:master_key`. A missing key
    is created only when the data has no key check yet: a new key beside data sealed with a lost
    one would hide the loss until every user failed one by one."""
    afresh = f"restore that key, or move {data_place} aside and every user connects again"
    if given is not None and given.kind != "keyring":
        found = resolve(given, MASTER_KEY_ACCOUNT, secrets)
        if found.value is None:
            raise MasterKeyError(
                f"the master key ({given.describe()}) cannot be read: {found.reason}; every replica "
                "needs the same key: make one once with `openssl rand -base64 32`"
            )
        sealer = Sealer({KEY_ID: _parse_key(found.value, given.describe())})
        if stored_check is not None and not sealer.matches(stored_check):
            raise MasterKeyError(
                f"the master key ({given.describe()}) is not the one {data_place} was sealed with: {afresh}"
            )
        return Unlocked(sealer, sealer.key_check() if stored_check is None else None)
    try:
        raw = secrets.get(MASTER_KEY_ACCOUNT)
    except SecretStoreError as exc:
        raise MasterKeyError(f"the master key cannot be read: {exc}") from None
    if raw is None:
        if stored_check is not None:
            raise MasterKeyError(
                f"the master key ({_where(secrets)}) is missing, but {data_place} holds data sealed "
                f"with one: {afresh}"
            )
        key = AESGCM.generate_key(bit_length=256)
        try:
            secrets.set(MASTER_KEY_ACCOUNT, base64.b64encode(key).decode("ascii"))
        except SecretStoreError as exc:
            raise MasterKeyError(f"the master key cannot be stored: {exc}") from None
        sealer = Sealer({KEY_ID: key})
        return Unlocked(sealer, sealer.key_check())
    sealer = Sealer({KEY_ID: _parse_key(raw, _where(secrets))})
    if stored_check is None:
        return Unlocked(sealer, sealer.key_check())
    try:
        sealer.open(stored_check, _KEY_CHECK_PLACE)
    except SealBroken:
        raise MasterKeyError(
            f"the master key ({_where(secrets)}) is not the one {data_place} was sealed with: {afresh}"
        ) from None
    return Unlocked(sealer, None)
