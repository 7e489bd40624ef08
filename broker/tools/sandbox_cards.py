"""The sandbox's cards: the store, the MCP card tools and the v1 REST endpoints.

Owns: the in-memory cards, each recorded under the sandbox user whose credential created it
(`owner`: an MCP access token's user; on REST, a sandbox access token's user, or the default
user for the `sk_test_` key) and seen only by that user; the MCP tools (list, create, balance,
whoami); the REST endpoints (create, list, get, details, close; AgentCard's `{"error": …}` shapes
and RateLimit headers). Must never: show one user another's cards; accept a key that is not
`sk_test_`; hand out a card number that is not a test number.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from broker.tools.sandbox_auth import DEFAULT_USER, SandboxAuthServer

RATE_LIMIT = 120  # requests per minute per key, like the real API's headers say


@dataclass
class CardStore:
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)

    def create(
        self, spend_limit_cents: int, cardholder_id: str = "ch_sandbox", owner: str = DEFAULT_USER
    ) -> dict[str, Any]:
        cid = "card_" + secrets.token_hex(6)
        card = {
            "id": cid,
            "cardholder_id": cardholder_id,
            "last4": f"{secrets.randbelow(10000):04d}",
            "spend_limit_cents": spend_limit_cents,
            "status": "active",
            "owner": owner,
            "mode": "test",
        }
        self.cards[cid] = card
        return card

    def owned_by(self, owner: str) -> list[dict[str, Any]]:
        return [c for c in self.cards.values() if c["owner"] == owner]

    def get(self, cid: str, owner: str) -> dict[str, Any] | None:
        card = self.cards.get(cid)
        return card if card is not None and card["owner"] == owner else None

    def details(self, cid: str) -> dict[str, Any]:
        """The card's number: a Visa test number, never a real card."""
        number = {"pan": "4242424242424242", "cvv": "123", "exp": "12/30"}
        return {"id": cid, **number, "mode": "test", "last4": self.cards[cid]["last4"]}


# ---------------------------------------------------------------- the MCP server


def _caller() -> str:
    """The sandbox user of the access token this tool call came with."""
    from mcp.server.auth.middleware.auth_context import get_access_token

    tok = get_access_token()
    return (tok.subject if tok is not None else None) or DEFAULT_USER


def card_server(store: CardStore, **kwargs: Any) -> MCPServer:
    mcp = MCPServer("agentcard-sandbox", log_level="WARNING", **kwargs)

    @mcp.tool()
    def list_cards() -> dict[str, Any]:
        """List your sandbox virtual cards."""
        return {"cards": store.owned_by(_caller()), "mode": "test"}

    @mcp.tool()
    def create_card(amount_cents: int, sandbox: bool = True) -> dict[str, Any]:
        """Create a sandbox virtual card with a spend limit in cents."""
        return store.create(amount_cents, owner=_caller())

    @mcp.tool()
    def check_balance() -> dict[str, Any]:
        """Your sandbox wallet's balance."""
        balance = 1_000_000 - sum(c["spend_limit_cents"] for c in store.owned_by(_caller()))
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
    auth: SandboxAuthServer | None = None  # when set, its access tokens are accepted too (their user)
    seen: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=100))
    _hits: dict[str, deque[float]] = field(default_factory=dict)

    def _key(self, request: Request) -> tuple[str, str, str | None]:
        """The request's API key, the user it acts as, and why it is refused (None: it is not)."""
        header = request.headers.get("authorization", "")
        key = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        default = self.auth.subject if self.auth is not None else DEFAULT_USER
        if not key:
            return key, default, "missing API key"
        user = self.auth.user_of(key) if self.auth is not None else None
        if user is not None:
            return key, user, None
        if not key.startswith("sk_test_"):
            return key, default, "the sandbox accepts sk_test_ keys only"
        if self.accepted_key is not None and not secrets.compare_digest(key, self.accepted_key):
            return key, default, "invalid API key"
        return key, default, None

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
        key, user, refused = self._key(request)
        self.seen.append(
            {"method": method, "path": path, "headers": dict(request.headers), "body": body, "user": user}
        )
        headers: dict[str, str] = {}
        if refused:
            status, doc = 401, {"error": refused}
        else:
            headers, over = self._rate(key)
            if over:
                status, doc = 429, {"error": "rate limit exceeded"}
            else:
                status, doc = self._route(method, path, body, user)
        await JSONResponse({**doc, "mode": "test"}, status_code=status, headers=headers)(scope, receive, send)

    def _route(self, method: str, path: str, body: bytes, user: str) -> tuple[int, dict[str, Any]]:
        """The status and the answer (its mode aside) of an /api/v1 request `user` made."""
        parts = [p for p in path.split("/") if p][2:]  # after api/v1
        if parts == ["cards"] and method == "GET":
            return 200, {"cards": self.store.owned_by(user)}
        if parts == ["cards"] and method == "POST":
            try:
                doc = json.loads(body or b"{}")
                limit = int(doc.get("spend_limit_cents", doc.get("amount_cents", 0)))
            except (ValueError, TypeError, AttributeError):
                return 400, {"error": "body must be JSON with spend_limit_cents"}
            if limit <= 0:
                return 400, {"error": "spend_limit_cents must be positive"}
            return 201, self.store.create(limit, str(doc.get("cardholder_id", "ch_sandbox")), user)
        if parts == ["cardholders"] and method == "GET":
            return 200, {"cardholders": [{"id": "ch_sandbox", "name": "Sandbox Holder"}]}
        if len(parts) in (2, 3) and parts[0] == "cards":
            card = self.store.get(parts[1], user)
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
