"""Spend guard: route policies seen from a real agent, with a real upstream that records what it got."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client

from broker.config import DEFAULT_AMOUNT_FIELDS, Policy, state_dir
from broker.errors import BrokerError
from broker.policy.budget import BudgetLedger
from broker.policy.route import RoutePolicy, filter_tools_list
from tests.conftest import (
    LIVE_KEY,
    TEST_KEY,
    BrokerFactory,
    Upstream,
    api_config,
    store_key,
    write_config,
)
from tests.e2e.conftest import cli
from tests.mcp_upstream import McpUpstream, run_mcp_upstream


def with_policy(upstream: Upstream, policy: dict[str, Any], **top: Any) -> dict[str, Any]:
    auth = top.pop("auth", {"type": "api_key"})
    return api_config(
        upstream.url,
        routes=[{"name": "api", "prefix": "/", "upstream": upstream.url, "auth": auth, "policy": policy}],
        **top,
    )


REST_RULES = {
    "allow": ["GET /api/v1/cards", "GET /api/v1/cards/*", "POST /api/v1/cards", "GET /api/v1/cardholders/**"],
    "deny": ["GET /api/v1/cards/*/details"],
}


async def test_rest_allow_and_deny(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(TEST_KEY)
    b = await make_broker(with_policy(upstream, REST_RULES))
    cases = [
        ("GET", "/api/v1/cards", 200),
        ("GET", "/api/v1/cards/c1", 200),
        ("POST", "/api/v1/cards", 200),
        ("GET", "/api/v1/cardholders/ch1/cards/c9", 200),
        ("GET", "/api/v1/cards/c1/details", 403),
        ("GET", "/api/v1/cards/c1/%64etails", 403),  # normalized before the rules look at it
        ("DELETE", "/api/v1/cards/c1", 403),
        ("GET", "/api/v1/wallet", 403),
    ]
    for method, path, expected in cases:
        async with b.request(method, path) as r:
            assert r.status == expected, (method, path)
            if expected == 403:
                doc = await r.json()
                assert r.headers["X-Broker-Error"] == "policy_denied"
                assert "policy" in doc["error"]["message"]
    assert [(s.method, s.raw_path) for s in upstream.seen] == [(m, p) for m, p, e in cases if e == 200]
    async with b.request("GET", "/api/v1/cards/c1/details") as r:
        assert 'deny "GET /api/v1/cards/*/details"' in (await r.json())["error"]["message"]
    refusals = [e for e in b.log_events() if e["event"] == "request" and e["error"] == "policy_denied"]
    assert len(refusals) == 5
    assert all("policy" in e["detail"] for e in refusals)


async def test_amount_cap_and_unreadable_bodies(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(TEST_KEY)
    b = await make_broker(with_policy(upstream, {"max_amount_cents": 5000}, limits={"max_body_bytes": 2048}))
    refused = [
        b'{"amount_cents": 6000}',
        b'{"card": {"spend_limit_cents": 5001}}',
        b'{"amountCents": "7000"}',
        b'{"amount_cents": "lots"}',
        b'{"amount_cents": -5}',
        b'{"amount_cents": 1e999}',
        b"{not json",
        b"\xff\xfe",
    ]
    for body in refused:
        async with b.request(
            "POST", "/api/v1/cards", data=body, headers={"Content-Type": "application/json"}
        ) as r:
            assert r.status == 403, body
            assert r.headers["X-Broker-Error"] == "policy_denied"
    too_big = {"Content-Type": "application/json"}
    async with b.request("POST", "/api/v1/cards", data=b"x" * 3000, headers=too_big) as r:
        assert r.status == 413
    assert upstream.seen == []
    ok = b'{ "cardholder_id" : "ch_1",\n  "card": {"spend_limit_cents": 5000} }'
    async with b.request("POST", "/api/v1/cards", data=ok, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 200
    assert upstream.seen[-1].body == ok  # byte for byte
    async with b.request("GET", "/api/v1/cards") as r:  # no body: nothing to read
        assert r.status == 200


async def test_budget_survives_restart_and_refunds_failures(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)

    async def maybe_decline(request: web.Request) -> web.Response:
        body = await request.json()
        if body.get("amount_cents") == 3333:
            return web.json_response({"error": "insufficient funds"}, status=402)
        return web.json_response({"ok": True})

    upstream.handlers["/api/v1/cards"] = maybe_decline
    doc = with_policy(upstream, {"budget": {"amount_cents": 10000, "per": "24h"}})

    async def post(b: Any, amount: int) -> int:
        async with b.request("POST", "/api/v1/cards", json={"amount_cents": amount}) as r:
            return r.status

    first = await make_broker(doc)
    assert await post(first, 6000) == 200
    assert await post(first, 3333) == 402  # declined upstream: not spent, not counted
    await first.daemon.stop()
    second = await make_broker(doc)
    assert await post(second, 5000) == 403
    assert await post(second, 4000) == 200
    async with second.request("GET", "/_broker/status") as r:
        budget = (await r.json())["routes"][0]["budget"]
    assert budget == {"amount_cents": 10000, "per": "24h", "used": 10000, "left": 0}
    async with second.request("POST", "/api/v1/cards", json={"amount_cents": 1}) as r:
        assert "budget" in (await r.json())["error"]["message"]


async def test_budget_cents_are_whole_numbers_and_an_old_ledger_file_is_read(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """Cents show as integers (3000, never 3000.0) in /_broker/status, `status` and `status
    --json`, and in refusals; a ledger file written with floats by earlier versions still counts."""
    store_key(TEST_KEY)
    ledger = state_dir() / "budgets.json"
    ledger.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    ledger.write_text(json.dumps({"api": [[time.time() - 60, 1000.0]]}))  # as earlier versions wrote it
    doc = with_policy(upstream, {"budget": {"amount_cents": 20000, "per": "24h"}})
    b = await make_broker(doc)
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 2000}) as r:
        assert r.status == 200
    async with b.request("GET", "/_broker/status") as r:
        raw = await r.text()
    budget = json.loads(raw)["routes"][0]["budget"]
    assert budget == {"amount_cents": 20000, "per": "24h", "used": 3000, "left": 17000}
    assert '"used": 3000,' in raw and '"left": 17000' in raw
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 18000}) as r:
        assert r.status == 403
        message = (await r.json())["error"]["message"]
    assert "3000 of 20000 used in the last 24h; this request needs 18000" in message

    cli_config = write_config(tmp_path / "cli.yaml", {**doc, "listen": [f"127.0.0.1:{b.port}"]})
    rc, out, err = await cli("status", "--config", str(cli_config))
    assert rc == 0, err
    assert "api: budget 3000 of 20000 cents used per 24h, 17000 left" in out
    rc, out, err = await cli("status", "--config", str(cli_config), "--json")
    assert rc == 0, err
    assert '"used": 3000,' in out and '"left": 17000' in out
    assert ".0," not in out.split('"budget"')[1]
    await b.daemon.stop()
    assert [a for _, a in json.loads(ledger.read_text())["api"]] == [1000, 2000]
    assert ".0]" not in ledger.read_text()


async def test_concurrent_spending_stops_exactly_at_the_budget(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.05)
        return web.json_response({"ok": True})

    upstream.handlers["/api/v1/cards"] = slow
    b = await make_broker(with_policy(upstream, {"budget": {"amount_cents": 10000, "per": "1h"}}))

    async def post(i: int) -> int:
        async with b.request("POST", "/api/v1/cards", json={"amount_cents": 1000, "n": i}) as r:
            return r.status

    statuses = await asyncio.gather(*(post(i) for i in range(20)))
    assert sorted(statuses) == [200] * 10 + [403] * 10
    spent = sum(json.loads(s.body)["amount_cents"] for s in upstream.seen)
    assert spent == 10000


LEDGER_WRITES: list[tuple[str, int]] = []  # (file renamed into place, thread), budgets.json only
_audit_hooked = False


def _watch_ledger_writes() -> None:
    """Record which thread puts budgets.json in place (os.replace raises the `os.rename` audit
    event). An audit hook cannot be removed, so it is added once and filters on the name."""
    global _audit_hooked
    if _audit_hooked:
        return

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "os.rename" and str(args[1]).endswith("budgets.json"):
            LEDGER_WRITES.append((str(args[1]), threading.get_ident()))

    sys.addaudithook(hook)
    _audit_hooked = True


async def test_budget_writes_leave_the_event_loop_and_land_before_forwarding(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    """The ledger's fsync'd write runs off the event loop, yet a reservation still counts at
    once (no overspend in a burst) and is on disk before its request is forwarded; a refund is
    on disk when the daemon has stopped; no temp file is left behind."""
    store_key(TEST_KEY)
    _watch_ledger_writes()
    ledger = state_dir() / "budgets.json"
    seen_on_disk: list[tuple[int, list[int]]] = []

    async def create(request: web.Request) -> web.Response:
        amount = (await request.json())["amount_cents"]
        seen_on_disk.append((amount, [a for _, a in json.loads(ledger.read_text())["api"]]))
        if amount == 1:
            return web.json_response({"error": "declined"}, status=402)
        await asyncio.sleep(0.05)
        return web.json_response({"ok": True})

    upstream.handlers["/api/v1/cards"] = create
    b = await make_broker(with_policy(upstream, {"budget": {"amount_cents": 10000, "per": "1h"}}))
    loop_thread = threading.get_ident()
    first_write = len(LEDGER_WRITES)

    async def post(amount: int) -> tuple[int, int]:
        async with b.request("POST", "/api/v1/cards", json={"amount_cents": amount}) as r:
            return amount, r.status

    results = await asyncio.gather(*(post(1000 + i) for i in range(15)))
    spent = [a for a, status in results if status == 200]
    refused = [a for a, status in results if status == 403]
    assert len(spent) + len(refused) == 15 and spent and refused
    assert sum(spent) <= 10000 and all(sum(spent) + a > 10000 for a in refused)  # exactly at the budget
    for amount, on_disk in seen_on_disk:
        assert amount in on_disk  # its reservation was durable before the upstream saw it
    assert await post(1) == (1, 402)  # declined upstream: given back
    await b.daemon.stop()
    assert sorted(a for _, a in json.loads(ledger.read_text())["api"]) == sorted(spent)
    assert list(ledger.parent.glob(".budgets-*")) == []
    writers = {thread for _, thread in LEDGER_WRITES[first_write:]}
    assert writers, "the ledger was never written"
    assert loop_thread not in writers, "budgets.json was written (and fsynced) on the event loop"


async def test_a_reservation_that_cannot_be_written_is_refused_and_given_back(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    """When budgets.json cannot be written, the request is not forwarded (its spend would not
    survive a restart) and its reservation does not linger in memory; nothing hangs."""
    store_key(TEST_KEY)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    doc = with_policy(upstream, {"budget": {"amount_cents": 10000, "per": "1h"}})
    b = await make_broker({**doc, "state_dir": str(blocker / "state")})
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 1000}) as r:
        assert r.status == 500
        assert r.headers["X-Broker-Error"] == "internal_error"
    assert upstream.seen == []
    async with b.request("GET", "/_broker/status") as r:
        assert (await r.json())["routes"][0]["budget"]["used"] == 0


async def test_rate_limit(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(TEST_KEY)
    b = await make_broker(with_policy(upstream, {"rate": {"requests": 3, "per": "1m"}}))
    for _ in range(3):
        async with b.request("GET", "/x") as r:
            assert r.status == 200
    async with b.request("GET", "/x") as r:
        assert r.status == 429
        assert r.headers["X-Broker-Error"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert "3 requests per 1m" in (await r.json())["error"]["message"]
    assert len(upstream.seen) == 3


async def test_require_test_mode_refuses_live_keys(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(LIVE_KEY)
    b = await make_broker(
        with_policy(upstream, {"require_test_mode": True}, auth={"type": "api_key", "allow_live": True})
    )
    async with b.request("GET", "/api/v1/cards") as r:
        assert r.status == 403
        assert "require_test_mode" in (await r.json())["error"]["message"]
    assert upstream.seen == []


@pytest.fixture
async def mcp_plain() -> AsyncIterator[McpUpstream]:
    async with run_mcp_upstream(auth=False) as up:
        yield up


def mcp_policy_config(up: McpUpstream, policy: dict[str, Any]) -> dict[str, Any]:
    store_key(TEST_KEY, "mcp")
    return {
        "listen": ["127.0.0.1:0"],
        "allow_insecure_upstream": True,
        "timeouts": {"drain": 1},
        "log": {"level": "debug", "format": "json"},
        "routes": [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": up.mcp_url,
                "auth": {"type": "api_key"},
                "policy": policy,
            }
        ],
    }


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_mcp_tools_filtered_and_refused(
    make_broker: BrokerFactory, mcp_plain: McpUpstream, mode: str
) -> None:
    b = await make_broker(
        mcp_policy_config(mcp_plain, {"tools": {"deny": ["whoami"]}, "max_amount_cents": 5000})
    )
    async with Client(f"{b.url}/mcp", mode=mode) as agent:
        names = {t.name for t in (await agent.list_tools()).tools}
        assert names == {"list_cards", "create_card"}  # whoami is not even offered
        ok = await agent.call_tool("create_card", {"amount_cents": 5000})
        assert not ok.is_error
        calls_before = mcp_plain.recorder.calls[("POST", "/mcp")]
        with pytest.raises(Exception, match="policy") as info:
            await agent.call_tool("whoami", {})
        with pytest.raises(Exception, match="max_amount_cents"):
            await agent.call_tool("create_card", {"amount_cents": 7000})
        assert mcp_plain.recorder.calls[("POST", "/mcp")] == calls_before  # refused calls never arrived
    assert "whoami" in str(info.value)


async def test_mcp_batch_with_a_denied_tool_is_refused(
    make_broker: BrokerFactory, mcp_plain: McpUpstream
) -> None:
    b = await make_broker(mcp_policy_config(mcp_plain, {"tools": {"allow": ["list_cards"]}}))
    batch = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "list_cards", "arguments": {}},
        },
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "create_card", "arguments": {}},
        },
    ]
    async with b.request("POST", "/mcp", json=batch) as r:
        assert r.status == 403
        doc = await r.json()
    assert doc["jsonrpc"] == "2.0"
    assert doc["error"]["data"]["code"] == "policy_denied"
    assert "create_card" in doc["error"]["message"]
    sandbox_off = {
        "jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "list_cards", "arguments": {"sandbox": False}},
    }  # fmt: skip
    b2 = await make_broker(mcp_policy_config(mcp_plain, {"require_test_mode": True}))
    async with b2.request("POST", "/mcp", json=sandbox_off) as r:
        assert r.status == 403
        assert (await r.json())["id"] == 3
    assert mcp_plain.recorder.calls[("POST", "/mcp")] == 0


def test_tools_list_filter_json_and_sse() -> None:
    allowed = {"a"}.__contains__
    ids = {json.dumps(7)}
    msg = {"jsonrpc": "2.0", "id": 7, "result": {"tools": [{"name": "a"}, {"name": "b"}], "resultType": "x"}}
    out = json.loads(filter_tools_list(json.dumps(msg).encode(), "application/json", ids, allowed))
    assert out["result"] == {"tools": [{"name": "a"}], "resultType": "x"}
    sse = b"event: message\r\nid: 1\r\ndata: " + json.dumps(msg).encode() + b"\r\n\r\n"
    filtered = filter_tools_list(sse, "text/event-stream", ids, allowed)
    assert filtered.startswith(b"event: message\nid: 1\ndata: ")
    assert b'"b"' not in filtered and b'"a"' in filtered
    # answers are filtered whatever their id: an upstream may write an id another way (1.0 -> 1)
    other = {"jsonrpc": "2.0", "id": 8, "result": {"tools": [{"name": "b"}, {"name": "a"}]}}
    out = json.loads(filter_tools_list(json.dumps(other).encode(), "application/json", ids, allowed))
    assert out["result"]["tools"] == [{"name": "a"}]
    error = {"jsonrpc": "2.0", "id": 9, "error": {"code": 1, "message": "x"}}  # nothing to filter
    assert (
        json.loads(filter_tools_list(json.dumps(error).encode(), "application/json", ids, allowed)) == error
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
keys = st.sampled_from(
    [*DEFAULT_AMOUNT_FIELDS, "jsonrpc", "method", "params", "name", "arguments", "id", "x"]
)
documents = st.recursive(
    json_values,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=documents, mode=st.sampled_from([None, "test", "live"]))
def test_policy_never_crashes_on_any_json(
    tmp_path_factory: pytest.TempPathFactory, doc: Any, mode: str | None
) -> None:
    ledger = BudgetLedger(tmp_path_factory.mktemp("ledger") / "b.json")
    policy = Policy(
        tools_deny=frozenset({"x"}),
        max_amount_cents=100,
        require_test_mode=True,
        amount_fields=DEFAULT_AMOUNT_FIELDS,
    )
    rp = RoutePolicy("r", policy, ledger)
    try:
        total, _ids = rp.inspect(doc, mode)
    except BrokerError as err:
        assert err.code == "policy_denied"
    else:
        assert total >= 0
    raw = json.dumps(doc, allow_nan=True).encode()
    for ctype in ("application/json", "text/event-stream"):
        assert isinstance(filter_tools_list(raw, ctype, {json.dumps(1)}, {"a"}.__contains__), bytes)


async def test_refusals_name_millions_of_cents_in_whole_digits(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    """`:g` printed 2000000 as 2e+06: a person reading the refusal must see the number itself."""
    store_key(TEST_KEY)
    doc = with_policy(
        upstream, {"budget": {"amount_cents": 5_000_000, "per": "24h"}, "max_amount_cents": 4_000_000}
    )
    b = await make_broker(doc)
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 3_000_000}) as r:
        assert r.status == 200
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 2_500_000}) as r:
        assert r.status == 403
        message = (await r.json())["error"]["message"]
    assert "3000000 of 5000000 used in the last 24h; this request needs 2500000" in message
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 4_500_000}) as r:
        assert r.status == 403
        message = (await r.json())["error"]["message"]
    assert "amount_cents 4500000 is over the cap 4000000" in message
    assert len(upstream.seen) == 1


async def test_a_waiter_that_comes_after_its_write_failed_is_not_left_waiting(tmp_path: Path) -> None:
    """The writer settles the waiters it sees; one that registers after the write holding its
    change already failed must fail at once, not wait for a write that will never come (a
    request that hung until its client gave up, seen under load)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    ledger = BudgetLedger(blocker / "budgets.json")
    with ledger._lock:
        version = ledger._changed()  # a change, and the writer woken to write it
    for _ in range(500):  # the writer tries, fails, and finds no waiter to tell
        if ledger._tried >= version:
            break
        await asyncio.sleep(0.01)
    assert ledger._tried >= version and ledger._error is not None
    with pytest.raises(OSError, match="cannot be written"):
        await asyncio.wait_for(ledger._on_disk(version), 2)
    await asyncio.to_thread(ledger.close)
