"""`card_data: redact` through a running broker: real upstreams on 127.0.0.1 (aiohttp, the MCP
SDK's server) and real agents (aiohttp, `mcp.Client` in both modes). Every answer of the route,
streamed or whole, any status, reaches the agent with card numbers masked to their last 4 and
CVV/expiry values blanked; a route with `card_data: allow` passes them as they came."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from mcp import Client

from broker.body import RequestBody
from broker.hooks import Call, Verdict
from broker.pipeline import register_hooks
from broker.policy.card_data import mask_whole
from broker.proxy import WHOLE_LIMIT
from broker.tools.sandbox import loopback_socket, serve_asgi
from tests.conftest import TEST_KEY, BrokerFactory, Upstream, api_config, assert_no_secret, store_key
from tests.mcp_upstream import build_server

VISA = "4242424242424242"
CARD = {"id": "c1", "number": VISA, "cvc": "123", "exp_month": 12, "exp_year": 2030, "amount_cents": 500}
MASKED = {**CARD, "number": "************4242", "cvc": "", "exp_month": None, "exp_year": None}


def route_config(upstream_url: str, policy: dict[str, Any], prefix: str = "/") -> dict[str, Any]:
    route = {"name": "api", "prefix": prefix, "upstream": upstream_url, "auth": {"type": "api_key"}}
    return api_config(upstream_url, routes=[{**route, "policy": policy}], timeouts={"drain": 1})


async def test_a_number_split_across_sse_chunks_shows_only_its_last_four(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    agent_has_first_event = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'event: message\ndata: {"seq": 1}\n\ndata: {"card": "4242 4242 ')
        # the first event must reach the agent while the number's second half is not yet sent
        await asyncio.wait_for(agent_has_first_event.wait(), 5)
        await asyncio.sleep(0.05)
        await resp.write(b'4242 4242", "CVC": "123"}\n\n')
        await resp.write_eof()
        return resp

    upstream.handlers["/api/v1/cards/c1/details"] = handler
    b = await make_broker(route_config(upstream.url, {"card_data": "redact"}))
    async with b.request("GET", "/api/v1/cards/c1/details") as r:
        assert r.status == 200
        first = await r.content.readuntil(b"\n\n")
        agent_has_first_event.set()
        rest = await r.read()
    assert first == b'event: message\ndata: {"seq": 1}\n\n'
    assert rest == b'data: {"card": "**** **** **** 4242", "CVC": ""}\n\n'
    assert [(s.method, s.body) for s in upstream.seen] == [("GET", b"")]


async def test_a_whole_json_answer_is_masked_and_its_length_recounted(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)

    async def details(request: web.Request) -> web.StreamResponse:
        return web.json_response(CARD)

    async def missing(request: web.Request) -> web.StreamResponse:  # an error echoing card data
        return web.json_response({"error": f"no card {VISA}", "cvv": "999"}, status=404)

    upstream.handlers["/api/v1/cards/c1/details"] = details
    upstream.handlers["/api/v1/cards/c2/details"] = missing
    b = await make_broker(route_config(upstream.url, {"card_data": "redact"}))
    async with b.request("GET", "/api/v1/cards/c1/details") as r:
        assert r.status == 200
        body = await r.read()
        assert int(r.headers["Content-Length"]) == len(body) < len(json.dumps(CARD))
    assert json.loads(body) == MASKED
    async with b.request("GET", "/api/v1/cards/c2/details") as r:
        assert r.status == 404
        body = await r.read()
        assert int(r.headers["Content-Length"]) == len(body)
    assert json.loads(body) == {"error": "no card ************4242", "cvv": ""}


async def test_a_large_answer_with_a_content_length_streams_chunked_and_masked(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    cards = [{**CARD, "id": f"c{i}", "note": "x" * 200} for i in range(WHOLE_LIMIT // 200)]
    raw = json.dumps(cards).encode()
    assert len(raw) > WHOLE_LIMIT  # not read whole: streamed as it comes

    async def listing(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, content_type="application/json")

    upstream.handlers["/api/v1/cards"] = listing
    b = await make_broker(route_config(upstream.url, {"card_data": "redact"}))
    async with b.request("GET", "/api/v1/cards") as r:
        assert r.status == 200
        assert "Content-Length" not in r.headers and r.headers["Transfer-Encoding"] == "chunked"
        body = await r.read()
    assert body == mask_whole(raw)
    assert json.loads(body)[7] == {**MASKED, "id": "c7", "note": "x" * 200}
    assert VISA.encode() not in body


async def test_redact_also_applies_where_other_rules_read_the_body(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)

    async def create(request: web.Request) -> web.StreamResponse:
        return web.json_response(CARD, status=201)

    upstream.handlers["/api/v1/cards"] = create
    policy = {"card_data": "redact", "max_amount_cents": 5000, "budget": {"amount_cents": 600, "per": "1h"}}
    b = await make_broker(route_config(upstream.url, policy))
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 500}) as r:
        assert r.status == 201
        assert json.loads(await r.read()) == MASKED
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 500}) as r:
        assert r.status == 403  # the budget still counts what was let through
    assert [s.body for s in upstream.seen] == [b'{"amount_cents": 500}']


async def test_card_data_allow_passes_the_answer_untouched(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    raw = json.dumps(CARD).encode()

    async def details(request: web.Request) -> web.StreamResponse:
        return web.Response(body=raw, content_type="application/json")

    upstream.handlers["/api/v1/cards/c1/details"] = details
    b = await make_broker(
        route_config(upstream.url, {"card_data": "allow", "rate": {"requests": 9, "per": "1m"}})
    )
    async with b.request("GET", "/api/v1/cards/c1/details") as r:
        assert r.status == 200
        assert await r.read() == raw
        assert r.headers["Content-Length"] == str(len(raw))


class HoldLastUpper:
    """A transform that keeps back each chunk's last byte and upper-cases what it lets go."""

    def __init__(self) -> None:
        self.held = b""
        self.seen: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        self.seen.append(chunk)
        data, self.held = self.held + chunk, b""
        data, self.held = data[:-1], data[-1:]
        return data.upper()

    def flush(self) -> bytes:
        out, self.held = self.held.upper(), b""
        return out


class Ending:
    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b"END"


@pytest.mark.parametrize("streamed", [False, True])
async def test_answer_transforms_of_several_hooks_run_in_order_after_the_scrubber(
    make_broker: BrokerFactory, upstream: Upstream, streamed: bool
) -> None:
    store_key(TEST_KEY)
    made: list[HoldLastUpper] = []

    def upper() -> HoldLastUpper:
        made.append(HoldLastUpper())
        return made[-1]

    class First:
        async def request(self, call: Call, body: RequestBody) -> Verdict:
            return Verdict(answer=upper)

    class Second:
        async def request(self, call: Call, body: RequestBody) -> Verdict:
            return Verdict(answer=Ending)

    events = [b"data: one\n\n", f"data: leaked {TEST_KEY}\n\n".encode()]
    whole = b"".join(events)

    async def answer(request: web.Request) -> web.StreamResponse:
        if not streamed:
            return web.Response(body=whole, content_type="text/plain")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    upstream.handlers["/x"] = answer
    b = await make_broker(api_config(upstream.url))
    snap = b.daemon.rt.snapshot
    hooks = register_hooks({"api": (First(), Second())}, snap.hooks.done)
    b.daemon.rt.snapshot = dataclasses.replace(snap, hooks=hooks)
    async with b.request("GET", "/x") as r:
        body = await r.read()
        assert ("Content-Length" in r.headers) is not streamed
    assert body.startswith(b"DATA: ONE\n\nDATA: LEAKED [REDACTED*") and body.endswith(b"*]\n\nEND")
    assert_no_secret(body, b"".join(made[0].seen), secrets=(TEST_KEY, TEST_KEY.upper()))
    assert len(made) == 1 and (len(made[0].seen) > 1) is streamed


# -- MCP: a tool whose result carries the card, as JSON text and structured content


@contextlib.asynccontextmanager
async def card_tools(json_response: bool) -> AsyncIterator[str]:
    server = build_server()

    @server.tool()
    def get_card_details(card_id: str) -> dict[str, Any]:
        """A card's number, CVC and expiry."""
        return {**CARD, "id": card_id}

    sock = loopback_socket()
    port = sock.getsockname()[1]
    async with serve_asgi(server.streamable_http_app(json_response=json_response), sock):
        yield f"http://127.0.0.1:{port}/mcp"


@pytest.mark.parametrize("json_response", [False, True], ids=["sse", "json"])
@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_an_mcp_tool_result_is_masked_for_the_agent(
    make_broker: BrokerFactory, mode: str, json_response: bool
) -> None:
    store_key(TEST_KEY)
    async with card_tools(json_response) as mcp_url:
        policy = {"card_data": "redact", "tools": {"deny": ["whoami"]}}
        b = await make_broker(route_config(mcp_url, policy, prefix="/mcp"))
        async with Client(f"{b.url}/mcp", mode=mode) as agent:
            names = {t.name for t in (await agent.list_tools()).tools}
            assert "get_card_details" in names and "whoami" not in names  # a rewrite, masked too
            result = await agent.call_tool("get_card_details", {"card_id": "c9"})
    assert not result.is_error
    [content] = result.content
    assert json.loads(content.text) == {**MASKED, "id": "c9"}  # type: ignore[union-attr]
    assert result.structured_content == {**MASKED, "id": "c9"}
