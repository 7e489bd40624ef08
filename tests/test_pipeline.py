"""The walk (broker/pipeline.py): hooks registered in one place, immutable values between steps,
one snapshot per request, and refusals answered without reading what they refuse.

Hooks here are small objects like the broker's own (a route's policy, metrics, the audit line),
put into a running daemon the way a reload does it: a new snapshot, one assignment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from broker.body import RequestBody
from broker.errors import BrokerError
from broker.hooks import Call, Outcome, Verdict
from broker.pipeline import register_hooks
from tests.conftest import TEST_KEY, Broker, BrokerFactory, Upstream, api_config, store_key, write_config


class Recorder:
    """A done hook: keeps every outcome."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def done(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def install(b: Broker, *request_hooks: Any, done: tuple[Any, ...] = ()) -> None:
    rt = b.daemon.rt
    snap = rt.snapshot
    hooks = register_hooks({"api": tuple(request_hooks)}, snap.hooks.done + done)
    rt.snapshot = dataclasses.replace(snap, hooks=hooks)


async def test_hooks_get_frozen_values_and_the_outcome(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url))
    calls: list[Call] = []
    settled: list[Outcome] = []

    class Upper:
        async def request(self, call: Call, body: RequestBody) -> Verdict:
            calls.append(call)
            return Verdict(rewrite=lambda raw, ctype: raw.upper(), settle=settled.append)

    recorder = Recorder()
    install(b, Upper(), done=(recorder,))
    async with b.request("POST", "/v1/cards?x=1", data=b'{"a": "b"}') as r:
        assert r.status == 200
        answer = await r.read()
    assert b'"PATH": "/V1/CARDS?X=1"' in answer  # the rewrite ran on the whole answer
    assert int(r.headers["Content-Length"]) == len(answer)
    [call] = calls
    assert call.route == "api" and call.target.url.raw_path == "/v1/cards"
    with pytest.raises(AttributeError):  # a named tuple: immutable
        call.id = "another"  # type: ignore[misc]
    [outcome] = recorder.outcomes
    assert settled == [outcome]  # the verdict settles with the same outcome done hooks see
    assert (outcome.route, outcome.method, outcome.status, outcome.upstream_status) == (
        "api",
        "POST",
        200,
        200,
    )
    assert outcome.maybe_sent and outcome.error is None
    assert outcome.bytes_in == len(b'{"a": "b"}') and outcome.bytes_out == len(answer)
    assert outcome.id == r.headers["X-Broker-Request-Id"]
    assert [s.body for s in upstream.seen] == [b'{"a": "b"}']


async def test_a_refusal_stops_the_walk_and_settles_what_was_admitted(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url))
    settled: list[Outcome] = []

    class Admit:
        async def request(self, call: Call, body: RequestBody) -> Verdict:
            return Verdict(settle=settled.append)

    class Refuse:
        async def request(self, call: Call, body: RequestBody) -> Verdict:
            raise BrokerError("policy_denied", "refused by a test hook", call.route)

    recorder = Recorder()
    install(b, Admit(), Refuse(), done=(recorder,))
    rpc = {"jsonrpc": "2.0", "id": 41, "method": "tools/call", "params": {"name": "x"}}
    async with b.request("POST", "/mcp", json=rpc) as r:
        assert r.status == 403
        assert r.headers["X-Broker-Error"] == "policy_denied"
        doc = await r.json()
    assert doc["id"] == 41  # answered in the agent's terms
    assert upstream.seen == []
    [outcome] = settled
    assert not outcome.maybe_sent and outcome.upstream_status is None  # a budget would be refunded
    assert recorder.outcomes == [outcome]
    assert (outcome.error, outcome.detail) == ("policy_denied", "refused by a test hook")


async def test_a_body_read_by_a_hook_is_read_once_and_forwarded_byte_for_byte(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url))
    seen: list[bytes] = []

    class Reader:
        async def request(self, call: Call, body: RequestBody) -> None:
            seen.append(await body.read())

    install(b, Reader(), Reader())
    sent = json.dumps({"amount_cents": 100, "pad": "é" * 3000}).encode()

    async def trickle():  # type: ignore[no-untyped-def]
        for i in range(0, len(sent), 1000):
            yield sent[i : i + 1000]

    async with b.request("POST", "/v1/cards", data=trickle()) as r:
        assert r.status == 200
    assert seen == [sent, sent]
    assert [s.body for s in upstream.seen] == [sent]


async def test_a_request_walks_the_snapshot_it_arrived_with(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    store_key(TEST_KEY)
    other = Upstream()
    await other.start()
    try:
        b = await make_broker(api_config(upstream.url))
        entered, release = asyncio.Event(), asyncio.Event()

        class Gate:
            async def request(self, call: Call, body: RequestBody) -> None:
                entered.set()
                await release.wait()

        install(b, Gate())

        async def first() -> int:
            async with b.request("GET", "/first") as r:
                return r.status

        pending = asyncio.ensure_future(first())
        await asyncio.wait_for(entered.wait(), 5)
        # a reload while the first request is held in its hook: a whole new snapshot
        write_config(Path(b.daemon.rt.config_path), api_config(other.url))
        await b.daemon.rt.reload("test")
        async with b.request("GET", "/second") as r:
            assert r.status == 200
        release.set()
        assert await asyncio.wait_for(pending, 5) == 200
        assert [s.raw_path for s in upstream.seen] == ["/first"]  # the config it arrived under
        assert [s.raw_path for s in other.seen] == ["/second"]
    finally:
        await other.stop()


async def test_the_guard_answers_without_reading_the_body(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url))
    recorder = Recorder()
    install(b, done=(recorder,))
    reader, writer = await asyncio.open_connection("127.0.0.1", b.port)
    try:
        # a JSON-RPC POST from a rebinding page, whose megabyte of body never comes
        writer.write(
            b"POST /mcp HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b'{"jsonrpc": "2.0", "id": 1'
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # idle timeout is 300 s
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"x-broker-error: host_not_allowed" in head.lower()
    assert upstream.seen == []
    [outcome] = recorder.outcomes
    assert (outcome.route, outcome.error, outcome.bytes_in) == (None, "host_not_allowed", 0)
