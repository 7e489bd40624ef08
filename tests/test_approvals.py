"""Approvals (SPEC "Approvals, the dashboard, and card data"): held calls through a real daemon.

The agent is an aiohttp client or the real `mcp.Client` (legacy and auto); the upstream records
what reached it; the person deciding is the owner's admin endpoint asked with the key the daemon
wrote (`DaemonClient.admin`, as the CLI does). The book itself is tested on its own at the end.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, MCPError

from broker import config as config_mod
from broker.admin.access import HEADER
from broker.admin.client import DaemonClient
from broker.errors import BrokerError
from broker.policy.approvals import (
    PASSKEY_NEEDED,
    Approval,
    ApprovalBook,
    ApprovalError,
    call_digest,
)
from tests.conftest import TEST_KEY, Broker, BrokerFactory, Upstream, api_config, store_key, write_config
from tests.e2e.conftest import free_port
from tests.mcp_upstream import McpUpstream, run_mcp_upstream


class FakeNotifier:
    """Stands in for the desktop: records each notification's text."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, text: str) -> None:
        self.texts.append(text)


@pytest.fixture(autouse=True)
def no_desktop(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The real notifier must never show anything from a test."""
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    yield


def approve_doc(upstream_url: str, tmp_path: Path, policy: dict[str, Any], **top: Any) -> dict[str, Any]:
    route = {"name": "api", "prefix": "/", "upstream": upstream_url, "auth": {"type": "api_key"}}
    return api_config(
        upstream_url,
        routes=[{**route, "policy": policy}],
        listen=[f"127.0.0.1:{free_port()}"],  # the CLI's DaemonClient finds it by the config
        state_dir=str(tmp_path / "state"),
        timeouts={"drain": 1},
        **top,
    )


def notified(b: Broker) -> FakeNotifier:
    """Install a fake notifier the way a reload would (a new snapshot)."""
    rt = b.daemon.rt
    fake = FakeNotifier()
    rt.notifier = fake
    rt.snapshot = rt._build(rt.snapshot.config, rt.snapshot)
    return fake


def owner(tmp_path: Path, doc: dict[str, Any]) -> DaemonClient:
    return DaemonClient(config_mod.load(write_config(tmp_path / "owner.yaml", doc)))


async def decide(client: DaemonClient, approval_id: str, verb: str) -> tuple[int, dict[str, Any]]:
    # the client is synchronous and the daemon serves on this loop: ask from a thread
    return await asyncio.to_thread(client.admin, "POST", f"/_broker/approvals/{approval_id}/{verb}")


async def pending(b: Broker, n: int = 1) -> list[Any]:
    """Wait until `n` approvals are pending (the agent's request reached the hold)."""
    book = b.daemon.rt.approvals
    for _ in range(500):
        if len(book.pending()) >= n:
            return book.pending()
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(book.pending())} pending, wanted {n}")


async def send(b: Broker, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    async with b.request(method, path, data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


# ---------------------------------------------------------------- REST


async def test_rest_hold_approved_goes_byte_for_byte_and_once(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    store_key(TEST_KEY)
    doc = approve_doc(upstream.url, tmp_path, {"approve": {"above_cents": 2000, "wait": "10s"}})
    b = await make_broker(doc)
    fake = notified(b)
    client = owner(tmp_path, doc)
    assert (await send(b, "GET", "/api/v1/cards"))[0] == 200  # not held; the key is read by now
    body = b'{"spend_limit_cents":  2500,\n "note": "' + TEST_KEY.encode() + b'"}'
    agent = asyncio.create_task(send(b, "POST", "/api/v1/cards?x=1", body))
    (held,) = await pending(b)
    await asyncio.sleep(0.1)
    assert [s.method for s in upstream.seen] == ["GET"]  # nothing of the held call went upstream
    assert not agent.done()
    assert (held.route, held.method, held.path, held.amount_cents) == (
        "api",
        "POST",
        "/api/v1/cards?x=1",
        2500,
    )
    assert held.reasons == ("amount 2500 over 2000",) and held.user is None and held.tools == ()
    assert "2500" in held.arguments and TEST_KEY not in held.arguments  # what a person reads: masked
    assert len(held.id) >= 8 and held.digest == call_digest(
        "api", None, None, "POST", "/api/v1/cards?x=1", body
    )
    (text,) = fake.texts
    assert text == f"AgentCard: approve POST /api/v1/cards for $25.00? agentcard-broker approve {held.id}"

    status, decided = await decide(client, held.id, "approve")
    assert status == 200 and (decided["state"], decided["decided_by"]) == ("approved", "cli")
    assert await agent == (200, {"ok": True, "path": "/api/v1/cards?x=1", "method": "POST"})
    assert upstream.seen[-1].body == body  # byte for byte, the agent's own spacing and key

    # the same call again is held again: an approval is for one request
    again = asyncio.create_task(send(b, "POST", "/api/v1/cards?x=1", body))
    (second,) = await pending(b)
    assert second.id != held.id and second.digest == held.digest
    assert (await decide(client, held.id, "approve"))[0] == 409  # the used one cannot be reused
    status, decided = await decide(client, second.id, "deny")
    assert status == 200 and decided["state"] == "denied"
    status, answer = await again
    assert status == 403 and answer["error"]["code"] == "approval_denied"
    assert second.id in answer["error"]["message"]
    assert len(upstream.seen) == 2
    assert (await decide(client, second.id, "approve"))[1]["error"]["code"] == "approval_conflict"


async def test_rest_rules_card_data_and_timeout(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    store_key(TEST_KEY)
    policy = {"approve": {"requests": ["POST /api/v1/cards/*/fund"], "wait": "1s"}, "card_data": "approve"}
    b = await make_broker(approve_doc(upstream.url, tmp_path, policy))
    notified(b)
    assert (await send(b, "GET", "/api/v1/cards/c1"))[0] == 200  # neither rule holds it
    assert (await send(b, "POST", "/api/v1/cards/c1/refund", b"{}"))[0] == 200
    seen_before = len(upstream.seen)

    status, answer = await send(b, "POST", "/api/v1/cards/c1/fund", b'{"amount_cents": 5}')
    assert status == 403 and answer["error"]["code"] == "approval_timeout"
    assert "1s" in answer["error"]["message"]
    status, answer = await send(b, "GET", "/api/v1/cards/c1/Details/")  # any spelling of …/details
    assert status == 403 and answer["error"]["code"] == "approval_timeout"
    status, answer = await send(b, "GET", "/api/v1/cards/c1/details;x=1")  # unmatchable: refused
    assert status == 403 and answer["error"]["code"] == "policy_denied"
    assert len(upstream.seen) == seen_before  # none of them arrived
    timed_out = b.daemon.rt.approvals.recent()
    assert [(a.state, a.reasons) for a in timed_out] == [
        ("expired", ("card data",)),
        ("expired", ("POST /api/v1/cards/*/fund",)),
    ]
    assert b.daemon.rt.approvals.pending() == []


async def test_an_agent_that_leaves_withdraws_its_hold(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    store_key(TEST_KEY)
    doc = approve_doc(upstream.url, tmp_path, {"approve": {"above_cents": 0, "wait": "30s"}})
    b = await make_broker(doc)
    notified(b)
    agent = asyncio.create_task(send(b, "POST", "/api/v1/cards", b'{"amount_cents": 1}'))
    (held,) = await pending(b)
    agent.cancel()  # the agent's connection closes
    for _ in range(300):
        if held.state != "pending":
            break
        await asyncio.sleep(0.01)
    assert held.state == "expired" and b.daemon.rt.approvals.pending() == []
    status, answer = await decide(owner(tmp_path, doc), held.id, "approve")
    assert status == 409 and "expired" in answer["error"]["message"]
    assert upstream.seen == []


async def test_agents_cannot_decide_without_the_admin_key(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    store_key(TEST_KEY)
    doc = approve_doc(upstream.url, tmp_path, {"approve": {"above_cents": 100, "wait": "10s"}})
    b = await make_broker(doc)
    notified(b)
    agent = asyncio.create_task(send(b, "POST", "/api/v1/cards", b'{"amount_cents": 500}'))
    (held,) = await pending(b)
    attempts: list[dict[str, str]] = [
        {},
        {HEADER: "wrong"},
        {HEADER: "x" * 43},
        {"Authorization": f"Bearer {TEST_KEY}"},
    ]
    for headers in attempts:
        for verb in ("approve", "deny"):
            async with b.request("POST", f"/_broker/approvals/{held.id}/{verb}", headers=headers) as r:
                assert r.status == 403 and r.headers["X-Broker-Error"] == "admin_required"
        async with b.request("GET", "/_broker/approvals", headers=headers) as r:
            assert r.status == 403  # the arguments of held calls are the owner's to read
    # a web page cannot either, even with the key (the browser guard comes first)
    key = (tmp_path / "state" / "admin.key").read_text()
    async with b.request(
        "POST",
        f"/_broker/approvals/{held.id}/approve",
        headers={HEADER: key, "Origin": "https://evil.example"},
    ) as r:
        assert r.status == 403 and r.headers["X-Broker-Error"] == "origin_not_allowed"
    assert held.state == "pending" and not agent.done() and upstream.seen == []
    async with b.request("GET", "/_broker/approvals", headers={HEADER: key}) as r:
        listed = await r.json()
    assert [a["id"] for a in listed["pending"]] == [held.id] and listed["recent"] == []
    status, _ = await decide(owner(tmp_path, doc), held.id, "approve")
    assert status == 200 and (await agent)[0] == 200


async def test_the_book_is_bounded(make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path) -> None:
    store_key(TEST_KEY)
    b = await make_broker(approve_doc(upstream.url, tmp_path, {"approve": {"above_cents": 0, "wait": "10s"}}))
    notified(b)
    b.daemon.rt.approvals.max_pending = 2
    waiting = [
        asyncio.create_task(send(b, "POST", "/api/v1/cards", b'{"amount_cents": 1}')) for _ in range(2)
    ]
    await pending(b, 2)
    status, answer = await send(b, "POST", "/api/v1/cards", b'{"amount_cents": 1}')
    assert status == 403 and answer["error"]["code"] == "approval_timeout"
    assert "too many requests wait for approval" in answer["error"]["message"]
    for task in waiting:
        task.cancel()
    assert upstream.seen == []


# ---------------------------------------------------------------- MCP


@pytest.fixture
async def mcp_plain() -> AsyncIterator[McpUpstream]:
    async with run_mcp_upstream(auth=False) as up:
        yield up


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_mcp_tool_call_held_then_approved_or_denied(
    make_broker: BrokerFactory, mcp_plain: McpUpstream, tmp_path: Path, mode: str
) -> None:
    store_key(TEST_KEY, "mcp")
    route = {"name": "mcp", "prefix": "/mcp", "upstream": mcp_plain.mcp_url, "auth": {"type": "api_key"}}
    policy = {"approve": {"tools": ["create_card"], "above_cents": 1000, "wait": "10s"}}
    doc = approve_doc(mcp_plain.mcp_url, tmp_path, policy)
    doc["routes"] = [{**route, "policy": policy}]
    b = await make_broker(doc)
    fake = notified(b)
    client = owner(tmp_path, doc)
    calls = mcp_plain.recorder.calls
    async with Client(f"{b.url}/mcp", mode=mode) as agent:
        assert not (await agent.call_tool("list_cards", {})).is_error  # not held
        before = calls[("POST", "/mcp")]
        call = asyncio.create_task(agent.call_tool("create_card", {"amount_cents": 1500}))
        (held,) = await pending(b)
        await asyncio.sleep(0.1)
        assert calls[("POST", "/mcp")] == before  # the held call has not reached the upstream
        assert held.tools == ("create_card",) and held.amount_cents == 1500
        assert held.reasons == ("amount 1500 over 1000", "tool create_card")
        assert json.loads(held.arguments) == {"name": "create_card", "arguments": {"amount_cents": 1500}} | (
            {"_meta": json.loads(held.arguments)["_meta"]} if mode == "auto" else {}
        )
        assert (
            fake.texts[-1] == f"AgentCard: approve create_card for $15.00? agentcard-broker approve {held.id}"
        )
        assert (await decide(client, held.id, "approve"))[0] == 200
        result = await call
        assert not result.is_error and "1500" in json.dumps(result.model_dump(mode="json"))
        assert calls[("POST", "/mcp")] >= before + 1

        # the same call again: held again, and this time denied
        call = asyncio.create_task(agent.call_tool("create_card", {"amount_cents": 1500}))
        (again,) = await pending(b)
        assert again.id != held.id
        after_first = calls[("POST", "/mcp")]
        assert (await decide(client, again.id, "deny"))[0] == 200
        with pytest.raises(MCPError, match="denied"):
            await call
        assert calls[("POST", "/mcp")] == after_first


# ---------------------------------------------------------------- the book


async def test_book_decisions_passkey_events_and_bound() -> None:
    book = ApprovalBook(max_pending=2)
    events = book.subscribe()
    a = book.hold(route="api", method="POST", path="/x", digest="d1", wait_s=10)
    b = book.hold(route="api", method="POST", path="/y", digest="d2", wait_s=10, require_passkey=True)
    with pytest.raises(BrokerError) as full:
        book.hold(route="api", method="POST", path="/z", digest="d3", wait_s=10)
    assert (
        full.value.code == "approval_timeout" and "too many requests wait for approval" in full.value.message
    )
    assert [e["approval"]["id"] for e in [events.get_nowait(), events.get_nowait()]] == [a.id, b.id]
    with pytest.raises(ApprovalError, match="no approval"):
        book.decide("NOSUCHID", True, "cli")
    with pytest.raises(ApprovalError) as needs:
        book.decide(b.id, True, "cli")
    assert str(needs.value) == PASSKEY_NEEDED and b.state == "pending"
    assert book.decide(b.id, True, "dashboard+passkey", passkey=True).state == "approved"
    assert book.decide(a.id, False, "cli").decided_by == "cli"  # deny never needs a passkey
    with pytest.raises(ApprovalError, match="already denied"):
        book.decide(a.id, True, "cli")
    assert await book.wait(a) == "denied" and await book.wait(b) == "approved"
    assert [e["approval"]["state"] for e in [events.get_nowait(), events.get_nowait()]] == [
        "approved",
        "denied",
    ]
    assert [x.id for x in book.recent()] == [a.id, b.id] and book.pending() == []
    json.dumps(a.document())  # JSON-safe

    short = book.hold(route="api", method="GET", path="/d", digest="d4", wait_s=0.05)
    assert await book.wait(short) == "expired"
    with pytest.raises(ApprovalError, match="expired"):
        book.decide(short.id, True, "cli")
    gone = book.hold(route="api", method="GET", path="/d", digest="d5", wait_s=10)
    waiter = asyncio.create_task(book.wait(gone))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gone.state == "expired" and book.pending() == []  # a cancelled wait removes the hold
    per_user = book.hold(
        route="mcp", method="POST", path="/mcp", digest="d6", wait_s=10, client="c", user="u"
    )
    assert len(per_user.id) == 26
    with pytest.raises(ApprovalError, match="end user decides"):
        book.decide(per_user.id, False, "cli")
    book.unsubscribe(events)


def test_digest_binds_the_call_but_not_a_json_rpc_id() -> None:
    def rpc(rid: int, amount: str = "5", extra: str = "") -> bytes:
        return (
            f'{{"jsonrpc": "2.0", "id": {rid}, "method": "tools/call", '
            f'"params": {{"name": "create_card", "arguments": {{"amount_cents": {amount}{extra}}}}}}}'
        ).encode()

    d = call_digest("mcp", "c", "u", "POST", "/mcp", rpc(1))
    assert d == call_digest("mcp", "c", "u", "POST", "/mcp", rpc(2))  # an MCP client's next attempt
    assert d == call_digest("mcp", "c", "u", "POST", "/mcp", rpc(2).replace(b", ", b","))  # spacing
    different = [
        call_digest("mcp", "c", "u", "POST", "/mcp", rpc(1, "6")),
        call_digest("mcp", "c", "u", "POST", "/mcp", rpc(1, "5.0")),  # another spelling of a number
        call_digest("mcp", "c", "u", "POST", "/mcp", rpc(1, "5", ', "amount_cents": 5')),  # duplicate key
        call_digest("mcp", "c", "v", "POST", "/mcp", rpc(1)),
        call_digest("mcp", "cu", "", "POST", "/mcp", rpc(1)),  # parts are length-prefixed
        call_digest("mcp", None, None, "POST", "/mcp", rpc(1)),
        call_digest("api", "c", "u", "POST", "/mcp", rpc(1)),
        call_digest("mcp", "c", "u", "POST", "/mcp?x", rpc(1)),
    ]
    assert len({d, *different}) == len(different) + 1
    rest = call_digest("api", None, None, "POST", "/v1", b'{"a": 1, "id": 2}')
    assert rest != call_digest("api", None, None, "POST", "/v1", b'{"a": 1, "id": 3}')  # not JSON-RPC: raw


async def test_a_call_that_could_not_be_sent_is_not_held(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    b = await make_broker(approve_doc(upstream.url, tmp_path, {"approve": {"above_cents": 0, "wait": "10s"}}))
    fake = notified(b)  # no key stored: nobody should be asked to approve what cannot go out
    status, answer = await send(b, "POST", "/api/v1/cards", b'{"amount_cents": 1}')
    assert status == 503 and answer["error"]["code"] == "no_credential"
    assert b.daemon.rt.approvals.pending() == [] and b.daemon.rt.approvals.recent() == []
    assert fake.texts == [] and upstream.seen == []


def test_the_notification_text_and_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from broker.policy import notify

    book_doc: dict[str, Any] = {"route": "mcp", "method": "POST", "path": "/mcp?k=" + TEST_KEY}
    a = Approval(
        id="K3QF7XWA", client=None, user=None, tools=('evil"\n<b>tool', "b"), amount_cents=2500.0,
        arguments=TEST_KEY, digest="d", reasons=(), created_at=0.0, expires_at=1.0, **book_doc,
    )  # fmt: skip
    text = notify.message(a)
    assert text == "AgentCard: approve evil???b?tool, b for $25.00? agentcard-broker approve K3QF7XWA"
    rest = Approval(**{**a.__dict__, "tools": (), "amount_cents": None, "require_passkey": True})
    assert notify.message(rest) == (
        "AgentCard: approve POST /mcp? approve it in the dashboard (agentcard-broker dashboard)"
    )  # the query (which could hold anything) is left out, and so are the arguments
    assert notify._command(text) is None  # no desktop session (the fixture cleared it)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "notify-send").write_text("#!/bin/sh\nexit 0\n")  # never run: only found on PATH
    (fake_bin / "notify-send").chmod(0o755)
    monkeypatch.setenv("PATH", str(fake_bin))
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent")
    argv = notify._command("approve <b>x</b> & y")
    assert argv is not None and argv[0] == str(fake_bin / "notify-send")
    assert argv[-1] == "approve &lt;b&gt;x&lt;/b&gt; &amp; y"


async def test_stopping_the_daemon_answers_held_requests_at_once(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    store_key(TEST_KEY)
    doc = approve_doc(upstream.url, tmp_path, {"approve": {"above_cents": 0, "wait": "60s"}})
    doc["timeouts"] = {"drain": 30}
    b = await make_broker(doc)
    notified(b)
    agent = asyncio.create_task(send(b, "POST", "/api/v1/cards", b'{"amount_cents": 1}'))
    (held,) = await pending(b)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await b.daemon.stop()  # SIGTERM's path: it does not wait out the drain for a held request
    assert loop.time() - started < 5
    status, answer = await agent
    assert status == 403 and answer["error"]["code"] == "approval_timeout"
    assert "stopped before anyone approved" in answer["error"]["message"]
    assert held.state == "expired" and upstream.seen == []
