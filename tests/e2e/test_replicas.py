"""Three broker replicas on one real Redis (SPEC "Shared state and replicas"), end to end.

The replicas are `agentcard-broker run` subprocesses; the authorization server rotates single
use refresh tokens and revokes the whole grant on a reuse (tests/e2e/replicas.py); users
connect through the real connect page, form, authorize and callback, spread over replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.e2e.replicas import (
    LIST,
    Replicas,
    connect_user,
    refresh_counts,
    run_replicas,
    run_strict_upstream,
)
from tests.redis_server import RedisServer, redis_server  # noqa: F401


async def status_of(r: Replicas, i: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(r.procs[i].url + "/_broker/status") as resp:
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_thirty_users_through_expiries_refresh_once_each(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    ttl = 3  # the broker refreshes at 80% of the life: every 2.4 s per user
    async with run_strict_upstream(access_ttl=ttl) as up, run_replicas(tmp_path, redis_server, up) as r:
        users = [f"user-{n:02d}" for n in range(30)]
        await asyncio.gather(
            *(connect_user(r, u, (n % 3, (n + 1) % 3, (n + 2) % 3)) for n, u in enumerate(users))
        )
        assert len(up.provider.refreshed_at) == 0
        statuses: list[int] = []
        odd: list[Any] = []
        started = time.monotonic()
        async with aiohttp.ClientSession() as s:
            n = 0
            while time.monotonic() - started < 3 * ttl + 1:  # through three expiries
                batch = [r.post(s, (n + k) % 3, u) for k, u in enumerate(users)]
                answers = await asyncio.gather(*batch)
                statuses += [status for status, _, _ in answers]
                odd += [(h.get("X-Broker-Error"), body) for status, h, body in answers if status != 200]
                n += 1
                await asyncio.sleep(0.1)
        assert set(statuses) == {200}, (Counter_of(statuses), odd[:3])
        assert up.provider.reuses == 0 and not up.provider.revoked_families
        counts = refresh_counts(up)
        assert len(counts) == 30  # every user's grant was refreshed ...
        for fam, times in up.provider.refreshed_at.items():
            gaps = [b - a for a, b in itertools.pairwise(times)]
            # ... once per expiry: two refreshes of one expiry would be milliseconds apart
            assert all(g > ttl * 0.5 for g in gaps), (fam, gaps)
            assert 2 <= len(times) <= 5, (fam, len(times))
        # every replica served, and each one's status counts the 30 users as active
        docs = [await status_of(r, i) for i in range(3)]
        assert [d["routes"][0]["users"] for d in docs] == [{"active": 30}] * 3


def Counter_of(values: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


async def test_a_replica_killed_mid_refresh_leaves_the_user_connected(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    ttl = 2
    async with run_strict_upstream(access_ttl=ttl) as up, run_replicas(tmp_path, redis_server, up) as r:
        await connect_user(r, "carol", (0, 1, 2))
        async with aiohttp.ClientSession() as s:
            assert (await r.post(s, 0, "carol"))[0] == 200
            await asyncio.sleep(ttl)  # the token is due for a refresh on every replica
            up.slow.delay = 30.0
            up.slow.arrived.clear()
            holder = asyncio.create_task(r.post(s, 0, "carol"))
            await asyncio.wait_for(up.slow.arrived.wait(), 10)  # replica 0 holds the lease, mid-refresh
            r.procs[0].signal(signal.SIGKILL)
            with contextlib.suppress(aiohttp.ClientError):
                await holder
            up.slow.delay = 0.0
            started = time.monotonic()
            others = await asyncio.gather(r.post(s, 1, "carol"), r.post(s, 2, "carol"))
            waited = time.monotonic() - started
        assert [status for status, _, _ in others] == [200, 200], others
        assert waited < 10 + 5  # the dead holder's lease (10 s) expired, and the others went on
        assert up.slow.dropped == 1  # the killed replica's token request never reached the server
        assert up.provider.reuses == 0 and not up.provider.revoked_families
        assert sum(refresh_counts(up).values()) == 1  # one refresh, by one of the others


async def test_budget_spread_over_replicas_lets_exactly_ten_through(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    seen: list[dict[str, Any]] = []

    async def spend(request: web.Request) -> web.Response:
        seen.append(await request.json())
        await asyncio.sleep(0.05)  # answers overlap the other replicas' reservations
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/api/cards", spend)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    routes = [
        {
            "name": "api",
            "prefix": "/api",
            "upstream": f"http://127.0.0.1:{port}/api",
            "auth": {"type": "api_key", "key": "env:AGENTCARD_TEST_KEY"},
            "policy": {"budget": {"amount_cents": 10000, "per": "24h"}},
        }
    ]
    try:
        async with run_strict_upstream(access_ttl=60) as up:
            import os

            os.environ["AGENTCARD_TEST_KEY"] = "sk_test_FAKEreplicas0123456789abcdef"
            async with run_replicas(tmp_path, redis_server, up, routes) as r:
                async with aiohttp.ClientSession() as s:

                    async def one(i: int) -> int:
                        url = r.procs[i % 3].url + "/api/cards"
                        async with s.post(url, json={"amount_cents": 1000}) as resp:
                            return resp.status

                    statuses = await asyncio.gather(*(one(i) for i in range(30)))
                st = await status_of(r, 1)
        assert sorted(statuses).count(200) == 10 and sorted(statuses).count(403) == 20, statuses
        assert len(seen) == 10
        assert st["routes"][0]["budget"]["used"] == 10000 and st["routes"][0]["budget"]["left"] == 0
    finally:
        os.environ.pop("AGENTCARD_TEST_KEY", None)
        await runner.cleanup()


async def test_redis_down_refuses_then_serving_resumes_with_nothing_lost(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async with run_strict_upstream(access_ttl=60) as up, run_replicas(tmp_path, redis_server, up) as r:
        for n, user in enumerate(("dave", "erin")):
            await connect_user(r, user, (n, n + 1, 2))
        calls_before = up.recorder.calls[("POST", "/mcp")]
        results: list[tuple[float, int, str | None, int]] = []
        stop = asyncio.Event()

        async def load() -> None:
            async with aiohttp.ClientSession() as s:
                n = 0
                while not stop.is_set():
                    status, headers, _ = await r.post(s, n % 3, ("dave", "erin")[n % 2])
                    results.append((time.monotonic(), status, headers.get("X-Broker-Error"), n % 3))
                    n += 1
                    await asyncio.sleep(0.02)

        loader = asyncio.create_task(load())
        await asyncio.sleep(1)
        redis_server.stop()
        down_at = time.monotonic()
        await asyncio.sleep(5.5)
        # every replica's health check has seen it by now (a check each second, 2.5 s at most;
        # a replica whose last good check is 3.5 s old refuses all the same)
        during = [x for x in results if x[0] > down_at + 4]
        doc = await status_of(r, 2)
        forwarded_while_down = up.recorder.calls[("POST", "/mcp")]
        await asyncio.sleep(0.5)
        assert up.recorder.calls[("POST", "/mcp")] == forwarded_while_down  # nothing goes upstream
        redis_server.start()
        back_at = time.monotonic()

        def served_again(i: int) -> float | None:  # when replica i first answered 200 again
            return next((x[0] for x in results if x[0] > back_at and x[3] == i and x[1] == 200), None)

        while time.monotonic() - back_at < 15 and None in [served_again(i) for i in range(3)]:
            await asyncio.sleep(0.1)
        # each replica finds Redis back at its own next health check (once a second)
        resumed = max((served_again(i) or float("inf")) for i in range(3)) - back_at
        await asyncio.sleep(1)
        stop.set()
        await loader
    assert during and all(x[1:3] == (503, "store_unavailable") for x in during), during
    assert doc["store"]["ok"] is False and doc["store"]["place"].startswith("redis redis://127.0.0.1")
    assert resumed < 5, resumed
    after = [x for x in results if x[0] > back_at + resumed]
    assert after and all(x[1] == 200 for x in after), after
    assert forwarded_while_down > calls_before  # it served before
    assert up.provider.reuses == 0  # and no user lost their grant


async def test_store_health_and_clients_on_redis_are_visible(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    async with run_strict_upstream(access_ttl=60) as up, run_replicas(tmp_path, redis_server, up) as r:
        doc = await status_of(r, 0)
        assert doc["store"]["ok"] is True and doc["store"]["latency_ms"] is not None
        # the token `clients add` made against Redis authenticates on every replica; a wrong one nowhere
        async with aiohttp.ClientSession() as s:
            for i in range(3):
                status, headers, _ = await r.post(s, i, "frank")
                assert status == 403 and headers["X-Broker-Error"] == "needs_connect"
            async with s.post(
                r.procs[1].url + "/mcp", json=LIST, headers={"Authorization": "Bearer acb_wrong"}
            ) as resp:
                assert resp.status == 403 and resp.headers["X-Broker-Error"] == "client_unauthorized"
        raw = json.dumps(doc)
        assert r.token not in raw
