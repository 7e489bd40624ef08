"""The dashboard's passkeys: WebAuthn registration and assertions, with py_webauthn.

With `require_passkey: true` on a route's `approve:` policy, approving needs a passkey the owner
registered in the dashboard, verified with user verification (a PIN, a fingerprint): the admin
key alone, which an agent with a shell as the user can read, is not enough. The relying party is
`localhost` (browsers refuse WebAuthn on IP-address origins), the origin the dashboard's own,
`http://localhost:PORT`.

The credentials (id, public key, sign count) are kept as JSON in the secret store under
`dashboard:passkeys`. Once one is registered, adding another needs an assertion by one of them.

Owns: the ceremonies' options, their verification and the stored credentials. Must never:
accept an assertion without user verification, for another origin or relying party, with a
challenge this session did not get (or got for another purpose), or twice.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import time
from dataclasses import dataclass
from typing import Any

from broker.admin.dashboard_auth import CHALLENGE_TTL_S, PROOF_TTL_S, REGISTER, Challenge, Session
from broker.auth.secret_store import SecretStore, SecretStoreError
from broker.errors import BrokerError

ACCOUNT = "dashboard:passkeys"
RP_ID = "localhost"
RP_NAME = "agentcard-broker"
MAX_PASSKEYS = 16


class PasskeyError(Exception):
    """A ceremony that did not verify; the text is safe to show the page."""


@dataclass
class Stored:
    """What the secret store holds: the user handle the passkeys were made for, and each one."""

    user_handle: str  # base64url
    credentials: list[dict[str, Any]]  # {"id", "public_key" (base64url), "sign_count", "added_at"}

    @classmethod
    def parse(cls, text: str | None) -> Stored:
        from webauthn.helpers import bytes_to_base64url, generate_user_handle

        if not text:
            return cls(bytes_to_base64url(generate_user_handle()), [])
        try:
            doc = json.loads(text)
            return cls(str(doc["user_handle"]), [dict(c) for c in doc["credentials"]])
        except (ValueError, KeyError, TypeError):
            raise PasskeyError(f"the stored passkeys ({ACCOUNT}) cannot be read") from None

    def text(self) -> str:
        return json.dumps({"user_handle": self.user_handle, "credentials": self.credentials})


async def load(store: SecretStore) -> Stored:
    try:
        return Stored.parse(await asyncio.to_thread(store.get, ACCOUNT))
    except SecretStoreError as exc:
        raise PasskeyError(str(exc)) from None


async def count(store: SecretStore) -> int | None:
    """How many passkeys are registered; None when the store cannot say."""
    try:
        text = await asyncio.to_thread(store.get, ACCOUNT)
        return len(Stored.parse(text).credentials) if text else 0
    except (SecretStoreError, PasskeyError):
        return None


async def _save(store: SecretStore, stored: Stored) -> None:
    try:
        await asyncio.to_thread(store.set, ACCOUNT, stored.text())
    except SecretStoreError as exc:
        raise PasskeyError(str(exc)) from None


async def registration_options(store: SecretStore, session: Session) -> dict[str, Any]:
    """Options for navigator.credentials.create(); the challenge is kept in the session. Once a
    passkey exists, the session must have just verified one for REGISTER."""
    from webauthn import generate_registration_options, options_to_json
    from webauthn.helpers import base64url_to_bytes
    from webauthn.helpers.structs import (
        AuthenticatorSelectionCriteria,
        PublicKeyCredentialDescriptor,
        ResidentKeyRequirement,
        UserVerificationRequirement,
    )

    stored = await load(store)
    if stored.credentials and not session.take_proof(REGISTER):
        raise BrokerError(
            "admin_required", "a passkey is registered already: adding another needs an assertion by it"
        )
    if len(stored.credentials) >= MAX_PASSKEYS:
        raise PasskeyError(f"{MAX_PASSKEYS} passkeys are registered already")
    options = generate_registration_options(
        rp_id=RP_ID,
        rp_name=RP_NAME,
        user_name=_owner(),
        user_id=base64url_to_bytes(stored.user_handle),
        user_display_name=f"{_owner()} (agentcard-broker dashboard)",
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=[
            PublicKeyCredentialDescriptor(id=base64url_to_bytes(c["id"])) for c in stored.credentials
        ],
    )
    session.challenge = Challenge("register", options.challenge, REGISTER, time.monotonic() + CHALLENGE_TTL_S)
    doc: dict[str, Any] = json.loads(options_to_json(options))
    return doc


async def register(store: SecretStore, session: Session, credential: Any, origin: str) -> int:
    """Verify the page's new credential and store it; the number of passkeys now registered."""
    from webauthn import verify_registration_response
    from webauthn.helpers import bytes_to_base64url
    from webauthn.helpers.exceptions import WebAuthnException

    challenge = session.take_challenge("register")
    if challenge is None:
        raise PasskeyError("this registration was not started here, or it took too long; try again")
    try:
        verified = verify_registration_response(
            credential=_credential(credential),
            expected_challenge=challenge.value,
            expected_rp_id=RP_ID,
            expected_origin=origin,
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
        raise PasskeyError(f"the passkey was not accepted: {exc}") from None
    stored = await load(store)
    new_id = bytes_to_base64url(verified.credential_id)
    if any(c["id"] == new_id for c in stored.credentials):
        raise PasskeyError("this passkey is registered already")
    stored.credentials.append(
        {
            "id": new_id,
            "public_key": bytes_to_base64url(verified.credential_public_key),
            "sign_count": verified.sign_count,
            "added_at": int(time.time()),
        }
    )
    await _save(store, stored)
    return len(stored.credentials)


async def authentication_options(store: SecretStore, session: Session, purpose: str) -> dict[str, Any]:
    """Options for navigator.credentials.get(), for one `purpose`: an approval's id, or REGISTER."""
    from webauthn import generate_authentication_options, options_to_json
    from webauthn.helpers import base64url_to_bytes
    from webauthn.helpers.structs import PublicKeyCredentialDescriptor, UserVerificationRequirement

    stored = await load(store)
    if not stored.credentials:
        raise PasskeyError("no passkey is registered: register one in the dashboard first")
    options = generate_authentication_options(
        rp_id=RP_ID,
        allow_credentials=[
            PublicKeyCredentialDescriptor(id=base64url_to_bytes(c["id"])) for c in stored.credentials
        ],
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    session.challenge = Challenge(
        "authenticate", options.challenge, purpose, time.monotonic() + CHALLENGE_TTL_S
    )
    doc: dict[str, Any] = json.loads(options_to_json(options))
    return doc


async def authenticate(store: SecretStore, session: Session, credential: Any, origin: str) -> str:
    """Verify an assertion against this session's challenge; the session then holds a proof for
    the challenge's purpose (PROOF_TTL_S, used once). Returns the purpose."""
    from webauthn import verify_authentication_response
    from webauthn.helpers import base64url_to_bytes
    from webauthn.helpers.exceptions import WebAuthnException

    challenge = session.take_challenge("authenticate")
    if challenge is None:
        raise PasskeyError("this passkey check was not started here, or it took too long; try again")
    cred = _credential(credential)
    stored = await load(store)
    known = next((c for c in stored.credentials if c["id"] == cred.get("id")), None)
    if known is None:
        raise PasskeyError("this passkey is not registered with this broker")
    try:
        verified = verify_authentication_response(
            credential=cred,
            expected_challenge=challenge.value,
            expected_rp_id=RP_ID,
            expected_origin=origin,
            credential_public_key=base64url_to_bytes(known["public_key"]),
            credential_current_sign_count=int(known["sign_count"]),
            require_user_verification=True,
        )
    except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
        raise PasskeyError(f"the passkey was not accepted: {exc}") from None
    if verified.new_sign_count != known["sign_count"]:
        known["sign_count"] = verified.new_sign_count
        await _save(store, stored)
    session.proof = (challenge.purpose, time.monotonic() + PROOF_TTL_S)
    return challenge.purpose


def _credential(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or not isinstance(value.get("id"), str):
        raise PasskeyError("the page sent no credential")
    return value


def _owner() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return "owner"
