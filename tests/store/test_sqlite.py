"""broker/store/sqlite.py: the embedded store on a real SQLite file, the master key in the keyring."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
import stat
from pathlib import Path

import keyring
import pytest

from broker.auth.secret_store import SERVICE, KeyringStore
from broker.store.base import ConnectRecord, Grant, GrantInfo, StateStore, StoreError
from broker.store.crypto import MASTER_KEY_ACCOUNT, MasterKeyError, SealBroken
from broker.store.sqlite import SqliteStore
from tests.store.conftest import AT, RT, TOKENS, Clock

CONNECT_ID = "cn_FAKEconnectid0123456789abcdef"


def grant(user: str = "alice", route: str = "mcp", client: str = "librechat", **kw: object) -> Grant:
    fields: dict[str, object] = {"tokens": TOKENS, "state": "active", "expires_at": 1_000_900.0}
    fields.update(kw)
    return Grant(route, client, user, **fields)  # type: ignore[arg-type]


def raw_bytes(db_path: Path) -> bytes:
    """The database and its WAL and shared-memory files, as they are on disk."""
    return b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))


async def open_store(db_path: Path, clock: Clock | None = None) -> SqliteStore:
    return await SqliteStore.open(db_path, KeyringStore(), clock=clock or Clock())


# ---------------------------------------------------------------- grants


async def test_grant_round_trip_list_touch_and_delete(store: SqliteStore) -> None:
    typed: StateStore = store  # the engine offers the whole interface (mypy checks this line)
    assert await typed.get_grant("mcp", "librechat", "alice") is None
    await store.put_grant(grant())
    await store.put_grant(grant("bob", state="dead"))
    await store.put_grant(grant("carol", route="other"))
    got = await store.get_grant("mcp", "librechat", "alice")
    assert got == grant(version=1)
    assert AT not in repr(got) and RT not in repr(got)
    await store.touch_grant("mcp", "librechat", "alice", 1_000_123.0)
    touched = await store.get_grant("mcp", "librechat", "alice")
    assert touched is not None and touched.last_used == 1_000_123.0 and touched.tokens == TOKENS
    assert await store.list_grants("mcp") == [
        GrantInfo("mcp", "librechat", "alice", "active", 1_000_900.0, 1_000_123.0),
        GrantInfo("mcp", "librechat", "bob", "dead", 1_000_900.0, None),
    ]
    assert [i.user for i in await store.list_grants()] == ["alice", "bob", "carol"]
    await store.put_grant(grant(tokens='{"access_token": "at_FAKEnew"}'))  # a refresh replaces
    replaced = await store.get_grant("mcp", "librechat", "alice")
    assert replaced is not None and replaced.tokens == '{"access_token": "at_FAKEnew"}'
    assert replaced.version == 2
    assert await store.delete_grant("mcp", "librechat", "alice") is True
    assert await store.delete_grant("mcp", "librechat", "alice") is False
    assert await store.get_grant("mcp", "librechat", "alice") is None


async def test_no_token_connect_state_or_key_is_on_disk(store: SqliteStore, db_path: Path) -> None:
    await store.put_grant(grant())
    flow = '{"code_verifier": "pkce_FAKEverifier0123456789"}'
    await store.put_connect(CONNECT_ID, ConnectRecord("mcp", "librechat", "alice", "a@x", flow), 900)
    key = keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT)
    assert key is not None
    assert Path(str(db_path) + "-wal").stat().st_size > 0  # the rows are in the WAL right now
    raw = raw_bytes(db_path)
    assert b"alice" in raw and b"a@x" not in raw  # plain rows are greppable; the sealed label is not
    for secret in (AT, RT, "pkce_FAKEverifier", CONNECT_ID, key):
        assert secret.encode() not in raw
    assert base64.b64decode(key) not in raw
    await store.close()
    raw = raw_bytes(db_path)  # checkpointed into the main file on close
    assert b"alice" in raw and AT.encode() not in raw and RT.encode() not in raw


async def test_a_grant_moved_to_another_user_does_not_open(store: SqliteStore, db_path: Path) -> None:
    await store.put_grant(grant("alice"))
    await store.put_grant(grant("bob", tokens='{"access_token": "at_FAKEbob"}'))
    with sqlite3.connect(db_path) as conn:  # what someone with the file could do
        conn.execute(
            "UPDATE grants SET sealed = (SELECT sealed FROM grants WHERE user = 'alice') WHERE user = 'bob'"
        )
    with pytest.raises(SealBroken) as err:
        await store.get_grant("mcp", "librechat", "bob")
    text = str(err.value)
    assert "'bob'" in text and "'librechat'" in text and str(db_path) in text and "does not open" in text
    assert AT not in text and RT not in text and "at_FAKEbob" not in text
    assert await store.get_grant("mcp", "librechat", "alice") == grant("alice", version=1)


async def test_a_lost_or_replaced_master_key_fails_at_open(store: SqliteStore, db_path: Path) -> None:
    await store.put_grant(grant())
    await store.close()
    key = keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT)
    assert key is not None
    keyring.delete_password(SERVICE, MASTER_KEY_ACCOUNT)
    with pytest.raises(MasterKeyError) as err:
        await open_store(db_path)
    assert "missing" in str(err.value) and str(db_path) in str(err.value)
    assert keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT) is None  # no silent new key
    other = base64.b64encode(bytes(32)).decode()
    keyring.set_password(SERVICE, MASTER_KEY_ACCOUNT, other)
    with pytest.raises(MasterKeyError, match="is not the one") as err:
        await open_store(db_path)
    assert other not in str(err.value) and key not in str(err.value)
    keyring.set_password(SERVICE, MASTER_KEY_ACCOUNT, key)
    again = await open_store(db_path)
    assert await again.get_grant("mcp", "librechat", "alice") == grant(version=1)
    await again.close()


# ---------------------------------------------------------------- connect states


async def test_connect_state_is_single_use_and_expires(store: SqliteStore, clock: Clock) -> None:
    record = ConnectRecord("mcp", "librechat", "alice", "Alice <a@x>", '{"state": "s_FAKE"}')
    await store.put_connect(CONNECT_ID, record, 900)
    await store.put_connect("later", record, 900)
    assert await store.take_connect("unknown") is None
    assert await store.take_connect(CONNECT_ID) == record
    assert await store.take_connect(CONNECT_ID) is None
    clock.now += 899.9
    await store.put_connect("fresh", record, 900)
    clock.now += 0.2  # "later" is now past its 900 s
    assert await store.take_connect("later") is None
    assert await store.take_connect("fresh") == record
    assert "s_FAKE" not in repr(record)


async def test_concurrent_takes_of_one_id_have_one_winner(store: SqliteStore, db_path: Path) -> None:
    other = await open_store(db_path)  # a second connection and thread on the same file
    try:
        for n in range(5):
            cid = f"{CONNECT_ID}{n}"
            await store.put_connect(cid, ConnectRecord("mcp", "librechat", "alice"), 900)
            takes = [s.take_connect(cid) for _ in range(10) for s in (store, other)]
            got = await asyncio.gather(*takes)
            assert sum(r is not None for r in got) == 1
    finally:
        await other.close()


# ---------------------------------------------------------------- platform clients


async def test_clients_by_token_hash_and_removal(store: SqliteStore, clock: Clock) -> None:
    assert await store.add_client("librechat", "hash-1") is True
    clock.now += 5
    assert await store.add_client("openwebui", "hash-2") is True
    assert await store.add_client("librechat", "hash-3") is False  # the name is taken: nothing changes
    assert await store.client_for_token_hash("hash-1") == "librechat"
    assert await store.client_for_token_hash("hash-3") is None
    assert await store.client_for_token_hash("HASH-1") is None
    assert [(c.name, c.created_at) for c in await store.list_clients()] == [
        ("librechat", 1_000_000.0),
        ("openwebui", 1_000_005.0),
    ]
    assert await store.remove_client("librechat") is True
    assert await store.remove_client("librechat") is False
    assert await store.client_for_token_hash("hash-1") is None
    assert [c.name for c in await store.list_clients()] == ["openwebui"]


# ---------------------------------------------------------------- leases


async def test_a_lease_has_one_holder_until_released_or_expired(store: SqliteStore, clock: Clock) -> None:
    key = "refresh:mcp:librechat:alice"
    assert await store.acquire_lease(key, "replica-a", 10) is True
    assert await store.acquire_lease(key, "replica-b", 10) is False
    assert await store.acquire_lease("refresh:mcp:librechat:bob", "replica-b", 10) is True  # per user
    clock.now += 5
    assert await store.acquire_lease(key, "replica-a", 10) is True  # renewed: now until +15
    await store.release_lease(key, "replica-b")  # not b's: no effect
    clock.now += 9
    assert await store.acquire_lease(key, "replica-b", 10) is False
    clock.now += 1.5  # a's lease ran out (a died holding it)
    assert await store.acquire_lease(key, "replica-b", 10) is True
    await store.release_lease(key, "replica-b")
    assert await store.acquire_lease(key, "replica-a", 10) is True


async def test_concurrent_acquires_have_one_winner(store: SqliteStore, db_path: Path) -> None:
    other = await open_store(db_path)
    try:
        tries = [s.acquire_lease("k", f"holder-{i}-{id(s)}", 10) for i in range(10) for s in (store, other)]
        assert sum(await asyncio.gather(*tries)) == 1
    finally:
        await other.close()


# ---------------------------------------------------------------- the file


async def test_file_modes_and_reopening_keeps_the_data(store: SqliteStore, db_path: Path) -> None:
    await store.put_grant(grant())
    await store.add_client("librechat", "hash-1")
    await store.put_connect(CONNECT_ID, ConnectRecord("mcp", "librechat", "alice"), 900)
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    for suffix in ("", "-wal", "-shm"):
        assert stat.S_IMODE(Path(str(db_path) + suffix).stat().st_mode) == 0o600, suffix
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    await store.close()
    with pytest.raises(StoreError, match="is closed"):
        await store.get_grant("mcp", "librechat", "alice")
    again = await open_store(db_path)
    try:
        assert await again.get_grant("mcp", "librechat", "alice") == grant(version=1)
        assert await again.client_for_token_hash("hash-1") == "librechat"
        assert await again.take_connect(CONNECT_ID) == ConnectRecord("mcp", "librechat", "alice")
    finally:
        await again.close()


async def test_a_file_others_can_read_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(mode=0o700)
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)
    with pytest.raises(StoreError, match=r"mode 0600; run: chmod 600"):
        await open_store(db_path)


@pytest.mark.parametrize("damage", ["not a database", "pages overwritten"])
async def test_a_corrupted_file_is_named(db_path: Path, damage: str) -> None:
    if damage == "not a database":
        db_path.parent.mkdir(mode=0o700)
        db_path.write_bytes(b"this is not SQLite, it is a note\n" * 200)
    else:
        s = await open_store(db_path)
        for n in range(50):
            await s.put_grant(grant(f"user-{n}"))
        await s.close()
        data = bytearray(db_path.read_bytes())
        data[100:] = b"\xa5" * (len(data) - 100)  # the header stays, everything after is garbage
        db_path.write_bytes(bytes(data))
    db_path.chmod(0o600)
    with pytest.raises(StoreError) as err:
        await open_store(db_path)
    assert str(db_path) in str(err.value)
    assert "cannot be used as the state store" in str(err.value)


async def test_a_newer_schema_is_refused(store: SqliteStore, db_path: Path) -> None:
    await store.close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreError, match=r"newer broker \(schema 99"):
        await open_store(db_path)


# ---------------------------------------------------------------- hostile names

ODD = [
    "alice",
    "Alice",
    "alice ",
    " alice",
    "a" * 10_000,
    "'; DROP TABLE grants; --",
    '" OR 1=1 --',
    "%",
    "_",
    "al%",
    "a\nb\r\n",
    "a\x00b",
    "a",
    "ü",
    "u\u0308",  # u + combining diaeresis: not "ü"
    "🙂",
    "\\",
]


async def test_odd_names_are_kept_and_matched_exactly(store: SqliteStore) -> None:
    for i, user in enumerate(ODD):
        await store.put_grant(grant(user, route=user, tokens=f'{{"n": {i}}}'))
        await store.put_connect(user, ConnectRecord(user, "c", user), 900)
    assert await store.add_client(ODD[5], ODD[6]) is True
    for i, user in enumerate(ODD):
        got = await store.get_grant(user, "librechat", user)
        assert got is not None and got.tokens == f'{{"n": {i}}}' and got.user == user, repr(user)
        assert [g.user for g in await store.list_grants(user)] == [user]
        assert await store.take_connect(user) == ConnectRecord(user, "c", user)
    assert len(await store.list_grants()) == len(ODD)
    assert await store.client_for_token_hash(ODD[6]) == ODD[5]
    assert await store.get_grant("mcp", "librechat", "'; DROP TABLE grants; --") is None
    with pytest.raises(StoreError, match="not valid text"):
        await store.put_grant(grant("\ud800"))
