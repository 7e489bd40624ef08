"""Peers for the replica tests: a strict AgentCard stand-in and three broker replicas on Redis.

The authorization server is the sandbox's (the MCP SDK's OAuth server) made strict as
AgentCard's is: a refresh token is single use, and presenting a used one revokes the whole
grant (every token descended from that sign-in). Its token endpoint can be made slow; a token
request whose client went away during that delay is dropped before anything rotates (as a
token endpoint whose transaction never commits). The replicas are `agentcard-broker run`
subprocesses sharing one real redis-server. Everything is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from mcp.server.auth.provider import AccessToken, AuthorizationCode, RefreshToken, TokenError
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker import config as config_mod
from broker.auth.platform_clients import add_client
from broker.tools.sandbox import SandboxAuthServer, auth_settings, loopback_socket, serve_asgi
from tests.conftest import write_config
from tests.e2e.conftest import DaemonProc, free_port
from tests.mcp_upstream import Recorder, build_server
from tests.redis_server import RedisServer

LIST = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
MCP_ACCEPT = "application/json, text/event-stream"


@dataclass
class StrictProvider(SandboxAuthServer):
    """Single-use refresh tokens whose reuse revokes the grant; refreshes recorded per grant."""

    family: dict[str, int] = field(default_factory=dict)  # token -> the sign-in it descends from
    used: dict[str, int] = field(default_factory=dict)  # spent refresh tokens -> their sign-in
    refreshed_at: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    reuses: int = 0
    revoked_families: set[int] = field(default_factory=set)
    _next_family: int = 0

    async def exchange_authorization_code(
        self, client: OAuthClientInformationFull, authorization_code: AuthorizationCode
    ) -> OAuthToken:
        token = await super().exchange_authorization_code(client, authorization_code)
        self._next_family += 1
        self._mark(token, self._next_family)
        return token

    async def load_refresh_token(self, client: OAuthClientInformationFull, refresh_token: str) -> Any:
        if refresh_token in self.used:  # reuse: the grant is compromised, all of it ends
            fam = self.used[refresh_token]
            self.reuses += 1
            self.revoked_families.add(fam)
            for tok in [t for t, f in self.family.items() if f == fam]:
                self.access_tokens.pop(tok, None)
                self.refresh_tokens.pop(tok, None)
            return None  # the SDK answers invalid_grant
        return await super().load_refresh_token(client, refresh_token)

    async def exchange_refresh_token(
        self, client: OAuthClientInformationFull, refresh_token: RefreshToken, scopes: list[str]
    ) -> OAuthToken:
        fam = self.family.get(refresh_token.token)
        if fam is None or fam in self.revoked_families:
            raise TokenError(error="invalid_grant", error_description="grant revoked")
        token = await super().exchange_refresh_token(client, refresh_token, scopes)
        self.used[refresh_token.token] = fam
        self.refreshed_at[fam].append(time.monotonic())
        self._mark(token, fam)
        return token

    def _mark(self, token: OAuthToken, fam: int) -> None:
        self.family[token.access_token] = fam
        if token.refresh_token:
            self.family[token.refresh_token] = fam

    def family_of_access(self, access: AccessToken | str) -> int | None:
        return self.family.get(access if isinstance(access, str) else access.token)


class SlowTokens:
    """ASGI middleware: with `delay` set, a POST /token is held that long before the server sees
    it; if its client disconnects meanwhile, it is dropped unseen. `arrived` is set per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.delay = 0.0
        self.arrived = asyncio.Event()
        self.dropped = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/token" or self.delay <= 0:
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        while True:
            m = await receive()
            messages.append(m)
            if m["type"] != "http.request" or not m.get("more_body"):
                break
        self.arrived.set()
        try:
            gone = await asyncio.wait_for(receive(), self.delay)  # only a disconnect comes now
        except TimeoutError:
            gone = None
        if gone is not None and gone["type"] == "http.disconnect":
            self.dropped += 1
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        await self.app(scope, replay, send)


@dataclass
class StrictUpstream:
    base: str
    provider: StrictProvider
    recorder: Recorder
    slow: SlowTokens

    @property
    def mcp_url(self) -> str:
        return f"{self.base}/mcp"


@contextlib.asynccontextmanager
async def run_strict_upstream(access_ttl: int) -> AsyncIterator[StrictUpstream]:
    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    provider = StrictProvider(
        access_ttl=access_ttl, expected_resource=f"{base}/mcp", subject="u@example.test"
    )
    server = build_server(auth=auth_settings(base), auth_server_provider=provider)
    slow = SlowTokens(server.streamable_http_app(stateless_http=True, json_response=True))
    recorder = Recorder(slow)
    async with serve_asgi(recorder, sock):
        yield StrictUpstream(base, provider, recorder, slow)


@dataclass
class Replicas:
    """Three `agentcard-broker run` processes on one Redis, and the platform's client token."""

    procs: list[DaemonProc]
    redis: RedisServer
    up: StrictUpstream
    token: str
    public_url: str

    def headers(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "X-User-ID": user, "Accept": MCP_ACCEPT}

    async def post(
        self, s: aiohttp.ClientSession, i: int, user: str, doc: Any = LIST, path: str = "/mcp"
    ) -> tuple[int, dict[str, str], Any]:
        async with s.post(self.procs[i].url + path, json=doc, headers=self.headers(user)) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)


def replica_doc(
    up_url: str, redis_url: str, public_url: str, state_dir: Path, routes: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "public_url": public_url,
        "allow_insecure_upstream": True,
        "state_dir": str(state_dir),
        "store": redis_url,
        "clients": [{"name": "librechat"}],
        "log": {"level": "info", "format": "json"},
        "timeouts": {"drain": 1},
        "routes": routes
        or [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": up_url,
                "auth": {"type": "oauth", "per_user": True, "scopes": ["cards"], "user_header": "X-User-ID"},
            }
        ],
    }


@contextlib.asynccontextmanager
async def run_replicas(
    tmp_path: Path, redis: RedisServer, up: StrictUpstream, routes: list[dict[str, Any]] | None = None
) -> AsyncIterator[Replicas]:
    ports = [free_port() for _ in range(3)]
    public_url = f"http://127.0.0.1:{ports[0]}"
    procs = []
    for i, port in enumerate(ports):
        doc = replica_doc(up.mcp_url, redis.url, public_url, tmp_path / f"state{i}", routes)
        doc["listen"] = [f"127.0.0.1:{port}"]
        procs.append(DaemonProc(write_config(tmp_path / f"replica{i}.yaml", doc), port))
    # `clients add`'s own code, against the shared store (it runs its own event loop)
    cfg = config_mod.load(procs[0].config)
    lines = await asyncio.to_thread(add_client, cfg, "librechat")
    token = next(line.text for line in lines if not line.to_stderr)
    try:
        await asyncio.gather(*(p.start() for p in procs))
        yield Replicas(procs, redis, up, token, public_url)
    finally:
        await asyncio.gather(*(p.stop() for p in procs))


async def connect_user(r: Replicas, user: str, via: tuple[int, int, int]) -> None:
    """The user's first call on replica via[0] gives the link; the browser opens it on replica
    via[1] (as a load balancer may route it), posts the form there, AgentCard redirects to the
    callback, which lands on replica via[2]."""
    async with aiohttp.ClientSession() as s:
        status, headers, body = await r.post(s, via[0], user)
        assert status == 403 and headers["X-Broker-Error"] == "needs_connect", body
        link = body["error"]["data"]["elicitations"][0]["url"]
        assert link.startswith(r.public_url + "/_broker/connect/")
        opened = r.procs[via[1]].url + urlsplit(link).path
        async with s.get(
            opened, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        ) as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.text()
        connect_id = html.unescape(re.search(r"name='connect_id' value='([^']+)'", page)[1])  # type: ignore[index]
        action = urlsplit(html.unescape(re.search(r"<form method='post' action='([^']+)'", page)[1]))  # type: ignore[index]
        async with s.post(
            r.procs[via[1]].url + action.path,
            data={"connect_id": connect_id},
            headers={"Origin": r.public_url, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 303, await resp.text()
            authorize = resp.headers["Location"]
        async with s.get(authorize, allow_redirects=False) as resp:
            assert resp.status == 302, await resp.text()
            callback = urlsplit(resp.headers["Location"])
        assert parse_qs(callback.query).get("code")
        async with s.get(
            f"{r.procs[via[2]].url}{callback.path}?{callback.query}",
            headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 200, await resp.text()


def refresh_counts(up: StrictUpstream) -> Counter[int]:
    return Counter({fam: len(times) for fam, times in up.provider.refreshed_at.items()})
