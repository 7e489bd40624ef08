"""A real MCP upstream for tests: the MCP SDK's MCPServer behind its own OAuth 2.1 server.

The authorization server is the SDK's (`OAuthAuthorizationServerProvider` + AuthSettings):
dynamic registration, PKCE S256 checked by the SDK, access tokens with a short lifetime,
refresh tokens that rotate and are single use, revocation. It auto-approves `/authorize`
(a test drives that step with an HTTP client, as a browser would). Only 127.0.0.1.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from mcp.server.mcpserver import MCPServer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.tools.sandbox import SandboxAuthServer as Provider
from broker.tools.sandbox import auth_settings, loopback_socket, serve_asgi


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


class Recorder:
    """ASGI middleware: counts requests by (method, path), token calls by grant type, and keeps headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls: Counter[tuple[str, str]] = Counter()
        self.grants: Counter[str] = Counter()
        self.mcp_headers: list[dict[str, str]] = []
        # each token request's grant type and resource (RFC 8707), in order: no secret values
        self.token_requests: list[dict[str, str | None]] = []

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
                    form = parse_qs(body.decode())
                    grant = form.get("grant_type", ["?"])[0]
                    self.grants[grant] += 1
                    resource = form.get("resource", [None])[0]
                    self.token_requests.append({"grant_type": grant, "resource": resource})
            return m

        await self.app(scope, rx, send)


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
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    provider = Provider(
        access_ttl=access_ttl, expected_resource=f"{base}/mcp", issuer=iss, subject="alice@example.test"
    )
    server = build_server(auth=auth_settings(base), auth_server_provider=provider) if auth else build_server()
    recorder = Recorder(server.streamable_http_app())
    async with serve_asgi(recorder, sock):
        yield McpUpstream(base, provider, recorder)
