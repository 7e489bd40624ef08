"""Attacks and odd upstreams found in review: each was a leak, a bypass or a crash once."""

from __future__ import annotations

import asyncio
import gzip
import json

import keyring
from aiohttp import web

from tests.conftest import (
    TEST_KEY,
    BrokerFactory,
    Upstream,
    api_config,
    assert_no_secret,
    raw_http,
    store_key,
)
from tests.test_policy import with_policy

TOOLS = [
    {"name": n, "inputSchema": {"type": "object"}} for n in ("list_cards", "withdraw_wallet", "create_card")
]


async def test_reason_phrase_and_unknown_encodings_never_carry_the_key(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)

    async def reason(request: web.Request) -> web.Response:
        return web.Response(status=403, reason=f"Bad key {request.headers['Authorization'][7:]}", text="no")

    async def double_gzip(request: web.Request) -> web.Response:
        body = gzip.compress(gzip.compress(request.headers["Authorization"].encode()))
        return web.Response(status=400, body=body, headers={"Content-Encoding": "gzip, gzip"})

    upstream.handlers.update({"/reason": reason, "/gz2": double_gzip})
    b = await make_broker(api_config(upstream.url))
    resp = await raw_http(b.port, f"GET /reason HTTP/1.1\r\nHost: 127.0.0.1:{b.port}\r\n\r\n".encode())
    assert resp.startswith(b"HTTP/1.1 403 Forbidden\r\n")
    assert_no_secret(resp)
    async with b.request("GET", "/gz2") as r:
        assert r.status == 502
        assert "Content-Encoding" in (await r.json())["error"]["message"]


async def test_token_endpoint_echo_never_reaches_agent_or_status(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    secret = "acs_FAKEclientSecret0123456789abcdef"

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"error": f"invalid_client {secret}"}, status=401)

    upstream.handlers["/oauth/token"] = token
    keyring.set_password("agentcard-broker", "platform:client_secret", secret)
    route = {
        "name": "platform", "prefix": "/", "upstream": upstream.url,
        "auth": {"type": "client_credentials", "token_url": upstream.url + "/oauth/token", "client_id": "c1"},
    }  # fmt: skip
    b = await make_broker(api_config(upstream.url, routes=[route]))
    async with b.request("GET", "/x") as r:
        body = await r.read()
        assert r.status == 503
    async with b.request("GET", "/_broker/status") as r:
        status = await r.read()
    assert secret not in body.decode() and secret not in status.decode()
    assert secret[4:] not in body.decode() + status.decode()


async def test_tools_list_filtered_when_the_answer_comes_in_pieces(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)

    async def sse_with_priming(request: web.Request) -> web.StreamResponse:
        msg = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": priming\n\n")
        await asyncio.sleep(0.1)
        answer = {"jsonrpc": "2.0", "id": 1 if msg["id"] == 1.0 else msg["id"], "result": {"tools": TOOLS}}
        data = json.dumps(answer).encode()
        await resp.write(b"event: message\ndata: " + data[:40])
        await asyncio.sleep(0.1)
        await resp.write(data[40:] + b"\n\n")
        await resp.write_eof()
        return resp

    upstream.handlers["/mcp"] = sse_with_priming
    upstream.streaming.add("/mcp")
    b = await make_broker(with_policy(upstream, {"tools": {"deny": ["withdraw_wallet"]}}))
    for rid in (7, 1.0):  # 1.0: an id the upstream echoes as 1
        req = {"jsonrpc": "2.0", "id": rid, "method": "tools/list"}
        async with b.request("POST", "/mcp", json=req) as r:
            raw = await r.read()
        assert b"list_cards" in raw and b"create_card" in raw
        assert b"withdraw_wallet" not in raw


async def test_policy_reads_only_plain_json_bodies_and_no_query_amounts(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(with_policy(upstream, {"max_amount_cents": 5000}))
    refused = [
        ({"Content-Type": "application/x-www-form-urlencoded"}, b'{"a":"&amount_cents=999999&"}', ""),
        ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, gzip.compress(b"{}"), ""),
        ({"Content-Type": "application/json"}, b"{}", "?amount_cents=999999"),
        ({"Content-Type": "application/json"}, b'{"Amount_Cents": 999999}', ""),
        ({"Content-Type": "application/json"}, b'{"amount_cents": 1' + b"0" * 400 + b"}", ""),
    ]
    for headers, body, query in refused:
        async with b.request("POST", "/api/v1/cards" + query, data=body, headers=headers) as r:
            assert r.status == 403, (headers, body[:40], query)
            assert r.headers["X-Broker-Error"] == "policy_denied"
    assert upstream.seen == []


async def test_encoded_slashes_refused_where_path_rules_apply(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    rules = {"allow": ["GET /api/v1/cards/*"], "deny": ["GET /api/v1/cards/*/details"]}
    b = await make_broker(with_policy(upstream, rules))
    for path in ("/api/v1/cards/c1%2Fdetails", "/api/v1/cards/c1%5cdetails"):
        async with b.request("GET", path) as r:
            assert r.status == 403, path
    async with b.request("GET", "/api/v1/cards/c1") as r:
        assert r.status == 200
    assert [s.raw_path for s in upstream.seen] == ["/api/v1/cards/c1"]


async def test_reserved_paths_are_matched_after_normalization(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url))
    expected = {
        "/%5Fbroker/status": b"HTTP/1.1 200",  # the broker's own status, not forwarded
        "/_broker?x=1": b"HTTP/1.1 404",
        "/%2Ewell-known/oauth-authorization-server": b"HTTP/1.1 404",
        "/.well-known/oauth%2Dprotected-resource": b"HTTP/1.1 404",
    }
    for path, status in expected.items():
        resp = await raw_http(b.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{b.port}\r\n\r\n".encode())
        assert resp.startswith(status), (path, resp[:60])
        if status.endswith(b"404"):
            assert b"X-Broker-Error: not_found" in resp
    assert upstream.seen == []


async def test_deeply_nested_json_gets_a_clean_error(make_broker: BrokerFactory, upstream: Upstream) -> None:
    b = await make_broker(api_config(upstream.url))  # no key stored: the broker answers itself
    async with b.request(
        "POST", "/x", data=b"[" * 200_000, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "no_credential"


async def test_require_test_mode_fails_closed_when_the_mode_is_unknown(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    keyring.set_password("agentcard-broker", "platform:client_secret", "acs_FAKEclientSecret0123456789abcdef")
    route = {
        "name": "platform", "prefix": "/", "upstream": upstream.url, "policy": {"require_test_mode": True},
        "auth": {"type": "client_credentials", "token_url": upstream.url + "/oauth/token", "client_id": "c1"},
    }  # fmt: skip
    b = await make_broker(api_config(upstream.url, routes=[route]))
    async with b.request("GET", "/api/v1/cards") as r:
        assert r.status == 403
        assert "cannot tell test from live" in (await r.json())["error"]["message"]
    assert upstream.seen == []


async def test_budget_kept_when_the_upstream_may_have_acted(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.json_response({"ok": True})

    upstream.handlers["/api/v1/cards"] = slow
    doc = with_policy(upstream, {"budget": {"amount_cents": 1000, "per": "1h"}}, timeouts={"first_byte": 0.2})
    b = await make_broker(doc)
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 600}) as r:
        assert r.status == 504  # no answer in time: the card may exist all the same
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 600}) as r:
        assert r.status == 403
    async with b.request("GET", "/_broker/status") as r:
        assert (await r.json())["routes"][0]["budget"]["used"] == 600
