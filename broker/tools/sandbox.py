"""`agentcard-broker sandbox`: a local stand-in for AgentCard, for trying things and for tests.

Owns: on one 127.0.0.1 port, the v1 REST card endpoints (create, list, get, details, close;
`sk_test_` keys only; AgentCard's `{"error": …}` shapes and RateLimit headers) and an MCP
server with card tools behind a real OAuth 2.1 authorization server (the MCP SDK's: PKCE S256,
dynamic registration, single-use rotating refresh tokens, revocation) whose consent page says
it is a sandbox and approves by itself. Every answer says `"mode": "test"`. Must never: be
mistaken for AgentCard (a banner at start, a header on every answer), or listen beyond loopback.
Needs the `sandbox` extra (the MCP SDK and uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import secrets
import signal
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

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
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.tools import Say

BANNER = "AgentCard SANDBOX on this machine: test data only, no real account, no real money"
SANDBOX_HEADER = ("x-agentcard-sandbox", "test")
RATE_LIMIT = 120  # requests per minute per key, like the real API's headers say


# ---------------------------------------------------------------- the card store


@dataclass
class CardStore:
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def create(self, spend_limit_cents: int, cardholder_id: str = "ch_sandbox") -> dict[str, Any]:
        cid = "card_" + secrets.token_hex(6)
        card = {
            "id": cid,
            "cardholder_id": cardholder_id,
            "last4": f"{secrets.randbelow(10000):04d}",
            "spend_limit_cents": spend_limit_cents,
            "status": "active",
            "mode": "test",
        }
        self.cards[cid] = card
        return card

    def details(self, cid: str) -> dict[str, Any]:
        """The card's number: a Visa test number, never a real card."""
        number = {"pan": "4242424242424242", "cvv": "123", "exp": "12/30"}
        return {"id": cid, **number, "mode": "test", "last4": self.cards[cid]["last4"]}


# ---------------------------------------------------------------- the authorization server


@dataclass
class SandboxAuthServer(OAuthAuthorizationServerProvider[AuthorizationCode, RefreshToken, AccessToken]):
    """In-memory OAuth 2.1 provider: auto-approves, rotates single-use refresh tokens."""

    access_ttl: int = 300
    expected_resource: str | None = None
    issuer: str | None = None  # when set, the authorization response carries RFC 9207 `iss`
    consent_path: str | None = None  # when set, /authorize shows the sandbox consent page first
    subject: str = "sandbox-user@example.test"
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
        if refresh_token.token not in self.refresh_tokens:  # single use
            raise TokenError(error="invalid_grant", error_description="refresh token already used")
        await self.revoke_token(refresh_token)  # it ends here, and the access token issued with it
        return self._issue(client.client_id or "", refresh_token.scopes, refresh_token.resource)

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
            subject=self.subject,
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


# ---------------------------------------------------------------- the MCP server


def card_server(store: CardStore, **kwargs: Any) -> MCPServer:
    mcp = MCPServer("agentcard-sandbox", log_level="WARNING", **kwargs)

    @mcp.tool()
    def list_cards() -> dict[str, Any]:
        """List the sandbox's virtual cards."""
        return {"cards": list(store.cards.values()), "mode": "test"}

    @mcp.tool()
    def create_card(amount_cents: int, sandbox: bool = True) -> dict[str, Any]:
        """Create a sandbox virtual card with a spend limit in cents."""
        return store.create(amount_cents)

    @mcp.tool()
    def check_balance() -> dict[str, Any]:
        """The sandbox wallet's balance."""
        balance = 1_000_000 - sum(c["spend_limit_cents"] for c in store.cards.values())
        return {"balance_cents": balance, "mode": "test"}

    @mcp.tool()
    def whoami() -> str:
        """Who the access token belongs to."""
        from mcp.server.auth.middleware.auth_context import get_access_token

        tok = get_access_token()
        return "anonymous" if tok is None else f"{tok.client_id} {tok.subject} {tok.resource}"

    return mcp


# ---------------------------------------------------------------- the REST API


@dataclass
class RestApi:
    """The v1 card endpoints (an ASGI app); every answer says `"mode": "test"`."""

    store: CardStore
    accepted_key: str | None = None  # None: any sk_test_ key
    seen: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))
    _hits: dict[str, deque[float]] = field(default_factory=dict)

    def _key(self, request: Request) -> tuple[str, str | None]:
        """The request's API key, and why it is refused (None: it is not)."""
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not key:
            return key, "missing API key"
        if not key.startswith("sk_test_"):
            return key, "the sandbox accepts sk_test_ keys only"
        if self.accepted_key is not None and not secrets.compare_digest(key, self.accepted_key):
            return key, "invalid API key"
        return key, None

    def _rate(self, key: str) -> tuple[dict[str, str], bool]:
        now = time.time()
        hits = self._hits.setdefault(key, deque())
        while hits and hits[0] <= now - 60:
            hits.popleft()
        over = len(hits) >= RATE_LIMIT
        if not over:
            hits.append(now)
        reset = int(60 - (now - hits[0])) if hits else 60
        headers = {
            "RateLimit-Limit": str(RATE_LIMIT),
            "RateLimit-Remaining": str(max(0, RATE_LIMIT - len(hits))),
            "RateLimit-Reset": str(max(0, reset)),
        }
        return headers, over

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        body = await request.body()
        path, method = request.url.path, request.method
        self.seen.append({"method": method, "path": path, "headers": dict(request.headers), "body": body})
        key, refused = self._key(request)
        headers: dict[str, str] = {}
        if refused:
            status, doc = 401, {"error": refused}
        else:
            headers, over = self._rate(key)
            status, doc = (429, {"error": "rate limit exceeded"}) if over else self._route(method, path, body)
        await JSONResponse({**doc, "mode": "test"}, status_code=status, headers=headers)(scope, receive, send)

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """The status and the answer (its mode aside) of an /api/v1 request an accepted key made."""
        parts = [p for p in path.split("/") if p][2:]  # after api/v1
        if parts == ["cards"] and method == "GET":
            return 200, {"cards": list(self.store.cards.values())}
        if parts == ["cards"] and method == "POST":
            try:
                doc = json.loads(body or b"{}")
                limit = int(doc.get("spend_limit_cents", doc.get("amount_cents", 0)))
            except (ValueError, TypeError, AttributeError):
                return 400, {"error": "body must be JSON with spend_limit_cents"}
            if limit <= 0:
                return 400, {"error": "spend_limit_cents must be positive"}
            return 201, self.store.create(limit, str(doc.get("cardholder_id", "ch_sandbox")))
        if parts == ["cardholders"] and method == "GET":
            return 200, {"cardholders": [{"id": "ch_sandbox", "name": "Sandbox Holder"}]}
        if len(parts) in (2, 3) and parts[0] == "cards":
            card = self.store.cards.get(parts[1])
            if card is None:
                return 404, {"error": f"no card {parts[1]}"}
            if len(parts) == 3 and parts[2] == "details" and method == "GET":
                return 200, self.store.details(parts[1])
            if len(parts) == 2 and method == "GET":
                return 200, card
            if len(parts) == 2 and method == "DELETE":
                card["status"] = "closed"
                return 200, card
        return 404, {"error": "not found"}


# ---------------------------------------------------------------- one ASGI app, one port


def _consent_page(request: Request) -> Response:
    nxt = request.query_params.get("next", "")
    if not nxt.startswith("http://127.0.0.1:") and not nxt.startswith("http://localhost:"):
        return HTMLResponse("bad redirect", status_code=400)
    client = html.escape(request.query_params.get("client", "a client"))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>AgentCard sandbox</title>"
        f"<meta http-equiv='refresh' content='1;url={html.escape(nxt)}'></head>"
        "<body style='font-family: system-ui; max-width: 40em; margin: 4em auto'>"
        "<h1>AgentCard <em>sandbox</em></h1>"
        f"<p>{html.escape(BANNER)}.</p><p>Approving access for {client} automatically…</p>"
        f"<p><a id='continue' href='{html.escape(nxt)}'>Continue</a></p></body></html>"
    )
    return HTMLResponse(page)


class SandboxApp:
    """Dispatches /api/v1 to the REST API, /sandbox/consent to the page, the rest to the MCP app."""

    def __init__(self, rest: RestApi, mcp_app: ASGIApp) -> None:
        self.rest = rest
        self.mcp_app = mcp_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), tuple(h.encode() for h in SANDBOX_HEADER)]
            await send(message)

        path = scope.get("path", "") if scope["type"] == "http" else ""
        app: ASGIApp = self.mcp_app
        if path.startswith("/api/v1/"):
            app = self.rest
        elif path == "/sandbox/consent":
            app = _consent_page(Request(scope, receive))
        elif path == "/":
            app = JSONResponse({"service": "agentcard-sandbox", "mode": "test", "note": BANNER})
        await app(scope, receive, marked)


@dataclass
class Sandbox:
    base: str
    store: CardStore
    rest: RestApi
    auth: SandboxAuthServer

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
        consent_path="/sandbox/consent" if consent else None,
    )
    rest = RestApi(store, key)
    mcp_app = card_server(store, auth=auth_settings(base), auth_server_provider=auth).streamable_http_app()
    async with serve_asgi(SandboxApp(rest, mcp_app), sock):
        if say is not None:
            say(f"*** {BANNER} ***")
            say(f"REST: {base}/api/v1   MCP: {base}/mcp   (OAuth issuer {base})")
        yield Sandbox(base, store, rest, auth)


async def serve_forever(port: int, say: Say) -> int:
    async with running(port, say=say):
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    return 0
