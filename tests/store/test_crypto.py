"""broker/store/crypto.py: AES-GCM sealing bound to its place, and the master key's keeping."""

from __future__ import annotations

import base64

import keyring
import pytest

from broker.auth.secret_store import SERVICE, KeyringStore
from broker.store.crypto import (
    MASTER_KEY_ACCOUNT,
    NONCE_BYTES,
    MasterKeyError,
    SealBroken,
    Sealer,
    connect_place,
    grant_place,
    unlock,
)

AT = "at_FAKEaccess0123456789abcdefABCDEF"
TOKENS = f'{{"access_token": "{AT}", "refresh_token": "rt_FAKE0123456789"}}'
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def test_seal_opens_at_its_place_only() -> None:
    sealer = Sealer({1: KEY})
    place = grant_place("mcp", "librechat", "alice")
    sealed = sealer.seal(TOKENS.encode(), place)
    assert sealed[0] == 1  # the key id leads
    assert AT.encode() not in sealed
    assert sealer.open(sealed, place) == TOKENS.encode()
    assert sealer.seal(TOKENS.encode(), place)[1 : 1 + NONCE_BYTES] != sealed[1 : 1 + NONCE_BYTES]
    for elsewhere in (
        grant_place("mcp", "librechat", "bob"),
        grant_place("mcp", "openwebui", "alice"),
        grant_place("other", "librechat", "alice"),
        connect_place("alice"),
    ):
        with pytest.raises(SealBroken) as err:
            sealer.open(sealed, elsewhere)
        assert AT not in str(err.value)


def test_places_are_length_prefixed() -> None:
    """("ab", "c") and ("a", "bc") concatenate alike; they must not bind alike."""
    sealer = Sealer({1: KEY})
    sealed = sealer.seal(b"x", grant_place("r", "ab", "c"))
    with pytest.raises(SealBroken):
        sealer.open(sealed, grant_place("r", "a", "bc"))


def test_tampered_truncated_and_unknown_key_ids_fail() -> None:
    sealer = Sealer({1: KEY})
    place = grant_place("r", "c", "u")
    sealed = sealer.seal(b"payload", place)
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(SealBroken, match="does not open"):
        sealer.open(flipped, place)
    with pytest.raises(SealBroken, match="truncated"):
        sealer.open(sealed[:20], place)
    with pytest.raises(SealBroken, match="key id 7"):
        sealer.open(bytes([7]) + sealed[1:], place)
    with pytest.raises(SealBroken):
        Sealer({1: OTHER_KEY}).open(sealed, place)
    rotated = Sealer({1: OTHER_KEY, 2: KEY}, current=2)
    assert rotated.open(Sealer({2: KEY}, 2).seal(b"p", place), place) == b"p"  # opens by the blob's key id
    assert rotated.open(Sealer({1: OTHER_KEY}).seal(b"q", place), place) == b"q"
    assert KEY.hex() not in repr(sealer) and str(KEY) not in repr(sealer)


def test_unlock_creates_the_key_once_in_the_secret_store() -> None:
    secrets = KeyringStore()
    assert keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT) is None
    first = unlock(secrets, None, "/x/state.sqlite3")
    stored = keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT)
    assert stored is not None and len(base64.b64decode(stored)) == 32
    assert first.new_check is not None
    again = unlock(secrets, first.new_check, "/x/state.sqlite3")
    assert again.new_check is None  # the check matched: nothing to store
    assert keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT) == stored  # not replaced
    sealed = first.sealer.seal(b"v", grant_place("r", "c", "u"))
    assert again.sealer.open(sealed, grant_place("r", "c", "u")) == b"v"


def test_unlock_with_a_lost_key_refuses_and_creates_nothing() -> None:
    secrets = KeyringStore()
    check = unlock(secrets, None, "here").new_check
    keyring.delete_password(SERVICE, MASTER_KEY_ACCOUNT)
    with pytest.raises(MasterKeyError, match=r"is missing, but /x/state\.sqlite3 holds data") as err:
        unlock(secrets, check, "/x/state.sqlite3")
    assert MASTER_KEY_ACCOUNT in str(err.value)
    assert keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT) is None


def test_unlock_with_a_replaced_or_malformed_key_says_so_without_the_key() -> None:
    secrets = KeyringStore()
    check = unlock(secrets, None, "here").new_check
    other = base64.b64encode(OTHER_KEY).decode()
    keyring.set_password(SERVICE, MASTER_KEY_ACCOUNT, other)
    with pytest.raises(MasterKeyError, match=r"is not the one /x/db was sealed with") as err:
        unlock(secrets, check, "/x/db")
    assert other not in str(err.value)
    for bad in ("not base64 at all!", base64.b64encode(b"short").decode()):
        keyring.set_password(SERVICE, MASTER_KEY_ACCOUNT, bad)
        with pytest.raises(MasterKeyError, match=r"not a base64 256-bit key") as err:
            unlock(secrets, check, "/x/db")
        assert bad not in str(err.value)
