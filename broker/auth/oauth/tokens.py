"""Tokens from the token endpoint: RFC 6749 token requests, and their answers.

Owns: the token request (RFC 6749 §4.1.3 authorization_code, §6 refresh_token) with RFC 8707
`resource` and, for a confidential client, `client_secret_post`; `TokenSet`, the parsing of a
token response (§5.1) into it, and when it is due for a refresh. Must never: put a token, a code,
a verifier or a server's free text into an error; drop a refresh token the server did not replace.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from broker.auth.oauth.registration import ClientRecord
from broker.auth.oauth.transport import HTTP_TIMEOUT, OAuthError, error_code

MAX_SKEW_S = 60.0  # refresh this long before expiry (less for very short-lived tokens)


@dataclass
class TokenSet:
    access_token: str
    refresh_token: str | None
    expires_at: float | None  # epoch seconds
    scope: str = ""
    token_type: str = "Bearer"
    subject: str | None = None
    obtained_at: float = field(default_factory=time.time)
    dead: str | None = None  # why the grant ended (invalid_grant): needs_login until a new login

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TokenSet:
        return cls(**json.loads(text))

    def lifetime(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.obtained_at

    def needs_refresh(self, now: float) -> bool:
        if self.expires_at is None:
            return False
        life = self.lifetime() or 0
        skew = min(MAX_SKEW_S, max(life * 0.2, 0.5))
        return now >= self.expires_at - skew


def parse_token_response(doc: dict[str, Any], previous_refresh: str | None = None) -> TokenSet:
    """RFC 6749 §5.1. A response without a refresh_token keeps the previous one (§6)."""
    access = doc.get("access_token")
    if not isinstance(access, str) or not access:
        raise OAuthError("the token response has no access_token")
    token_type = str(doc.get("token_type", "Bearer"))
    if token_type.lower() != "bearer":
        raise OAuthError(f"unsupported token_type {token_type!r}")
    expires_in = doc.get("expires_in")
    now = time.time()
    expires_at = now + float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None
    refresh = doc.get("refresh_token")
    subject = next((str(doc[k]) for k in ("sub", "account", "user", "email") if doc.get(k)), None)
    return TokenSet(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else previous_refresh,
        expires_at=expires_at,
        scope=str(doc.get("scope", "")),
        subject=subject,
        obtained_at=now,
    )


async def token_request(
    session: aiohttp.ClientSession, client: ClientRecord, form: dict[str, str]
) -> dict[str, Any]:
    """POST the token endpoint (client_secret_post when the client has a secret)."""
    data = {**form, "client_id": client.client_id, "resource": client.resource}
    if client.client_secret:
        data["client_secret"] = client.client_secret
    try:
        async with session.post(
            client.token_endpoint,
            data=data,
            allow_redirects=False,
            timeout=HTTP_TIMEOUT,
            headers={"Accept": "application/json"},
        ) as r:
            try:
                doc = await r.json(content_type=None)
            except ValueError:
                doc = None
            if r.status == 200 and isinstance(doc, dict):
                return doc
            error = error_code(doc)
            raise OAuthError(f"the token endpoint answered HTTP {r.status} {error}".strip(), error)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OAuthError(f"cannot reach the token endpoint: {type(exc).__name__}") from None
