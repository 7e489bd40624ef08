"""A real MCP upstream for tests: the MCP SDK's MCPServer behind its own OAuth 2.1 server.

The authorization server is the SDK's (`OAuthAuthorizationServerProvider` + AuthSettings):
dynamic registration, PKCE S256 checked by the SDK, access tokens with a short lifetime,
refresh tokens that rotate and are single use, revocation. It auto-approves `/authorize`
(a test drives that step with an HTTP client, as a browser would). Only 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull
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
        self.registrations: list[dict[str, Any]] = []  # the bodies of RFC 7591 registrations

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
                if not m.get("more_body") and scope["path"] == "/register":
                    with contextlib.suppress(ValueError):
                        self.registrations.append(json.loads(body))
            return m

        await self.app(scope, rx, send)


class CimdProvider(Provider):
    """The sandbox provider with OAuth Client ID Metadata Documents, which the installed MCP SDK's
    authorization server lacks: a client_id that is an http(s) URL (127.0.0.1 only) is fetched,
    and the document it answers is the client, when its own client_id is that URL."""

    fetched: list[str]

    async def get_client(self, client_id: str) -> OAuthClientInformationFull | None:
        if not client_id.startswith(("https://127.0.0.1:", "http://127.0.0.1:")):
            return await super().get_client(client_id)
        self.fetched.append(client_id)
        async with aiohttp.ClientSession() as s, s.get(client_id, allow_redirects=False) as r:
            if r.status != 200:
                return None
            doc = await r.json(content_type=None)
        if not isinstance(doc, dict) or doc.get("client_id") != client_id:
            return None
        return OAuthClientInformationFull.model_validate({**doc, "scope": "cards"})


class AdvertiseCimd:
    """ASGI middleware: the authorization server metadata says client_id_metadata_document_supported."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/.well-known/oauth-authorization-server":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(m: Message) -> None:
            held.append(m)

        await self.app(scope, receive, hold)
        start = held[0]
        body = b"".join(m.get("body", b"") for m in held[1:])
        doc = json.loads(body)
        doc["client_id_metadata_document_supported"] = True
        body = json.dumps(doc).encode()
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


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
    access_ttl: int = 60, iss: str | None = None, auth: bool = True, cimd: bool = False
) -> AsyncIterator[McpUpstream]:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    kind = CimdProvider if cimd else Provider
    provider = kind(
        access_ttl=access_ttl, expected_resource=f"{base}/mcp", issuer=iss, subject="alice@example.test"
    )
    if isinstance(provider, CimdProvider):
        provider.fetched = []
    server = build_server(auth=auth_settings(base), auth_server_provider=provider) if auth else build_server()
    app = server.streamable_http_app()
    recorder = Recorder(AdvertiseCimd(app) if cimd else app)
    async with serve_asgi(recorder, sock):
        yield McpUpstream(base, provider, recorder)
