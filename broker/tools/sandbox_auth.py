"""The sandbox's OAuth 2.1 authorization server and its consent page, with a user picker.

Owns: `SandboxAuthServer` (the MCP SDK's provider interface, in memory: dynamic registration,
PKCE S256 as the SDK checks it, single-use rotating refresh tokens, revocation, the one
`resource` it accepts), which sandbox user each code and token belongs to (`subject`: the
default user unless the consent page's picker chose another), `auth_settings`, and the consent
page (GET: says it is a sandbox and continues by itself as the default user; POST from its
picker: the pending code bound to the user picked, then a 303 on to the client). Must never: issue
a token for any user but its code's; send a browser anywhere but a loopback http URL.
"""

from __future__ import annotations

import html
import re
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlencode, urlsplit

from mcp.server.auth.provider import (
    AccessToken,
    AuthorizationCode,
    AuthorizationParams,
    AuthorizeError,
    OAuthAuthorizationServerProvider,
    RefreshToken,
    TokenError,
    construct_redirect_uri,
)
from mcp.server.auth.settings import AuthSettings, ClientRegistrationOptions, RevocationOptions
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

DEFAULT_USER = "sandbox-user@example.test"  # who signs in when nobody is picked
PICKER_USERS = ("alice", "bob")  # offered on the consent page; any other name can be typed
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
CONSENT_DELAY_S = 5  # a person has time to pick; a script follows the Continue link (default user)
MAX_FORM_BYTES = 8192


@dataclass
class SandboxAuthServer(OAuthAuthorizationServerProvider[AuthorizationCode, RefreshToken, AccessToken]):
    """In-memory OAuth 2.1 provider: auto-approves, rotates single-use refresh tokens."""

    access_ttl: int = 300
    expected_resource: str | None = None
    issuer: str | None = None  # when set, the authorization response carries RFC 9207 `iss`
    consent_path: str | None = None  # when set, /authorize shows the sandbox consent page first
    subject: str = DEFAULT_USER  # the user a code belongs to unless the consent page picks another
    users: tuple[str, ...] = PICKER_USERS
    clients: dict[str, OAuthClientInformationFull] = field(default_factory=dict)
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    access_tokens: dict[str, AccessToken] = field(default_factory=dict)
    refresh_tokens: dict[str, RefreshToken] = field(default_factory=dict)
    pairs: dict[str, str] = field(default_factory=dict)

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        return self.clients.get(client_id)

    async def register_client(self, client_info: OAuthClientInformationFull) -> None:
        assert client_info.client_id is not None
        self.clients[client_info.client_id] = client_info

    async def authorize(self, client: OAuthClientInformationFull, params: AuthorizationParams) -> str:
        if self.expected_resource is not None and params.resource != self.expected_resource:
            raise AuthorizeError(
                error="invalid_target", error_description=f"unknown resource {params.resource}"
            )
        code = secrets.token_urlsafe(32)
        self.codes[code] = AuthorizationCode(
            code=code,
            scopes=params.scopes or [],
            expires_at=time.time() + 120,
            client_id=client.client_id or "",
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
            subject=self.subject,
        )
        back = construct_redirect_uri(
            str(params.redirect_uri), code=code, state=params.state, iss=self.issuer
        )
        if not self.consent_path:
            return back
        return f"{self.consent_path}?{urlencode({'next': back, 'client': client.client_name or 'a client'})}"

    def pick(self, code: str, user: str) -> bool:
        """The consent page's picker: the pending `code` now signs in `user`. False: no such code."""
        pending = self.codes.get(code)
        if pending is None or pending.expires_at < time.time() or not USER_NAME.fullmatch(user):
            return False
        self.codes[code] = pending.model_copy(update={"subject": user})
        return True

    def user_of(self, token: str) -> str | None:
        """The user a live access token belongs to; None for anything else."""
        at = self.access_tokens.get(token)
        if at is None or (at.expires_at is not None and at.expires_at < time.time()):
            return None
        return at.subject or self.subject

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthorizationCode | None:
        return self.codes.get(authorization_code)

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        # the stored code, not the one the SDK loaded: the picker may have rebound it since
        code = self.codes.pop(authorization_code.code, None)
        if code is None:
            raise TokenError(error="invalid_grant", error_description="code already used")
        return self._issue(client.client_id or "", code.scopes, code.resource, code.subject)

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> RefreshToken | None:
        return self.refresh_tokens.get(refresh_token)

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        if refresh_token.token not in self.refresh_tokens:  # single use
            raise TokenError(error="invalid_grant", error_description="refresh token already used")
        await self.revoke_token(refresh_token)  # it ends here, and the access token issued with it
        rt = refresh_token
        return self._issue(client.client_id or "", rt.scopes, rt.resource, rt.subject)

    async def load_access_token(self, token: str) -> AccessToken | None:
        at = self.access_tokens.get(token)
        if at is None or (at.expires_at is not None and at.expires_at < time.time()):
            return None
        return at

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        partner = self.pairs.pop(token.token, "")  # revoking either one revokes the pair
        self.pairs.pop(partner, None)
        for t in (token.token, partner):
            self.access_tokens.pop(t, None)
            self.refresh_tokens.pop(t, None)

    def revoke_everything(self) -> None:
        self.access_tokens.clear()
        self.refresh_tokens.clear()
        self.pairs.clear()

    def _issue(
        self, client_id: str, scopes: list[str], resource: str | None, subject: str | None = None
    ) -> OAuthToken:
        now = int(time.time())
        at = "at_" + secrets.token_urlsafe(24)
        rt = "rt_" + secrets.token_urlsafe(24)
        user = subject or self.subject
        self.access_tokens[at] = AccessToken(
            token=at,
            client_id=client_id,
            scopes=scopes,
            expires_at=now + self.access_ttl,
            resource=resource,
            subject=user,
        )
        self.refresh_tokens[rt] = RefreshToken(
            token=rt, client_id=client_id, scopes=scopes, resource=resource, subject=user
        )
        self.pairs[at], self.pairs[rt] = rt, at
        return OAuthToken(
            access_token=at,
            token_type="Bearer",
            expires_in=self.access_ttl,
            scope=" ".join(scopes),
            refresh_token=rt,
        )


def auth_settings(base: str) -> AuthSettings:
    """The MCP SDK's authorization server on `base`, protecting `base`/mcp with scope `cards`."""
    return AuthSettings(
        issuer_url=base,  # type: ignore[arg-type]
        resource_server_url=f"{base}/mcp",  # type: ignore[arg-type]
        required_scopes=["cards"],
        client_registration_options=ClientRegistrationOptions(
            enabled=True, valid_scopes=["cards"], default_scopes=["cards"]
        ),
        revocation_options=RevocationOptions(enabled=True),
        validate_token_resource=True,
    )


# ---------------------------------------------------------------- the consent page


def _loopback(url: str) -> bool:
    return url.startswith(("http://127.0.0.1:", "http://localhost:"))


async def consent_page(request: Request, auth: SandboxAuthServer, banner: str) -> Response:
    """GET: the page (Continue: the default user; a picker: alice, bob or a typed name). POST
    from the picker: the code in `next` bound to the user picked, and a 303 to `next`."""
    if request.method == "POST":
        body = await request.body()
        form = parse_qs(body.decode("utf-8", "replace")) if len(body) <= MAX_FORM_BYTES else {}
        nxt, user = form.get("next", [""])[-1], form.get("user", [""])[-1].strip()
        if not _loopback(nxt):
            return HTMLResponse("bad redirect", status_code=400)
        if not USER_NAME.fullmatch(user):
            return HTMLResponse("a user name is 1-64 letters, digits or . _ @ + -", status_code=400)
        code = parse_qs(urlsplit(nxt).query).get("code", [""])[0]
        if not auth.pick(code, user):
            return HTMLResponse("this sign-in is unknown, used or expired: start again", status_code=400)
        return RedirectResponse(nxt, status_code=303)
    if request.method != "GET":
        return HTMLResponse("GET or POST", status_code=405)
    nxt = request.query_params.get("next", "")
    if not _loopback(nxt):
        return HTMLResponse("bad redirect", status_code=400)
    client = html.escape(request.query_params.get("client", "a client"))
    target, action = html.escape(nxt), html.escape(request.url.path)
    hidden = f"<input type='hidden' name='next' value='{target}'>"
    buttons = "".join(
        f"<button type='submit' name='user' value='{html.escape(u)}' id='pick-{html.escape(u)}'>"
        f"{html.escape(u)}</button> "
        for u in auth.users
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>AgentCard sandbox</title>"
        f"<meta http-equiv='refresh' content='{CONSENT_DELAY_S};url={target}'></head>"
        "<body style='font-family: system-ui; max-width: 40em; margin: 4em auto'>"
        "<h1>AgentCard <em>sandbox</em></h1>"
        f"<p>{html.escape(banner)}.</p><p>Approving access for {client} automatically…</p>"
        f"<p><a id='continue' href='{target}'>Continue</a> as {html.escape(auth.subject)} "
        f"(in {CONSENT_DELAY_S} seconds by itself), or sign in as another sandbox user:</p>"
        f"<form id='picker' method='post' action='{action}'>{hidden}{buttons}</form>"
        f"<form id='typed' method='post' action='{action}'>{hidden}"
        "<input name='user' placeholder='another name' maxlength='64' required "
        "pattern='[A-Za-z0-9][A-Za-z0-9._@+\\-]{0,63}'> <button type='submit'>Sign in as this user</button>"
        "</form></body></html>"
    )
    return HTMLResponse(page)
