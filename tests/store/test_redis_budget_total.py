"""The Redis budget window's running total: it always equals the sum of the reservations still in
the window, through spends, refunds, entries leaving the window, and a total lost or from before."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_client

from tests.redis_server import RedisServer, redis_server  # noqa: F401 - the fixture
from tests.store.test_redis_store import open_store

WINDOW_KEY = "agentcard-broker:budget:"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis_client.Redis]:  # noqa: F811
    r = redis_client.Redis(host="127.0.0.1", port=redis_server.port)
    yield r
    await r.aclose()


async def entries_sum(r: redis_client.Redis) -> float:
    keys = [k async for k in r.scan_iter(match=WINDOW_KEY + "*")]
    total = 0.0
    for key in keys:
        for m in await r.zrange(key, 0, -1):
            total += float(m.decode().rpartition("|")[2])
    return total


async def test_the_total_follows_spends_refunds_and_the_window(
    redis_server: RedisServer,  # noqa: F811
    raw: redis_client.Redis,
) -> None:
    store = await open_store(redis_server)
    rng = random.Random(7)
    kept: list[str] = []
    try:
        for _ in range(200):
            if kept and rng.random() < 0.3:
                await store.refund_budget("acct", kept.pop(rng.randrange(len(kept))))
                await store.refund_budget("acct", "nope|5")  # not a reservation: changes nothing
            else:
                spend = await store.reserve_budget("acct", rng.choice([100, 250, 999.5]), 10**9, 3600)
                assert spend.ok
                kept.append(spend.entry)
            assert await store.budget_used("acct", 3600) == pytest.approx(await entries_sum(raw))
        # a refund given twice comes off once
        before = await store.budget_used("acct", 3600)
        entry = kept.pop()
        await store.refund_budget("acct", entry)
        await store.refund_budget("acct", entry)
        given_back = float(entry.rpartition("|")[2])
        assert await store.budget_used("acct", 3600) == pytest.approx(before - given_back)
    finally:
        await store.close()


async def test_entries_leaving_the_window_come_off_and_a_lost_total_is_rebuilt(
    redis_server: RedisServer,  # noqa: F811
    raw: redis_client.Redis,
) -> None:
    store = await open_store(redis_server)
    try:
        for _ in range(5):
            assert (await store.reserve_budget("short", 1000, 10_000, 0.3)).ok
        assert await store.budget_used("short", 0.3) == 5000
        await asyncio.sleep(0.4)  # all five leave the window
        spend = await store.reserve_budget("short", 10_000, 10_000, 0.3)
        assert spend.ok and spend.used == 0
        # the total lost (or written by a version without one): rebuilt from the window once
        for key in [k async for k in raw.scan_iter(match="agentcard-broker:budget_total:*")]:
            await raw.delete(key)
        assert await store.budget_used("short", 0.3) == 10_000
        refused = await store.reserve_budget("short", 1, 10_000, 0.3)
        assert not refused.ok and refused.used == 10_000
    finally:
        await store.close()
