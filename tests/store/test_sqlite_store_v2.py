"""broker/store/sqlite.py, schema 2: grant versions (compare and set), sealed documents, counts,
ping, and the migration of a file written by schema 1. A real SQLite file, the key in the keyring."""

from __future__ import annotations

import asyncio
import base64
import sqlite3
from dataclasses import replace
from pathlib import Path

import keyring
import pytest

from broker.auth.secret_store import SERVICE, KeyringStore
from broker.store import crypto
from broker.store.base import Grant, StoreError
from broker.store.crypto import MASTER_KEY_ACCOUNT
from broker.store.sqlite import MIGRATIONS, SqliteStore
from tests.store.conftest import AT, RT, TOKENS
from tests.store.test_sqlite import ODD, grant, open_store, raw_bytes

# schema 1 exactly as released: files out there were made by these statements
V1 = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
    "CREATE TABLE grants (route TEXT NOT NULL, client TEXT NOT NULL, user TEXT NOT NULL,"
    " sealed BLOB NOT NULL, state TEXT NOT NULL, expires_at REAL, last_used REAL,"
    " PRIMARY KEY (route, client, user))",
    "CREATE TABLE connects (id_hash TEXT PRIMARY KEY, sealed BLOB NOT NULL, deadline REAL NOT NULL)",
    "CREATE TABLE clients (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL)",
    "CREATE TABLE leases (key TEXT PRIMARY KEY, holder TEXT NOT NULL, deadline REAL NOT NULL)",
)
CLIENT_SECRET = "cs_FAKEclientsecret0123456789abcdef"
REGISTRATION = f'{{"client_id": "broker-mcp", "client_secret": "{CLIENT_SECRET}"}}'


def write_v1_file(db_path: Path, *grants: Grant) -> None:
    """A file as the schema-1 broker left it: its tables, its key check, grants it sealed."""
    unlocked = crypto.unlock(KeyringStore(), None, str(db_path))  # creates the keyring's master key
    assert unlocked.new_check is not None
    db_path.parent.mkdir(mode=0o700)
    db_path.touch(mode=0o600)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        assert conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in V1:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        conn.execute("INSERT INTO meta (name, value) VALUES ('key_check', ?)", (unlocked.new_check,))
        for g in grants:
            sealed = unlocked.sealer.seal(g.tokens.encode(), crypto.grant_place(g.route, g.client, g.user))
            conn.execute(  # schema 1's own put_grant
                "INSERT OR REPLACE INTO grants (route, client, user, sealed, state, expires_at, last_used)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (g.route, g.client, g.user, sealed, g.state, g.expires_at, g.last_used),
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def schema_of(db_path: Path) -> tuple[list[tuple[int]], list[str], list[str]]:
    with sqlite3.connect(db_path) as conn:
        version = conn.execute("SELECT version FROM schema_version").fetchall()
        columns = [row[1] for row in conn.execute("PRAGMA table_info(grants)")]
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return version, columns, sorted(tables)


# ---------------------------------------------------------------- the migration


def test_released_migrations_are_never_edited() -> None:
    assert MIGRATIONS[1] == V1
    assert sorted(MIGRATIONS) == [1, 2]


async def test_a_v1_file_migrates_and_its_grants_open_at_version_0(db_path: Path) -> None:
    write_v1_file(db_path, grant("alice", last_used=1_000_050.0), grant("bob", state="dead"))
    assert schema_of(db_path)[:2] == (
        [(1,)],
        ["route", "client", "user", "sealed", "state", "expires_at", "last_used"],
    )
    store = await open_store(db_path)
    try:
        version, columns, tables = schema_of(db_path)
        assert version == [(2,)] and columns[-1] == "version" and "docs" in tables
        assert await store.get_grant("mcp", "librechat", "alice") == grant("alice", last_used=1_000_050.0)
        assert await store.get_grant("mcp", "librechat", "bob") == grant("bob", state="dead", version=0)
        assert await store.count_grants("mcp") == {"active": 1, "dead": 1}
        # a refresh that read the schema-1 grant (version 0) stores its rotated pair
        rotated = grant("alice", tokens='{"access_token": "at_FAKErotated"}')
        assert await store.replace_grant(rotated, 1) is False
        assert await store.replace_grant(rotated, 0) is True
        assert await store.put_doc("oauth-client:mcp", REGISTRATION) is True
    finally:
        await store.close()
    again = await open_store(db_path)  # migrated once: a second open finds schema 2 and keeps all
    try:
        assert schema_of(db_path)[0] == [(2,)]
        assert await again.get_grant("mcp", "librechat", "alice") == replace(rotated, version=1)
        assert await again.get_doc("oauth-client:mcp") == REGISTRATION
    finally:
        await again.close()


async def test_a_failed_migration_leaves_the_v1_file_as_it_was(db_path: Path) -> None:
    write_v1_file(db_path, grant())
    with sqlite3.connect(db_path) as conn:  # something in the way of schema 2's second statement
        conn.execute("CREATE TABLE docs (other TEXT)")
    before = schema_of(db_path)
    with pytest.raises(StoreError) as err:
        await open_store(db_path)
    assert str(db_path) in str(err.value) and "docs already exists" in str(err.value)
    assert schema_of(db_path) == before  # the ALTER TABLE went back with the rest
    assert before[0] == [(1,)] and "version" not in before[1]


# ---------------------------------------------------------------- versions


async def test_every_write_bumps_the_version_and_a_touch_does_not(store: SqliteStore) -> None:
    await store.put_grant(grant(version=99))  # the version given is not the one stored
    assert (await store.get_grant("mcp", "librechat", "alice")) == grant(version=1)
    await store.put_grant(grant(state="dead"))
    await store.put_grant(grant("bob"))  # another user's grant counts apart
    got = await store.get_grant("mcp", "librechat", "alice")
    assert got is not None and got.version == 2 and got.state == "dead"
    await store.touch_grant("mcp", "librechat", "alice", 1_000_100.0)
    got = await store.get_grant("mcp", "librechat", "alice")
    assert got is not None and got.version == 2 and got.last_used == 1_000_100.0
    assert await store.replace_grant(replace(got, state="active", tokens="t_FAKE3"), got.version) is True
    assert await store.get_grant("mcp", "librechat", "alice") == replace(
        got, state="active", tokens="t_FAKE3", version=3
    )
    bob = await store.get_grant("mcp", "librechat", "bob")
    assert bob is not None and bob.version == 1


async def test_replace_refuses_a_stale_version_and_a_missing_grant(store: SqliteStore) -> None:
    assert await store.replace_grant(grant(), 0) is False  # nothing to replace: nothing created
    assert await store.get_grant("mcp", "librechat", "alice") is None
    assert await store.list_grants() == []
    await store.put_grant(grant())
    await store.put_grant(grant(tokens="t_FAKEreconnected"))  # a reconnect meanwhile: version 2
    for stale in (0, 1, 3, -1):
        assert await store.replace_grant(grant(tokens="t_FAKEstale", state="dead"), stale) is False
    kept = await store.get_grant("mcp", "librechat", "alice")
    assert kept == grant(tokens="t_FAKEreconnected", version=2)
    assert await store.replace_grant(grant(user="bob"), 2) is False  # the version is per grant
    assert await store.get_grant("mcp", "librechat", "bob") is None
    await store.delete_grant("mcp", "librechat", "alice")
    assert await store.replace_grant(grant(), 2) is False


async def test_concurrent_replaces_of_one_version_have_one_winner(store: SqliteStore, db_path: Path) -> None:
    await store.put_grant(grant())
    tries = [store.replace_grant(grant(tokens=f"t_FAKE{i}"), 1) for i in range(10)]
    won = await asyncio.gather(*tries)
    assert sum(won) == 1
    got = await store.get_grant("mcp", "librechat", "alice")
    assert got == grant(tokens=f"t_FAKE{won.index(True)}", version=2)
    other = await open_store(db_path)  # a second connection and thread on the same file
    try:
        for expected in range(2, 7):
            stores = (store, other) * 5
            tries = [s.replace_grant(grant(tokens=f"t_FAKE{i}"), expected) for i, s in enumerate(stores)]
            won = await asyncio.gather(*tries)
            assert sum(won) == 1, expected
            seen = await other.get_grant("mcp", "librechat", "alice")
            assert seen == grant(tokens=f"t_FAKE{won.index(True)}", version=expected + 1)
    finally:
        await other.close()


# ---------------------------------------------------------------- counts


async def test_count_grants_by_state_for_one_route(store: SqliteStore) -> None:
    assert await store.count_grants("mcp") == {}
    for user, state in [("a", "active"), ("b", "active"), ("c", "dead"), ("d", "needs_login")]:
        await store.put_grant(grant(user, state=state))
    await store.put_grant(grant("e", route="other", state="dead"))
    await store.put_grant(grant("f", route="MCP"))  # matched exactly
    await store.put_grant(grant("a", client="openwebui"))  # another client's user of the same name
    assert await store.count_grants("mcp") == {"active": 3, "dead": 1, "needs_login": 1}
    assert await store.count_grants("other") == {"dead": 1}
    assert await store.count_grants("%") == {}


# ---------------------------------------------------------------- sealed documents


async def test_documents_are_sealed_at_rest(store: SqliteStore, db_path: Path) -> None:
    assert await store.get_doc("oauth-client:mcp") is None
    assert await store.put_doc("oauth-client:mcp", REGISTRATION) is True
    assert await store.get_doc("oauth-client:mcp") == REGISTRATION
    assert Path(str(db_path) + "-wal").stat().st_size > 0  # the row is in the WAL right now
    key = keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT)
    assert key is not None
    raw = raw_bytes(db_path)
    assert b"oauth-client:mcp" in raw  # the name is plain, the value is not
    for secret in (CLIENT_SECRET, "broker-mcp", key):
        assert secret.encode() not in raw
    assert base64.b64decode(key) not in raw
    await store.close()
    raw = raw_bytes(db_path)  # checkpointed into the main file on close
    assert b"oauth-client:mcp" in raw and CLIENT_SECRET.encode() not in raw


async def test_only_new_keeps_the_first_document_and_delete_is_once(store: SqliteStore) -> None:
    assert await store.put_doc("reg", "first", only_new=True) is True
    assert await store.put_doc("reg", "second", only_new=True) is False  # a racing registration lost
    assert await store.get_doc("reg") == "first"
    assert await store.put_doc("reg", "third") is True  # without only_new: replaced
    assert await store.get_doc("reg") == "third"
    assert await store.put_doc("Reg", "other", only_new=True) is True  # names match exactly
    assert await store.delete_doc("reg") is True
    assert await store.delete_doc("reg") is False
    assert await store.get_doc("reg") is None
    assert await store.get_doc("Reg") == "other"
    assert await store.put_doc("reg", "", only_new=True) is True  # an empty document is a document
    assert await store.get_doc("reg") == ""


async def test_concurrent_only_new_puts_have_one_winner(store: SqliteStore, db_path: Path) -> None:
    other = await open_store(db_path)
    try:
        stores = (store, other) * 5
        won = await asyncio.gather(*(s.put_doc("reg", f"v{i}", only_new=True) for i, s in enumerate(stores)))
        assert sum(won) == 1
        assert await other.get_doc("reg") == f"v{won.index(True)}"
    finally:
        await other.close()


async def test_a_document_moved_to_another_name_does_not_open(store: SqliteStore, db_path: Path) -> None:
    await store.put_doc("oauth-client:mcp", REGISTRATION)
    await store.put_doc("oauth-client:other", '{"client_id": "x_FAKEother"}')
    with sqlite3.connect(db_path) as conn:  # what someone with the file could do
        conn.execute(
            "UPDATE docs SET sealed = (SELECT sealed FROM docs WHERE name = 'oauth-client:mcp')"
            " WHERE name = 'oauth-client:other'"
        )
    with pytest.raises(crypto.SealBroken) as err:
        await store.get_doc("oauth-client:other")
    text = str(err.value)
    assert "'oauth-client:other'" in text and str(db_path) in text and "does not open" in text
    assert CLIENT_SECRET not in text and "x_FAKEother" not in text
    assert await store.get_doc("oauth-client:mcp") == REGISTRATION


async def test_a_grant_sealed_under_a_doc_name_does_not_open_as_a_doc(
    store: SqliteStore, db_path: Path
) -> None:
    await store.put_grant(grant())
    await store.put_doc("x", "placeholder")
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE docs SET sealed = (SELECT sealed FROM grants) WHERE name = 'x'")
    with pytest.raises(crypto.SealBroken) as err:
        await store.get_doc("x")
    assert AT not in str(err.value) and RT not in str(err.value) and TOKENS not in str(err.value)


async def test_odd_document_names_are_kept_and_matched_exactly(store: SqliteStore) -> None:
    for i, name in enumerate(ODD):
        assert await store.put_doc(name, f"value {i}", only_new=True) is True
    for i, name in enumerate(ODD):
        assert await store.get_doc(name) == f"value {i}", repr(name)
    assert await store.get_doc("al") is None
    with pytest.raises(StoreError, match="not valid text") as err:
        await store.put_doc("reg", "cs_FAKE\ud800")
    assert "cs_FAKE" not in str(err.value)


# ---------------------------------------------------------------- the store itself


async def test_ping_and_description(store: SqliteStore, db_path: Path) -> None:
    took = await store.ping()
    assert isinstance(took, float) and 0 < took < 5
    assert store.description == f"sqlite {db_path}"
    key = keyring.get_password(SERVICE, MASTER_KEY_ACCOUNT)
    assert key is not None and key not in store.description
    await store.close()
    with pytest.raises(StoreError, match="is closed") as err:
        await store.ping()
    assert str(db_path) in str(err.value)


async def test_ping_fails_when_the_store_is_unusable(db_path: Path) -> None:
    store = await open_store(db_path)
    try:
        await store.ping()
        with sqlite3.connect(db_path) as conn:  # another process drops the table under it
            conn.execute("DROP TABLE schema_version")
        with pytest.raises(StoreError) as err:
            await store.ping()
        assert str(db_path) in str(err.value)
    finally:
        await store.close()
