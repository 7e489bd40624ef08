"""broker/store/redis.py: the shared store on a real redis-server on 127.0.0.1 (one per test, with
an fsynced append-only file), the master key in the keyring file backend or a 0600 file."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import keyring
import pytest
import redis.asyncio as redis_client
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.auth.secret_store import SERVICE, KeyringStore
from broker.config import RedisSettings, SecretRef
from broker.store import redis as redis_store
from broker.store.base import ConnectRecord, Grant, GrantInfo, SharedCounters, StateStore, StoreError
from broker.store.crypto import MASTER_KEY_ACCOUNT, MasterKeyError, SealBroken
from broker.store.redis import RedisStore
from tests.redis_server import RedisServer, TlsFiles, redis_server  # noqa: F401 - the fixture
from tests.store.conftest import AT, RT, TOKENS, Clock

CONNECT_ID = "cn_FAKEconnectid0123456789abcdef"
PASSWORD = "pw_FAKEredispassword0123456789"
ODD = ["a*", "b?", "[c]", "[!d]", "e:f", "g.h", "i|j", "k\\l", "ü", "u\u0308", "🙂", "m n", "%", "*"]


def grant(user: str = "alice", route: str = "mcp", client: str = "librechat", **kw: object) -> Grant:
    fields: dict[str, object] = {"tokens": TOKENS, "state": "active", "expires_at": 1_000_900.0}
    fields.update(kw)
    return Grant(route, client, user, **fields)  # type: ignore[arg-type]


async def open_store(server: RedisServer, *, clock: Clock | None = None, **kw: Any) -> RedisStore:
    settings = RedisSettings(server.url, **kw)
    return await RedisStore.open(settings, KeyringStore(), clock=clock or Clock())


@pytest.fixture
async def store(redis_server: RedisServer, clock: Clock) -> AsyncIterator[RedisStore]:  # noqa: F811
    s = await open_store(redis_server, clock=clock)
    yield s
    await s.close()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[redis_client.Redis]:  # noqa: F811
    """What anyone with access to the Redis server sees and can change."""
    r = redis_client.Redis(host="127.0.0.1", port=redis_server.port)
    yield r
    await r.aclose()


async def everything_in(r: redis_client.Redis) -> bytes:
    """Every key and value in the server, as bytes."""
    out = []
    async for key in r.scan_iter():
        kind = str(await r.type(key), "ascii")  # type: ignore[arg-type]
        out.append(key)
        if kind == "string":
            out.append(await r.get(key) or b"")
        elif kind == "hash":
            out += [b for kv in (await r.hgetall(key)).items() for b in kv]
        elif kind == "set":
            out += list(await r.smembers(key))
        elif kind == "zset":
            out += list(await r.zrange(key, 0, -1))
    return b"\n".join(out)


def on_disk(server: RedisServer) -> bytes:
    return b"".join(p.read_bytes() for p in (server.data_dir / "appendonlydir").iterdir())


# ---------------------------------------------------------------- grants


async def test_grant_round_trip_versions_touch_and_delete(store: RedisStore) -> None:
    typed: StateStore = store  # the engine offers both interfaces (mypy checks these lines)
    counters: SharedCounters = store
    assert typed is store and counters is store and store.description.startswith("redis redis://127.0.0.1:")
    assert await store.get_grant("mcp", "librechat", "alice") is None
    await store.put_grant(grant())
    await store.put_grant(grant("bob", state="dead", expires_at=None))
    await store.put_grant(grant("carol", route="other"))
    got = await store.get_grant("mcp", "librechat", "alice")
    assert got == grant(version=1)
    assert AT not in repr(got) and RT not in repr(got)
    await store.touch_grant("mcp", "librechat", "alice", 1_000_123.5)
    await store.touch_grant("mcp", "librechat", "nobody", 1_000_123.5)  # touches no one, makes no one
    assert await store.get_grant("mcp", "librechat", "nobody") is None
    touched = await store.get_grant("mcp", "librechat", "alice")
    assert touched == grant(last_used=1_000_123.5, version=1)  # a touch is not a write of the grant
    assert await store.list_grants("mcp") == [
        GrantInfo("mcp", "librechat", "alice", "active", 1_000_900.0, 1_000_123.5),
        GrantInfo("mcp", "librechat", "bob", "dead", None, None),
    ]
    assert [(i.route, i.user) for i in await store.list_grants()] == [
        ("mcp", "alice"),
        ("mcp", "bob"),
        ("other", "carol"),
    ]
    assert await store.count_grants("mcp") == {"active": 1, "dead": 1}
    await store.put_grant(grant(tokens='{"access_token": "at_FAKEnew"}'))  # a reconnect replaces
    assert await store.get_grant("mcp", "librechat", "alice") == grant(
        tokens='{"access_token": "at_FAKEnew"}', version=2
    )
    assert await store.delete_grant("mcp", "librechat", "alice") is True
    assert await store.delete_grant("mcp", "librechat", "alice") is False
    assert await store.get_grant("mcp", "librechat", "alice") is None
    assert await store.delete_grant("other", "librechat", "carol") is True
    assert await store.list_grants() == [GrantInfo("mcp", "librechat", "bob", "dead", None, None)]
    assert await store.count_grants("other") == {}


async def test_replace_grant_writes_only_over_the_version_it_read(
    store: RedisStore,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    assert await store.replace_grant(grant(), 0) is False  # never over a missing grant (deleted meanwhile)
    assert await store.get_grant("mcp", "librechat", "alice") is None
    await store.put_grant(grant())
    read = await store.get_grant("mcp", "librechat", "alice")
    assert read is not None and read.version == 1
    assert await store.replace_grant(grant(tokens='{"n": 1}'), read.version) is True
    assert await store.replace_grant(grant(tokens='{"n": 2}'), read.version) is False  # stale
    now = await store.get_grant("mcp", "librechat", "alice")
    assert now is not None and now.tokens == '{"n": 1}' and now.version == 2
    # two replicas refreshing the same grant at once: exactly one rotated pair is kept
    other = await open_store(redis_server)
    try:
        results = await asyncio.gather(
            *(s.replace_grant(grant(tokens=f'{{"by": {i}}}'), 2) for i, s in enumerate([store, other] * 5))
        )
        assert sum(results) == 1
        winner = results.index(True)
        kept = await other.get_grant("mcp", "librechat", "alice")
        assert kept is not None and kept.tokens == f'{{"by": {winner}}}' and kept.version == 3
    finally:
        await other.close()


async def test_no_token_connect_state_document_or_key_is_in_redis_or_on_disk(
    store: RedisStore,
    raw: redis_client.Redis,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    await store.put_grant(grant())
    flow = '{"code_verifier": "pkce_FAKEverifier0123456789"}'
    await store.put_connect(CONNECT_ID, ConnectRecord("mcp", "librechat", "alice", "a@x", flow), 900)
    await store.put_doc("oauth-client:mcp", '{"client_secret": "cs_FAKEclientsecret0123"}')
    key = keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT)
    assert key is not None
    seen = await everything_in(raw)
    stored = on_disk(redis_server)  # appendfsync always: every write is in the file already
    for data in (seen, stored):
        assert b"active" in data  # the plain fields are there to see; the sealed ones are not
        for secret in (AT, RT, "pkce_FAKEverifier", CONNECT_ID, "a@x", "cs_FAKEclientsecret", key):
            assert secret.encode() not in data, secret
        assert base64.b64decode(key) not in data


async def test_a_grant_moved_to_another_user_does_not_open(
    store: RedisStore, raw: redis_client.Redis
) -> None:
    await store.put_grant(grant("alice"))
    await store.put_grant(grant("bob", tokens='{"access_token": "at_FAKEbob"}'))
    keys = sorted([k async for k in raw.scan_iter(match="agentcard-broker:grant:*")])
    assert len(keys) == 2
    alice_key, bob_key = (k for user in (b"alice", b"bob") for k in keys if k.endswith(_b64(user)))
    await raw.copy(alice_key, bob_key, replace=True)  # what someone with access to Redis could do
    with pytest.raises(SealBroken) as err:
        await store.get_grant("mcp", "librechat", "bob")
    text = str(err.value)
    assert (
        "'bob'" in text and "'librechat'" in text and "redis://127.0.0.1" in text and "does not open" in text
    )
    assert AT not in text and RT not in text and "at_FAKEbob" not in text
    assert await store.get_grant("mcp", "librechat", "alice") == grant("alice", version=1)
    await raw.hset(alice_key, "sealed", b"\x01" + bytes(40))  # damaged in place
    with pytest.raises(SealBroken, match="'alice'"):
        await store.get_grant("mcp", "librechat", "alice")


def _b64(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


async def test_glob_and_separator_characters_in_names_are_only_themselves(
    store: RedisStore,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    for i, name in enumerate(ODD):
        await store.put_grant(grant(name, route=name, client=name, tokens=f'{{"n": {i}}}'))
        await store.put_grant(grant(name, route="shared", state=f"s{i % 3}"))
    for i, name in enumerate(ODD):
        got = await store.get_grant(name, name, name)
        assert got is not None and got.tokens == f'{{"n": {i}}}', repr(name)
        assert [(g.route, g.client, g.user) for g in await store.list_grants(name)] == [(name, name, name)]
        assert await store.count_grants(name) == {"active": 1}
    assert {g.user for g in await store.list_grants("shared")} == set(ODD)
    assert await store.count_grants("shared") == {"s0": 5, "s1": 5, "s2": 4}
    assert len(await store.list_grants()) == 2 * len(ODD)
    assert await store.get_grant("a", "a", "a") is None and await store.list_grants("a") == []
    assert await store.delete_grant("*", "*", "*") is True
    assert await store.get_grant("a*", "a*", "a*") is not None  # "*" matched only itself
    # another broker on the same Redis, under its own prefix, sees none of it
    neighbour = await open_store(redis_server, prefix="agentcard-broker-2")
    try:
        assert await neighbour.list_grants() == [] and await neighbour.count_grants("shared") == {}
    finally:
        await neighbour.close()
    with pytest.raises(StoreError, match="not valid text"):
        await store.put_grant(grant("\ud800"))
    with pytest.raises(StoreError, match="not valid text"):
        await store.acquire_lease("\ud800", "me", 10)


async def test_listing_reads_in_batches(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_store, "SCAN_BATCH", 7)
    for n in range(60):
        await store.put_grant(grant(f"user-{n:02d}", state="dead" if n % 4 == 0 else "active"))
    assert [g.user for g in await store.list_grants("mcp")] == [f"user-{n:02d}" for n in range(60)]
    assert await store.count_grants("mcp") == {"active": 45, "dead": 15}


# ---------------------------------------------------------------- connect states


async def test_a_connect_state_is_taken_once_and_expires(
    store: RedisStore,
    raw: redis_client.Redis,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    record = ConnectRecord("mcp", "librechat", "alice", "Alice <a@x>", '{"state": "s_FAKE"}')
    await store.put_connect(CONNECT_ID, record, 900)
    keys = [k async for k in raw.scan_iter(match="agentcard-broker:connect:*")]
    assert len(keys) == 1 and 899_000 < await raw.pttl(keys[0]) <= 900_000  # Redis drops it itself
    assert await store.take_connect("unknown") is None
    assert await store.take_connect(CONNECT_ID) == record
    assert await store.take_connect(CONNECT_ID) is None
    await store.put_connect("short", record, 0.05)
    await asyncio.sleep(0.1)
    assert await store.take_connect("short") is None
    other = await open_store(redis_server)
    try:
        for n in range(3):
            cid = f"{CONNECT_ID}{n}"
            await store.put_connect(cid, record, 900)
            got = await asyncio.gather(*(s.take_connect(cid) for s in [store, other] * 10))
            assert sum(r is not None for r in got) == 1
    finally:
        await other.close()


# ---------------------------------------------------------------- platform clients, leases, documents


async def test_clients_by_token_hash_and_removal(store: RedisStore, clock: Clock) -> None:
    assert await store.add_client("librechat", "hash-1") is True
    clock.now += 5
    assert await store.add_client("openwebui", "hash-2") is True
    assert await store.add_client("librechat", "hash-3") is False  # the name is taken: nothing changes
    assert await store.client_for_token_hash("hash-3") is None
    with pytest.raises(StoreError, match="has this client token"):
        await store.add_client("third", "hash-2")
    assert await store.client_for_token_hash("hash-1") == "librechat"
    assert await store.client_for_token_hash("HASH-1") is None
    assert [(c.name, c.created_at) for c in await store.list_clients()] == [
        ("librechat", 1_000_000.0),
        ("openwebui", 1_000_005.0),
    ]
    assert await store.remove_client("librechat") is True
    assert await store.remove_client("librechat") is False
    assert await store.client_for_token_hash("hash-1") is None
    assert [c.name for c in await store.list_clients()] == ["openwebui"]
    assert await store.add_client("again", "hash-1") is True  # the removed client's token is free


async def test_a_lease_has_one_holder_until_released_or_expired(
    store: RedisStore,
    raw: redis_client.Redis,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    key = "refresh:mcp:librechat:a*"
    assert await store.acquire_lease(key, "replica-a", 10) is True
    assert await store.acquire_lease(key, "replica-b", 10) is False
    assert await store.acquire_lease("refresh:mcp:librechat:a", "replica-b", 10) is True  # per user
    await raw.pexpire(f"agentcard-broker:lease:{key}", 2000)
    assert await store.acquire_lease(key, "replica-a", 10) is True  # renewed
    assert await raw.pttl(f"agentcard-broker:lease:{key}") > 9000
    await store.release_lease(key, "replica-b")  # not b's: no effect
    assert await store.acquire_lease(key, "replica-b", 10) is False
    await store.release_lease(key, "replica-a")
    assert await store.acquire_lease(key, "replica-b", 0.05) is True
    await asyncio.sleep(0.1)  # b died holding it
    assert await store.acquire_lease(key, "replica-a", 10) is True
    other = await open_store(redis_server)
    try:
        tries = [s.acquire_lease("k", f"holder-{i}", 10) for i, s in enumerate([store, other] * 10)]
        assert sum(await asyncio.gather(*tries)) == 1
    finally:
        await other.close()


async def test_documents_are_sealed_and_written_once_when_asked(
    store: RedisStore, raw: redis_client.Redis
) -> None:
    assert await store.get_doc("oauth-client:mcp") is None
    assert await store.put_doc("oauth-client:mcp", '{"client_id": "one"}', only_new=True) is True
    assert await store.put_doc("oauth-client:mcp", '{"client_id": "two"}', only_new=True) is False
    assert await store.get_doc("oauth-client:mcp") == '{"client_id": "one"}'
    assert await store.put_doc("oauth-client:mcp", '{"client_id": "three"}') is True
    assert await store.get_doc("oauth-client:mcp") == '{"client_id": "three"}'
    await raw.copy("agentcard-broker:doc:oauth-client:mcp", "agentcard-broker:doc:oauth-client:other")
    with pytest.raises(SealBroken, match="'oauth-client:other'"):
        await store.get_doc("oauth-client:other")
    assert await store.delete_doc("oauth-client:mcp") is True
    assert await store.delete_doc("oauth-client:mcp") is False
    assert await store.get_doc("oauth-client:mcp") is None


# ---------------------------------------------------------------- shared budgets and rates


async def test_a_budget_lets_exactly_what_fits_through_three_replicas(
    store: RedisStore,
    raw: redis_client.Redis,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    replicas = [store, await open_store(redis_server), await open_store(redis_server)]
    try:
        spends = await asyncio.gather(
            *(replicas[i % 3].reserve_budget("mcp:alice*", 1000, 10_000, 3600) for i in range(30))
        )
        assert sum(s.ok for s in spends) == 10
        assert sorted(s.used for s in spends if s.ok) == list(range(0, 10_000, 1000))
        assert all(s.used == 10_000 and s.entry == "" for s in spends if not s.ok)
        assert all(isinstance(s.used, int) for s in spends)  # whole cents are ints, as the ledger shows
        assert await replicas[1].budget_used("mcp:alice*", 3600) == 10_000
        assert await replicas[2].budget_used("mcp:alice", 3600) == 0  # another account
        given_back = next(s for s in spends if s.ok)
        await replicas[2].refund_budget("mcp:alice*", given_back.entry)
        assert await store.budget_used("mcp:alice*", 3600) == 9000
        again = await replicas[1].reserve_budget("mcp:alice*", 1000, 10_000, 3600)
        assert again.ok and again.used == 9000
        keys = [k async for k in raw.scan_iter(match="agentcard-broker:budget:*")]
        assert len(keys) == 1 and 0 < await raw.pttl(keys[0]) <= 3_600_000  # it goes when idle
    finally:
        for s in replicas[1:]:
            await s.close()


async def test_budget_cents_and_the_rolling_window(store: RedisStore) -> None:
    assert (await store.reserve_budget("a", 0.5, 10, 60)).ok
    second = await store.reserve_budget("a", 0.25, 10, 60)
    assert second.ok and second.used == 0.5
    assert await store.budget_used("a", 60) == 0.75
    assert (await store.reserve_budget("a", 9.25, 10, 60)).ok  # exactly the limit fits
    refused = await store.reserve_budget("a", 0.01, 10, 60)
    assert not refused.ok and refused.used == 10 and isinstance(refused.used, int)
    assert (await store.reserve_budget("w", 1000, 1000, 0.15)).ok
    assert not (await store.reserve_budget("w", 1, 1000, 0.15)).ok
    await asyncio.sleep(0.2)  # timed by the server's clock
    assert await store.budget_used("w", 0.15) == 0
    assert (await store.reserve_budget("w", 1000, 1000, 0.15)).ok


async def test_a_rate_admits_exactly_the_limit_and_says_when_to_retry(
    store: RedisStore,
    raw: redis_client.Redis,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    other = await open_store(redis_server)
    try:
        waits = await asyncio.gather(*(s.hit_rate("mcp:bob?", 5, 60) for s in [store, other] * 10))
        assert waits.count(0.0) == 5
        assert all(0 < w <= 60 for w in waits if w)
        keys = [k async for k in raw.scan_iter(match="agentcard-broker:rate:*")]
        assert len(keys) == 1 and await raw.zcard(keys[0]) == 5 and 0 < await raw.pttl(keys[0]) <= 60_000
        assert await store.hit_rate("mcp:bob", 5, 60) == 0.0  # another key
        assert await store.hit_rate("short", 1, 0.15) == 0.0
        wait = await other.hit_rate("short", 1, 0.15)
        assert 0 < wait <= 0.15
        await asyncio.sleep(wait + 0.02)
        assert await store.hit_rate("short", 1, 0.15) == 0.0
    finally:
        await other.close()


# ---------------------------------------------------------------- the password and the master key


async def test_the_password_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock
) -> None:
    server = RedisServer(tmp_path / "locked", password=PASSWORD)
    server.start()
    try:
        monkeypatch.setenv("REDIS_PW", PASSWORD)
        good = await open_store(server, password=SecretRef("env", "REDIS_PW"))
        await good.put_grant(grant())
        assert await good.get_grant("mcp", "librechat", "alice") == grant(version=1)
        assert PASSWORD not in repr(good) and PASSWORD not in good.description
        await good.close()
        wrong_pw = "pw_FAKEwrongpassword987654321"
        monkeypatch.setenv("REDIS_PW", wrong_pw)
        for ref in (SecretRef("env", "REDIS_PW"), None):  # a wrong password, and none
            bad = await open_store(server, password=ref)
            with pytest.raises(StoreError) as err:
                await bad.get_grant("mcp", "librechat", "alice")
            text = str(err.value)
            assert "refused the login" in text and "AuthenticationError" in text and server.url in text
            assert PASSWORD not in text and wrong_pw not in text
            assert AT not in text
            await bad.close()
    finally:
        server.stop()


async def test_a_missing_password_names_the_fix(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    monkeypatch.delenv("REDIS_PW", raising=False)
    cases = [
        (SecretRef("keyring"), "agentcard-broker set-key store"),
        (SecretRef("env", "REDIS_PW"), "environment variable REDIS_PW"),
        (SecretRef("file", str(tmp_path / "pw")), f"write it to {tmp_path / 'pw'}"),
    ]
    for ref, fix in cases:
        with pytest.raises(StoreError, match="password") as err:
            await open_store(redis_server, password=ref)
        assert fix in str(err.value) and redis_server.url in str(err.value)


def key_file(path: Path, key: bytes) -> SecretRef:
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(0o600)
    return SecretRef("file", str(path))


async def test_a_master_key_file_shared_by_replicas(
    tmp_path: Path,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    shared = key_file(tmp_path / "master.key", os.urandom(32))
    one = await open_store(redis_server, master_key=shared)
    two = await open_store(redis_server, master_key=shared)
    try:
        await one.put_grant(grant("alice"))
        await two.put_grant(grant("bob"))
        assert await two.get_grant("mcp", "librechat", "alice") == grant("alice", version=1)
        assert await one.get_grant("mcp", "librechat", "bob") == grant("bob", version=1)
        assert keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT) is None  # the file's key, not a new one
    finally:
        await one.close()
        await two.close()
    stranger = await open_store(redis_server, master_key=key_file(tmp_path / "other.key", os.urandom(32)))
    with pytest.raises(MasterKeyError, match="is not the one") as err:
        await stranger.get_grant("mcp", "librechat", "alice")
    assert redis_server.url in str(err.value)
    with pytest.raises(MasterKeyError):  # asked again, refused again: no key check is overwritten
        await stranger.ping()
    await stranger.close()
    from_keyring = await open_store(redis_server)  # no key in this keyring: never a silent new one
    with pytest.raises(MasterKeyError, match="missing"):
        await from_keyring.list_grants()
    assert keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT) is None
    await from_keyring.close()


class SlowKeyring(KeyringStore):
    """The keyring file backend, as slow to answer as a Secret Service over D-Bus can be."""

    def get(self, account: str) -> str | None:
        time.sleep(0.05)
        return super().get(account)


async def test_brokers_sharing_a_keyring_make_one_key_on_a_new_redis(
    redis_server: RedisServer,  # noqa: F811
) -> None:
    # without the lock around the first key check, each would find no key and create its own
    stores = [await RedisStore.open(RedisSettings(redis_server.url), SlowKeyring()) for _ in range(5)]
    try:
        await asyncio.gather(*(s.put_grant(grant(f"user-{i}")) for i, s in enumerate(stores)))
        for s in stores:
            assert len(await s.list_grants()) == 5
    finally:
        for s in stores:
            await s.close()
    again = await open_store(redis_server)  # the key the keyring holds is the one Redis was sealed with
    assert await again.get_grant("mcp", "librechat", "user-3") == grant("user-3", version=1)
    await again.close()


# ---------------------------------------------------------------- Redis down, slow, back


async def test_redis_down_at_open_fails_fast_and_comes_back_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "FAIL_FAST_S", 0.3)
    server = RedisServer(tmp_path / "later")
    store = await open_store(server)  # nothing listens yet: open does not need Redis
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot be reached") as err:
            await store.get_grant("mcp", "librechat", "alice")
        assert server.url.rsplit("/", 1)[0] in str(err.value)
        with pytest.raises(StoreError, match="next try"):  # within the window: the network is not tried
            await store.ping()
        assert time.monotonic() - started < 0.25
        server.start()  # (however long a loaded machine takes to start it)
        await asyncio.sleep(0.35)
        assert await store.ping() < 1
        await store.put_grant(grant())
        await store.add_client("librechat", "hash-1")
        server.kill()  # a crash: the append-only file holds every write
        with pytest.raises(StoreError, match="cannot be reached"):
            await store.get_grant("mcp", "librechat", "alice")
        server.start()
        await asyncio.sleep(0.35)
        assert await store.get_grant("mcp", "librechat", "alice") == grant(version=1)
        assert await store.replace_grant(grant(tokens="{}"), 1) is True  # scripts loaded again
        assert await store.client_for_token_hash("hash-1") == "librechat"
    finally:
        await store.close()
        server.stop()


async def test_a_redis_that_stops_answering_costs_one_timeout_then_fails_fast(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    monkeypatch.setattr(redis_store, "TIMEOUT_S", 0.3)
    monkeypatch.setattr(redis_store, "FAIL_FAST_S", 0.5)
    store = await open_store(redis_server)
    try:
        await store.put_grant(grant())
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(StoreError, match="Timeout"):
            await store.get_grant("mcp", "librechat", "alice")
        assert 0.25 < time.monotonic() - started < 1.0
        started = time.monotonic()
        for _ in range(5):
            with pytest.raises(StoreError, match="next try"):
                await store.hit_rate("k", 5, 60)
        assert time.monotonic() - started < 0.05
        redis_server.resume()
        await asyncio.sleep(0.5)
        assert await store.get_grant("mcp", "librechat", "alice") == grant(version=1)
    finally:
        await store.close()


async def test_a_closed_store_says_so(store: RedisStore) -> None:
    await store.put_grant(grant())
    await store.close()
    await store.close()
    with pytest.raises(StoreError, match="is closed"):
        await store.get_grant("mcp", "librechat", "alice")


# ---------------------------------------------------------------- TLS


def make_tls(where: Path) -> TlsFiles:
    """A CA of our own and a certificate it signs for 127.0.0.1 (what `ca_file:` is for)."""
    where.mkdir()
    now = datetime.datetime.now(datetime.UTC)

    def issue(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        ca: x509.Certificate | None,
        signer: ec.EllipticCurvePrivateKey,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca.subject if ca else name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
            )
        )
        if ca is not None:
            san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
            builder = builder.add_extension(san, critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = issue("agentcard-broker test CA", ca_key, None, ca_key)
    cert = issue("127.0.0.1", key, ca, ca_key)
    files = TlsFiles(where / "server.pem", where / "server.key", where / "ca.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


async def test_rediss_checks_the_certificate(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    server = RedisServer(tmp_path / "tls-redis", tls=tls)
    server.start()
    try:
        assert server.url.startswith("rediss://")
        trusted = await RedisStore.open(RedisSettings(server.url, ca_file=str(tls.ca)), KeyringStore())
        await trusted.put_grant(grant())
        assert await trusted.get_grant("mcp", "librechat", "alice") == grant(version=1)
        await trusted.close()
        untrusted = await RedisStore.open(RedisSettings(server.url), KeyringStore())  # the system's CAs
        with pytest.raises(StoreError, match="certificate verify failed"):
            await untrusted.ping()
        await untrusted.close()
        plain = await RedisStore.open(RedisSettings(server.url.replace("rediss:", "redis:")), KeyringStore())
        with pytest.raises(StoreError, match="cannot be reached"):
            await plain.ping()
        await plain.close()
    finally:
        server.stop()
