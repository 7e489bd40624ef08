"""Tokens from the token endpoint: RFC 6749 token requests with RFC 7636 PKCE, and their answers.

Owns: the PKCE pair (verifier and S256 challenge, from authlib's rfc7636), the token request
(RFC 6749 §4.1.3 authorization_code, §6 refresh_token; built by authlib's rfc6749) with RFC 8707
`resource` and, for a confidential client, `client_secret_post`; `TokenSet`, the parsing of a
token response (§5.1) into it, and when it is due for a refresh. Must never: put a token, a code,
a verifier or a server's free text into an error; drop a refresh token the server did not replace.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import aiohttp
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_token_request
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from broker.auth.oauth.registration import ClientRecord
from broker.auth.oauth.transport import HTTP_TIMEOUT, OAuthError, error_code

MAX_SKEW_S = 60.0  # refresh this long before expiry (less for very short-lived tokens)


@dataclass(frozen=True)
class Pkce:
    """RFC 7636: the verifier kept for the token request, the challenge sent on authorize."""

    verifier: str
    challenge: str
    method: ClassVar[str] = "S256"  # the only method the broker uses (SPEC.md: S256 always)

    @classmethod
    def new(cls) -> Pkce:
        verifier = str(generate_token(64))
        return cls(verifier, str(create_s256_code_challenge(verifier)))


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
    # the authorization server that issued the grant: a grant is only used with that issuer
    # (None: stored by a version before issuer binding; the client record's issuer stands in)
    issuer: str | None = None
    # step-up (RFC 6750 §3.1 insufficient_scope): the scopes the next login asks for, with the
    # configured ones (kept on the ended grant: the login or connect that replaces it reads them)
    wanted_scope: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TokenSet:
        doc = json.loads(text)
        known = {f.name for f in fields(cls)}  # a field a newer version added is left out
        return cls(**{k: v for k, v in doc.items() if k in known})

    def lifetime(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.obtained_at

    def needs_refresh(self, now: float) -> bool:
        if self.expires_at is None:
            return False
        life = self.lifetime() or 0
        skew = min(MAX_SKEW_S, max(life * 0.2, 0.5))
        return now >= self.expires_at - skew


def scope_union(*scopes: Iterable[str]) -> str:
    """Space-separated scopes, each once, in the order first seen."""
    return " ".join(dict.fromkeys(s for group in scopes for s in group if s))


def parse_token_response(
    doc: dict[str, Any], previous_refresh: str | None = None, issuer: str | None = None
) -> TokenSet:
    """RFC 6749 §5.1. A response without a refresh_token keeps the previous one (§6). `issuer`:
    the authorization server that answered, kept with the tokens (issuer binding)."""
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
        issuer=issuer,
    )


async def token_request(
    session: aiohttp.ClientSession, client: ClientRecord, grant_type: str, **params: str
) -> dict[str, Any]:
    """POST the token endpoint (RFC 6749 §3.2) for `grant_type` with its `params` (`code`,
    `redirect_uri`, `code_verifier`; or `refresh_token`): the client's id, the `resource`, and
    its secret when it has one (client_secret_post). The answer's JSON object on HTTP 200."""
    body = prepare_token_request(
        grant_type,
        **params,
        client_id=client.client_id,
        resource=client.resource,
        client_secret=client.client_secret or "",  # empty: left out (a public client)
    )
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"}
    try:
        async with session.post(
            client.token_endpoint, data=body, headers=headers, allow_redirects=False, timeout=HTTP_TIMEOUT
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
