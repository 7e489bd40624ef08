"""Per-user routes through a running daemon (SPEC "Per-user routes"), end to end.

The platform is an HTTP client holding a client token made by the real `clients add` code; the
end users' browsers are aiohttp clients following the connect link, the form, AgentCard's
authorize endpoint and the callback; AgentCard is the real MCP SDK server behind the sandbox's
OAuth server, whose recorder shows which token each call carried; the agent is also the real
`mcp.Client` (legacy and auto), sending the platform's headers.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from broker import config as config_mod
from broker.auth.oauth.tokens import TokenSet
from broker.auth.platform_clients import add_client
from broker.errors import JSONRPC_URL_ELICITATION
from tests.conftest import Broker, BrokerFactory, raw_http, write_config
from tests.e2e.conftest import free_port
from tests.mcp_upstream import McpUpstream, run_mcp_upstream

MODES = ["legacy", "auto"]
LIST = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
LABEL = 'Alice <alice@example.test> & "co"'
CONNECT_RE = re.compile(r"http://127\.0\.0\.1:\d+/_broker/connect/[A-Za-z0-9_-]{43}")


def call_tool(name: str, rid: int = 1, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }


@dataclass
class Platform:
    """The running broker, its upstream, and what the chat platform holds: its client token."""

    b: Broker
    up: McpUpstream
    token: str
    public_url: str
    state_dir: Path

    def headers(
        self, user: str | None = None, label: str | None = None, token: str | None = None
    ) -> dict[str, str]:
        h = {"Authorization": f"Bearer {self.token if token is None else token}"}
        if user is not None:
            h["X-User-ID"] = user
        if label is not None:
            h["X-User-Email"] = label
        return h

    async def post(self, doc: Any, **kw: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
        kw.setdefault("headers", self.headers("alice"))
        kw["headers"] = {**kw["headers"], "Accept": "application/json, text/event-stream"}
        async with self.b.request("POST", "/mcp", json=doc, **kw) as r:
            return r.status, dict(r.headers), await r.json(content_type=None)

    async def grant_tokens(self, user: str) -> TokenSet | None:
        store = self.b.daemon.rt.state_store
        assert store is not None
        grant = await store.get_grant("mcp", "librechat", user)
        return None if grant is None else TokenSet.from_json(grant.tokens)

    def state_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in sorted(self.state_dir.glob("state.sqlite3*")))


def per_user_doc(up: McpUpstream, port: int, state_dir: Path) -> dict[str, Any]:
    return {
        "listen": [f"127.0.0.1:{port}"],  # known before the start: public_url names it
        "public_url": f"http://127.0.0.1:{port}",
        "allow_insecure_upstream": True,
        "state_dir": str(state_dir),
        "clients": [{"name": "librechat"}],
        "log": {"level": "debug", "format": "json"},
        "timeouts": {"drain": 1},
        "routes": [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": up.mcp_url,
                "auth": {
                    "type": "oauth",
                    "per_user": True,
                    "scopes": ["cards"],
                    "user_header": "X-User-ID",
                    "user_label_header": "X-User-Email",
                },
            }
        ],
    }


@pytest.fixture
async def platform(make_broker: BrokerFactory, tmp_path: Path) -> AsyncIterator[Platform]:
    async with run_mcp_upstream(access_ttl=60) as up:
        port = free_port()
        state_dir = tmp_path / "state"
        doc = per_user_doc(up, port, state_dir)
        cfg = config_mod.load(write_config(tmp_path / "clients.yaml", doc))
        # `clients add librechat`'s own code: it runs its own event loop, so off this one
        lines = await asyncio.to_thread(add_client, cfg, "librechat")
        token = next(line.text for line in lines if not line.to_stderr)
        assert token.startswith("acb_")
        b = await make_broker(doc)
        assert b.port == port
        yield Platform(b, up, token, f"http://127.0.0.1:{port}", state_dir)


async def connect_url_of(p: Platform, user: str, label: str | None = None) -> str:
    status, headers, body = await p.post(LIST, headers=p.headers(user, label))
    assert status == 403, body
    assert headers["X-Broker-Error"] == "needs_connect"
    url = body["error"]["data"]["elicitations"][0]["url"]
    assert isinstance(url, str)
    return url


async def browser_connect(
    p: Platform, connect_url: str, *, forge_state: str | None = None
) -> tuple[int, str, str]:
    """What the end user's browser does with the link: the page, its form, AgentCard's authorize
    (which approves by itself), then the callback. Returns (callback status, its page, the
    connect page)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(
            connect_url, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
        ) as r:
            assert r.status == 200, await r.text()
            page = await r.text()
        action = html.unescape(re.search(r"<form method='post' action='([^']+)'", page)[1])  # type: ignore[index]
        connect_id = html.unescape(re.search(r"name='connect_id' value='([^']+)'", page)[1])  # type: ignore[index]
        async with s.post(
            action,
            data={"connect_id": connect_id},
            headers={"Origin": p.public_url, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303, await r.text()
            authorize = r.headers["Location"]
        assert authorize.startswith(f"{p.up.base}/authorize?")
        q = parse_qs(urlsplit(authorize).query)
        assert q["code_challenge_method"] == ["S256"] and q["resource"] == [p.up.mcp_url]
        assert q["redirect_uri"] == [f"{p.public_url}/_broker/callback"]
        async with s.get(authorize, allow_redirects=False) as r:  # the sandbox's consent: approved
            assert r.status == 302, await r.text()
            callback = r.headers["Location"]
        assert callback.startswith(f"{p.public_url}/_broker/callback?")
        if forge_state is not None:
            parts = urlsplit(callback)
            qs = {k: v[0] for k, v in parse_qs(parts.query).items()}
            # "TAG.x": this route's tag (the part before the dot) kept, the rest forged
            tag = qs["state"].partition(".")[0]
            qs["state"] = forge_state.replace("TAG", tag)
            callback = parts._replace(query="&".join(f"{k}={v}" for k, v in qs.items())).geturl()
        async with s.get(callback, allow_redirects=False) as r:
            return r.status, await r.text(), page


def mcp_client(p: Platform, mode: str, user: str, label: str | None = None) -> Client:
    """The agent inside the platform: the MCP SDK's client, sending the platform's headers."""
    http = httpx2.AsyncClient(headers=p.headers(user, label), timeout=10)
    return Client(streamable_http_client(f"{p.b.url}/mcp", http_client=http), mode=mode)


# ---------------------------------------------------------------- who is asking


async def test_no_or_wrong_client_token_and_bad_user_ids_reach_nothing(platform: Platform) -> None:
    p = platform
    refused = (
        {"X-User-ID": "alice"},  # no token
        p.headers("alice", token="acb_" + "x" * 43),  # a token never made
        p.headers("alice", token=p.token[:-1]),  # almost the token
        {**p.headers("alice"), "Authorization": p.token},  # the token, not as Bearer
    )
    for headers in refused:
        status, h, body = await p.post(LIST, headers=headers)
        assert status == 403, body
        assert h["X-Broker-Error"] == "client_unauthorized"
        assert body["id"] == 7 and body["error"]["data"]["code"] == "client_unauthorized"
        assert p.token not in json.dumps(body)
    async with p.b.request("GET", "/mcp/x", headers={"X-User-ID": "alice"}) as r:  # REST shape
        assert r.status == 403
        assert (await r.json())["error"]["code"] == "client_unauthorized"

    for user in (None, "", "a" * 257, "a" * 300, "al\tice"):  # (HTTP strips edge whitespace itself)
        headers = p.headers()
        if user is not None:
            headers["X-User-ID"] = user
        status, h, body = await p.post(LIST, headers=headers)
        assert status == 400, (user, body)
        assert h["X-Broker-Error"] == "user_required"
        assert body["error"]["data"]["code"] == "user_required"
    for raw_user in (b"al\x01ice", b"al\x7fice", b"al\x1bice"):  # aiohttp's client will not send them
        payload = json.dumps(LIST).encode()
        answer = await raw_http(p.b.port, b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
            b"Authorization: Bearer %s\r\nX-User-ID: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (p.b.port, p.token.encode(), raw_user, len(payload), payload))  # fmt: skip
        head, _, raw_body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer
        # refused as malformed HTTP before the route is even looked at; a tab (legal HTTP) is
        # the control character that gets as far as the user check, above
        assert json.loads(raw_body)["error"]["code"] == "bad_request", answer
    status, _, body = await p.post(LIST, headers={**p.headers(), "X-User-ID": "a" * 256})
    assert body["error"]["data"]["code"] == "needs_connect"  # 256 is still an id
    assert p.up.recorder.calls == {}  # AgentCard saw nothing at all
    store = p.b.daemon.rt.state_store
    assert store is not None and await store.list_grants("mcp") == []


# ---------------------------------------------------------------- a user with no grant


async def test_unconnected_user_is_sent_a_connect_link(platform: Platform) -> None:
    p = platform
    status, h, body = await p.post(LIST, headers=p.headers("alice", LABEL))
    assert status == 403
    assert h["X-Broker-Error"] == "needs_connect"
    assert body["id"] == 7
    err = body["error"]
    assert err["code"] == JSONRPC_URL_ELICITATION == -32042
    (elicitation,) = err["data"]["elicitations"]
    url = elicitation["url"]
    assert CONNECT_RE.fullmatch(url) and url.startswith(f"{p.public_url}/_broker/connect/")
    assert elicitation["mode"] == "url"
    assert elicitation["elicitationId"] == url.rsplit("/", 1)[1]
    assert url in err["message"] and url in elicitation["message"]

    # each ask gets a fresh link
    assert await connect_url_of(p, "alice") != url

    async with p.b.request("GET", "/mcp/cards", headers=p.headers("bob")) as r:  # REST shape
        assert r.status == 403
        assert r.headers["X-Broker-Error"] == "needs_connect"
        rest = (await r.json())["error"]
    assert rest["code"] == "needs_connect"
    assert CONNECT_RE.fullmatch(rest["connect_url"]) and rest["connect_url"] in rest["message"]
    assert p.up.recorder.calls == {}


@pytest.mark.parametrize("mode", MODES)
async def test_mcp_client_sees_the_connect_link(platform: Platform, mode: str) -> None:
    p = platform
    with pytest.raises(BaseException) as info:  # the SDK may wrap it in a group
        async with mcp_client(p, mode, "alice") as agent:
            await agent.list_tools()
    errors = [info.value]
    if isinstance(info.value, BaseExceptionGroup):
        errors = list(_leaves(info.value))
    mcp_errors = [e for e in errors if isinstance(e, MCPError)]
    assert mcp_errors, errors
    said = " ".join(str(e) for e in mcp_errors)
    assert CONNECT_RE.search(said), said
    assert any(e.error.code == JSONRPC_URL_ELICITATION for e in mcp_errors)
    assert p.up.recorder.calls == {}


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out += _leaves(e) if isinstance(e, BaseExceptionGroup) else [e]
    return out


# ---------------------------------------------------------------- connecting, and using the grant


async def test_two_users_connect_and_each_call_carries_only_their_token(platform: Platform) -> None:
    p = platform
    pages: dict[str, str] = {}
    for user, label in (("alice", LABEL), ("bob", None)):
        status, page, pages[user] = await browser_connect(p, await connect_url_of(p, user, label))
        assert status == 200, page
        assert "Connected" in page and "librechat" in page
    # the connect page names the platform and the user's label, escaped; bob has no label: his id
    assert html.escape(LABEL) in pages["alice"] and LABEL not in pages["alice"]
    assert "librechat asks to use AgentCard on your behalf, as bob." in pages["bob"]
    assert p.up.recorder.grants["authorization_code"] == 2
    assert p.up.recorder.calls[("POST", "/register")] == 1  # one registration for every user

    alice, bob = await p.grant_tokens("alice"), await p.grant_tokens("bob")
    assert alice is not None and bob is not None
    assert alice.access_token != bob.access_token and alice.refresh_token != bob.refresh_token
    assert {alice.access_token, bob.access_token} <= set(p.up.provider.access_tokens)

    seen = p.up.recorder.mcp_headers
    # the real MCP client, in both modes, each user in turn (and back again)
    for mode in MODES:
        for user, tokens in (("alice", alice), ("bob", bob), ("alice", alice)):
            before = len(seen)
            async with mcp_client(p, mode, user, f"{user}@example.test") as agent:
                tools = await agent.list_tools()
                assert {t.name for t in tools.tools} >= {"list_cards", "whoami"}
                result = await agent.call_tool("create_card", {"amount_cents": 100})
                assert not result.is_error
                assert result.structured_content["amount_cents"] == 100
            mine = seen[before:]
            assert mine and {x.get("authorization") for x in mine} == {f"Bearer {tokens.access_token}"}
    for headers in seen:  # what the platform sent for the broker never went on to AgentCard
        assert not {"x-user-id", "x-user-email"} & set(headers), headers
        assert all(p.token not in v and p.token[4:] not in v for v in headers.values())

    # AgentCard revokes alice's grant: her next call asks her to connect again; bob keeps working
    await p.up.provider.revoke_token(p.up.provider.access_tokens[alice.access_token])
    assert alice.refresh_token not in p.up.provider.refresh_tokens
    status, h, body = await p.post(call_tool("list_cards", 9), headers=p.headers("alice"))
    assert status == 403, body
    assert h["X-Broker-Error"] == "needs_connect"
    assert body["id"] == 9 and body["error"]["code"] == JSONRPC_URL_ELICITATION
    assert CONNECT_RE.fullmatch(body["error"]["data"]["elicitations"][0]["url"])
    status, h, body = await p.post(call_tool("list_cards", 10), headers=p.headers("alice"))
    assert status == 403 and body["error"]["data"]["code"] == "needs_connect"
    async with mcp_client(p, "auto", "bob") as agent:
        assert not (await agent.call_tool("list_cards", {})).is_error
    assert seen[-1]["authorization"] == f"Bearer {bob.access_token}"

    async with p.b.request("GET", "/_broker/status") as r:
        assert r.status == 200
        raw = await r.text()
    (route,) = json.loads(raw)["routes"]
    assert route["name"] == "mcp" and route["state"] == "per_user"
    assert route["users"] == {"active": 1, "dead": 1}
    for secret in ("alice", "bob", "example.test", p.token, alice.access_token, bob.access_token):
        assert secret not in raw

    calls = [e for e in p.b.log_events() if e.get("route") == "mcp" and e.get("status") == 200]
    assert calls, p.b.logs[-2000:]
    assert {(e.get("client"), e.get("user")) for e in calls} == {("librechat", "alice"), ("librechat", "bob")}
    refused = [e for e in p.b.log_events() if e.get("error") == "needs_connect"]
    assert {(e.get("client"), e.get("user")) for e in refused} == {
        ("librechat", "alice"),
        ("librechat", "bob"),
    }
    assert [e.get("user") for e in refused[-2:]] == ["alice", "alice"]  # the two after the revocation

    # nothing of any token in the state file, nor in the logs
    kept = p.state_bytes()
    assert kept
    for tokens in (alice, bob):
        for held in (tokens.access_token, tokens.refresh_token):
            assert held is not None
            assert held.encode() not in kept and held[3:].encode() not in kept
            assert held not in p.b.logs
    assert p.token.encode() not in kept and p.token[4:].encode() not in kept


async def test_status_counts_users_before_anyone_failed(platform: Platform) -> None:
    p = platform
    async with p.b.request("GET", "/_broker/status") as r:
        assert (await r.json())["routes"][0]["users"] == {}
    for user in ("alice", "bob"):
        status, page, _ = await browser_connect(p, await connect_url_of(p, user))
        assert status == 200, page
    async with p.b.request("GET", "/_broker/status") as r:
        route = (await r.json())["routes"][0]
    assert route["state"] == "per_user" and route["users"] == {"active": 2}


async def test_a_used_link_and_a_forged_state_store_nothing(platform: Platform) -> None:
    p = platform
    store = p.b.daemon.rt.state_store
    assert store is not None
    for forged in ("0123456789ab.forged", "TAG.forged", "TAG", ""):  # another route's; ours, made up
        status, page, _ = await browser_connect(p, await connect_url_of(p, "alice"), forge_state=forged)
        assert status == 400, page
        assert "Sign-in failed" in page
        assert await store.list_grants("mcp") == []
    url = await connect_url_of(p, "alice")
    status, page, _ = await browser_connect(p, url, forge_state="TAG.x")
    assert status == 400, page

    async with aiohttp.ClientSession() as s:  # the link was used by the attempt above
        async with s.get(url) as r:
            assert r.status == 410
            assert "no longer works" in await r.text()
        async with s.post(
            url, data={"connect_id": url.rsplit("/", 1)[1]}, headers={"Origin": p.public_url}
        ) as r:
            assert r.status == 410
        # a wrong Origin is refused before the link is even taken
        fresh = await connect_url_of(p, "bob")
        async with s.post(fresh, data={"connect_id": fresh.rsplit("/", 1)[1]},
                          headers={"Origin": "http://evil.example"}, allow_redirects=False) as r:  # fmt: skip
            assert r.status == 403
        async with s.get(fresh) as r:
            assert r.status == 200  # still usable
        async with s.get(f"{p.public_url}/_broker/callback", params={"state": "nope", "code": "x"}) as r:
            assert r.status == 400
    assert await store.list_grants("mcp") == []
    assert p.up.recorder.grants["authorization_code"] == 0  # no code was ever exchanged

    # the same link a second time, after a good connect: 410, and the grant is the first one
    url = await connect_url_of(p, "carol")
    status, page, _ = await browser_connect(p, url)
    assert status == 200, page
    first = await p.grant_tokens("carol")
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 410
    assert await p.grant_tokens("carol") == first
    assert [g.user for g in await store.list_grants("mcp")] == ["carol"]


# ---------------------------------------------------------------- policies count per end user


async def test_budget_and_rate_count_per_end_user(make_broker: BrokerFactory, tmp_path: Path) -> None:
    async with run_mcp_upstream(access_ttl=60) as up:
        port = free_port()
        doc = per_user_doc(up, port, tmp_path / "state")
        doc["routes"][0]["policy"] = {
            "budget": {"amount_cents": 1000, "per": "24h"},
            "rate": {"requests": 30, "per": "1m"},
        }
        cfg = config_mod.load(write_config(tmp_path / "clients.yaml", doc))
        lines = await asyncio.to_thread(add_client, cfg, "librechat")
        token = next(line.text for line in lines if not line.to_stderr)
        p = Platform(await make_broker(doc), up, token, f"http://127.0.0.1:{port}", tmp_path / "state")
        for user in ("alice", "bob"):
            status, page, _ = await browser_connect(p, await connect_url_of(p, user))
            assert status == 200, page
        # each user has the whole budget: alice spends 800, then 300 more is over hers, not bob's
        async with mcp_client(p, "auto", "alice") as agent:
            assert not (await agent.call_tool("create_card", {"amount_cents": 800})).is_error
            with pytest.raises(MCPError) as refused:
                await agent.call_tool("create_card", {"amount_cents": 300})
        assert "budget" in str(refused.value)
        async with mcp_client(p, "auto", "bob") as agent:
            assert not (await agent.call_tool("create_card", {"amount_cents": 800})).is_error
        # and their own rate: alice runs out of requests, bob does not
        for _ in range(40):
            status, h, _body = await p.post(LIST, headers=p.headers("alice"))
            if status == 429:
                break
        assert (status, h["X-Broker-Error"]) == (429, "rate_limited")
        status, h, _ = await p.post(LIST, headers=p.headers("bob"))
        assert h.get("X-Broker-Error") != "rate_limited"
