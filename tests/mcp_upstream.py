"""A real MCP upstream for tests: the MCP SDK's MCPServer behind its own OAuth 2.1 server.

The authorization server is the SDK's (`OAuthAuthorizationServerProvider` + AuthSettings):
dynamic registration, PKCE S256 checked by the SDK, access tokens with a short lifetime,
refresh tokens that rotate and are single use, revocation. It auto-approves `/authorize`
(a test drives that step with an HTTP client, as a browser would). Only 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn
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
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def build_server(**kwargs: Any) -> MCPServer:
    mcp = MCPServer("agentcard-test", log_level="WARNING", **kwargs)
    cards: list[dict[str, Any]] = [{"id": "c1", "amount_cents": 500}]

    @mcp.tool()
    def list_cards() -> list[dict[str, Any]]:
        """List all cards."""
        return cards

    @mcp.tool()
    def create_card(amount_cents: int) -> dict[str, Any]:
        """Create a virtual card with a spend limit."""
        card = {"id": f"c{len(cards) + 1}", "amount_cents": amount_cents}
        cards.append(card)
        return card

    @mcp.tool()
    def whoami() -> str:
        """Who the token belongs to."""
        from mcp.server.auth.middleware.auth_context import get_access_token

        tok = get_access_token()
        return "anonymous" if tok is None else f"{tok.client_id} {tok.subject} {tok.resource}"

    return mcp


@dataclass
class Provider(OAuthAuthorizationServerProvider[AuthorizationCode, RefreshToken, AccessToken]):
    access_ttl: int = 60
    expected_resource: str | None = None
    issuer: str | None = None  # set: add RFC 9207 `iss` to the authorization response
    clients: dict[str, OAuthClientInformationFull] = field(default_factory=dict)
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    access_tokens: dict[str, AccessToken] = field(default_factory=dict)
    refresh_tokens: dict[str, RefreshToken] = field(default_factory=dict)
    pairs: dict[str, str] = field(default_factory=dict)  # either token -> its partner

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
            expires_at=time.time() + 60,
            client_id=client.client_id or "",
            code_challenge=params.code_challenge,
            redirect_uri=params.redirect_uri,
            redirect_uri_provided_explicitly=params.redirect_uri_provided_explicitly,
            resource=params.resource,
            subject="alice@example.test",
        )
        return construct_redirect_uri(
            str(params.redirect_uri), code=code, state=params.state, iss=self.issuer
        )

    async def load_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: str
    ) -> AuthorizationCode | None:
        return self.codes.get(authorization_code)

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        if self.codes.pop(authorization_code.code, None) is None:
            raise TokenError(error="invalid_grant", error_description="code already used")
        return self._issue(client.client_id or "", authorization_code.scopes, authorization_code.resource)

    async def load_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: str
    ) -> RefreshToken | None:
        return self.refresh_tokens.get(refresh_token)

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        if self.refresh_tokens.pop(refresh_token.token, None) is None:  # single use
            raise TokenError(error="invalid_grant", error_description="refresh token already used")
        self.access_tokens.pop(self.pairs.pop(refresh_token.token, ""), None)
        return self._issue(client.client_id or "", refresh_token.scopes, refresh_token.resource)

    async def load_access_token(self, token: str) -> AccessToken | None:
        at = self.access_tokens.get(token)
        if at is None or (at.expires_at is not None and at.expires_at < time.time()):
            return None
        return at

    async def revoke_token(self, token: AccessToken | RefreshToken) -> None:
        self.revoke_all_of(token.token)

    def revoke_all_of(self, token: str) -> None:
        partner = self.pairs.pop(token, "")
        self.pairs.pop(partner, None)
        for t in (token, partner):
            self.access_tokens.pop(t, None)
            self.refresh_tokens.pop(t, None)

    def revoke_everything(self) -> None:
        self.access_tokens.clear()
        self.refresh_tokens.clear()
        self.pairs.clear()

    def _issue(self, client_id: str, scopes: list[str], resource: str | None) -> OAuthToken:
        now = int(time.time())
        at = "at_" + secrets.token_urlsafe(24)
        rt = "rt_" + secrets.token_urlsafe(24)
        self.access_tokens[at] = AccessToken(
            token=at,
            client_id=client_id,
            scopes=scopes,
            expires_at=now + self.access_ttl,
            resource=resource,
            subject="alice@example.test",
        )
        self.refresh_tokens[rt] = RefreshToken(
            token=rt, client_id=client_id, scopes=scopes, resource=resource
        )
        self.pairs[at], self.pairs[rt] = rt, at
        return OAuthToken(
            access_token=at,
            token_type="Bearer",
            expires_in=self.access_ttl,
            scope=" ".join(scopes),
            refresh_token=rt,
        )


class Recorder:
    """ASGI middleware: counts requests by (method, path), token calls by grant type, and keeps headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls: Counter[tuple[str, str]] = Counter()
        self.grants: Counter[str] = Counter()
        self.mcp_headers: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.calls[(scope["method"], scope["path"])] += 1
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if scope["path"].startswith("/mcp"):
            self.mcp_headers.append({"method": scope["method"], **headers})
        body = bytearray()

        async def rx() -> Message:
            m = await receive()
            if m["type"] == "http.request":
                body.extend(m.get("body", b""))
                if not m.get("more_body") and scope["path"] == "/token":
                    grant = parse_qs(body.decode()).get("grant_type", ["?"])[0]
                    self.grants[grant] += 1
            return m

        await self.app(scope, rx, send)


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def,override]
        yield  # leave pytest's signal handling alone


@dataclass
class McpUpstream:
    base: str
    provider: Provider
    recorder: Recorder

    @property
    def mcp_url(self) -> str:
        return f"{self.base}/mcp"


@contextlib.asynccontextmanager
async def run_mcp_upstream(
    access_ttl: int = 60, iss: str | None = None, auth: bool = True
) -> AsyncIterator[McpUpstream]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it (Linux)
    sock.bind(("127.0.0.1", 0))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    provider = Provider(access_ttl=access_ttl, expected_resource=f"{base}/mcp", issuer=iss)
    if auth:
        settings = AuthSettings(
            issuer_url=base,  # type: ignore[arg-type]
            resource_server_url=f"{base}/mcp",  # type: ignore[arg-type]
            required_scopes=["cards"],
            client_registration_options=ClientRegistrationOptions(
                enabled=True, valid_scopes=["cards"], default_scopes=["cards"]
            ),
            revocation_options=RevocationOptions(enabled=True),
            validate_token_resource=True,
        )
        server = build_server(auth=settings, auth_server_provider=provider)
    else:
        server = build_server()
    recorder = Recorder(server.streamable_http_app())
    config = uvicorn.Config(
        recorder, host="127.0.0.1", log_level="warning", lifespan="on", timeout_graceful_shutdown=1
    )
    uv = _QuietServer(config)
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    try:
        while not uv.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield McpUpstream(base, provider, recorder)
    finally:
        uv.should_exit = True
        await task
