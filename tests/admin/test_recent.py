"""broker/admin/recent.py: the dashboard's last requests, kept by a done hook through a real daemon."""

from __future__ import annotations

import asyncio

from tests.conftest import Broker


async def test_the_last_requests_are_kept_without_bodies_or_headers(broker: Broker) -> None:
    async with broker.request(
        "POST",
        "/v1/cards?api_key=hunter2&page=2",
        json={"amount_cents": 1234},
        headers={"X-Note": "secret-hdr"},
    ) as r:
        assert r.status == 200
    async with broker.request("GET", "/_broker/health") as r:  # the broker's own: not a request to show
        assert r.status == 200
    async with broker.request("GET", "/x", headers={"Host": "evil.example"}) as r:
        assert r.status == 403
    last = broker.daemon.rt.recent.last()
    assert [(d["method"], d["status"], d["error"]) for d in last] == [
        ("GET", 403, "host_not_allowed"),
        ("POST", 200, None),
    ]
    posted = last[1]
    assert posted["route"] == "api" and posted["path"] == "/v1/cards?api_key=[REDACTED]&page=2"
    assert posted["duration_ms"] >= 0 and posted["client"] is None and posted["user"] is None
    assert "1234" not in repr(last) and "secret-hdr" not in repr(last) and "hunter2" not in repr(last)


async def test_watchers_get_each_request_and_nobody_is_kept_after_unsubscribing(broker: Broker) -> None:
    recent = broker.daemon.rt.recent
    queue = recent.subscribe()
    async with broker.request("GET", "/a") as r:
        assert r.status == 200
    event = await asyncio.wait_for(queue.get(), 2)
    assert event["type"] == "request" and event["request"]["path"] == "/a"
    recent.unsubscribe(queue)
    async with broker.request("GET", "/b") as r:
        assert r.status == 200
    assert queue.empty() and recent.last(1)[0]["path"] == "/b"


def test_only_the_last_ones_are_kept_and_a_slow_watcher_never_blocks() -> None:
    from broker.admin.recent import RecentRequests
    from broker.hooks import Outcome

    recent = RecentRequests(keep=3)
    queue = recent.subscribe()
    for i in range(600):
        recent.done(Outcome(str(i), "api", "GET", f"/{i}", 200, 0.001))
    assert [d["path"] for d in recent.last()] == ["/599", "/598", "/597"]
    assert queue.full()  # it fell behind: the newest were dropped for it, nothing waited
