"""`agentcard-broker sandbox`: a local stand-in for AgentCard, for trying things and for tests.

Owns: one 127.0.0.1 port serving the v1 REST card endpoints and an MCP server with card tools
(`sandbox_cards`: `sk_test_` keys only, AgentCard's `{"error": …}` shapes, RateLimit headers,
each card recorded under the user who created it) behind a real OAuth 2.1 authorization server
(`sandbox_auth`: the MCP SDK's; PKCE S256, dynamic registration, single-use rotating refresh
tokens, revocation) whose consent page says it is a sandbox, approves by itself as the default
user and offers a picker of users (alice, bob, a typed name); what the MCP endpoint received
(`Sandbox.mcp_seen`: each request's bearer and its user). Every answer says `"mode": "test"`.
Must never: be mistaken for AgentCard (a banner at start, a header on every answer), or listen
beyond loopback. Needs the `sandbox` extra (the MCP SDK and uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.tools import Say
from broker.tools.sandbox_auth import DEFAULT_USER, SandboxAuthServer, auth_settings, consent_page
from broker.tools.sandbox_cards import RATE_LIMIT, CardStore, RestApi, card_server

__all__ = [
    "BANNER", "DEFAULT_USER", "RATE_LIMIT", "CardStore", "RestApi", "Sandbox", "SandboxApp",
    "SandboxAuthServer", "auth_settings", "card_server", "loopback_socket", "running", "serve_asgi",
    "serve_forever",
]  # fmt: skip

BANNER = "AgentCard SANDBOX on this machine: test data only, no real account, no real money"
SANDBOX_HEADER = ("x-agentcard-sandbox", "test")
CONSENT_PATH = "/sandbox/consent"


# ---------------------------------------------------------------- one ASGI app, one port


class SandboxApp:
    """Dispatches /api/v1 to the REST API, /sandbox/consent to the page, the rest to the MCP app
    (noting, for /mcp, the bearer each request came with and whose it is)."""

    def __init__(self, rest: RestApi, mcp_app: ASGIApp, auth: SandboxAuthServer) -> None:
        self.rest = rest
        self.mcp_app = mcp_app
        self.auth = auth
        self.mcp_seen: deque[dict[str, Any]] = deque(maxlen=100)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), tuple(h.encode() for h in SANDBOX_HEADER)]
            await send(message)

        path = scope.get("path", "") if scope["type"] == "http" else ""
        app: ASGIApp = self.mcp_app
        if path.startswith("/api/v1/"):
            app = self.rest
        elif path == CONSENT_PATH:
            app = await consent_page(Request(scope, receive), self.auth, BANNER)
        elif path == "/":
            app = JSONResponse({"service": "agentcard-sandbox", "mode": "test", "note": BANNER})
        elif path.startswith("/mcp"):
            self._note(scope)
        await app(scope, receive, marked)

    def _note(self, scope: Scope) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        bearer = headers.get("authorization", "").removeprefix("Bearer ").strip()
        self.mcp_seen.append(
            {"method": scope.get("method", ""), "headers": headers, "bearer": bearer,
             "user": self.auth.user_of(bearer) if bearer else None}
        )  # fmt: skip


@dataclass
class Sandbox:
    base: str
    store: CardStore
    rest: RestApi
    auth: SandboxAuthServer
    mcp_seen: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))

    @property
    def mcp_url(self) -> str:
        return f"{self.base}/mcp"


def loopback_socket(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1 (never beyond), Nagle off for its accepted connections."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it (Linux)
    sock.bind(("127.0.0.1", port))
    return sock


@contextlib.asynccontextmanager
async def serve_asgi(app: ASGIApp, sock: socket.socket) -> AsyncIterator[None]:
    """Serve `app` on `sock` in this event loop until the block ends (uvicorn, no signal handlers)."""
    import uvicorn

    class Quiet(uvicorn.Server):  # the caller owns the process's signals
        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            yield

    server = Quiet(
        uvicorn.Config(app, host="127.0.0.1", log_level="warning", lifespan="on", timeout_graceful_shutdown=1)
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def running(
    port: int = 0,
    *,
    key: str | None = None,
    access_ttl: int = 300,
    consent: bool = True,
    say: Say | None = None,
) -> AsyncIterator[Sandbox]:
    sock = loopback_socket(port)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    store = CardStore()
    auth = SandboxAuthServer(
        access_ttl=access_ttl,
        expected_resource=f"{base}/mcp",
        consent_path=CONSENT_PATH if consent else None,
    )
    rest = RestApi(store, key, auth)
    mcp_app = card_server(store, auth=auth_settings(base), auth_server_provider=auth).streamable_http_app()
    app = SandboxApp(rest, mcp_app, auth)
    async with serve_asgi(app, sock):
        if say is not None:
            say(f"*** {BANNER} ***")
            say(f"REST: {base}/api/v1   MCP: {base}/mcp   (OAuth issuer {base})")
        yield Sandbox(base, store, rest, auth, app.mcp_seen)


async def serve_forever(port: int, say: Say) -> int:
    async with running(port, say=say):
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return 0
