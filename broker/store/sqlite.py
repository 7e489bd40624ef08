"""The embedded state store: one SQLite file in the state dir (`store: sqlite`, the default).

Owns: the file (created 0600 in a 0700 directory, refused when others can read it), its schema
and migrations (`schema_version`), WAL mode, the one connection and the one worker thread every
SQLite call runs on, grant versions (compare and set in one statement), expiry of connect states
and leases by stored deadlines, and the key check that ties the file to the master key. Must
never: call SQLite on the event loop, build SQL from values (parameters only), or write a token,
a connect state or a document unsealed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from broker.auth.secret_store import SecretStore
from broker.store import crypto
from broker.store.base import ClientInfo, ConnectRecord, Grant, GrantInfo, StoreError

FILE_NAME = "state.sqlite3"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 5000  # another process (a CLI command beside the daemon) holding the write lock

# MIGRATIONS[n] takes the schema from n - 1 to n; each runs in the one open transaction. Never
# edit a released one: files out there were made by it
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL)",
        "CREATE TABLE grants (route TEXT NOT NULL, client TEXT NOT NULL, user TEXT NOT NULL,"
        " sealed BLOB NOT NULL, state TEXT NOT NULL, expires_at REAL, last_used REAL,"
        " PRIMARY KEY (route, client, user))",
        # keyed by a hash of the id: the file never holds a live connect URL
        "CREATE TABLE connects (id_hash TEXT PRIMARY KEY, sealed BLOB NOT NULL, deadline REAL NOT NULL)",
        "CREATE TABLE clients (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE,"
        " created_at REAL NOT NULL)",
        "CREATE TABLE leases (key TEXT PRIMARY KEY, holder TEXT NOT NULL, deadline REAL NOT NULL)",
    ),
    2: (
        # grants written by schema 1 are version 0: a refresh that read one can still replace it
        "ALTER TABLE grants ADD COLUMN version INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE docs (name TEXT PRIMARY KEY, sealed BLOB NOT NULL)",
    ),
}

_PUT_DOC = (
    "INSERT INTO docs (name, sealed) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed"
)
_PUT_NEW_DOC = "INSERT INTO docs (name, sealed) VALUES (?, ?) ON CONFLICT (name) DO NOTHING"

_T = TypeVar("_T")


def default_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def _connect_id_hash(connect_id: str) -> str:
    return hashlib.sha256(connect_id.encode("utf-8")).hexdigest()


def _prepare_file(path: Path) -> None:
    """Create the file 0600 (its directory 0700) before SQLite does, or check the one there.
    SQLite gives the -wal and -shm files the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"{path} is not a regular file") from None
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise StoreError(
                f"{path} must be owned by this user and mode 0600; run: chmod 600 {path}"
            ) from None
    else:
        os.close(fd)


class SqliteStore:
    """`StateStore` on one SQLite file. Open with `await SqliteStore.open(path, secrets)`."""

    def __init__(self, path: Path, worker: ThreadPoolExecutor, clock: Callable[[], float]) -> None:
        self.path = path
        self._worker = worker
        self._clock = clock
        self._conn: sqlite3.Connection | None = None  # made, used and closed on the worker thread only
        self._sealer: crypto.Sealer | None = None
        self._closed = False

    @classmethod
    async def open(
        cls, path: Path, secrets: SecretStore, clock: Callable[[], float] = time.time
    ) -> SqliteStore:
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-sqlite")
        store = cls(path, worker, clock)
        try:
            await store._run(store._open, secrets)
        except BaseException:
            await store.close()
            raise
        return store

    # ------------------------------------------------------------ the worker thread

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise StoreError(f"the state store {self.path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._worker, partial(self._guarded, fn, *args))

    def _guarded(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return fn(*args)
        except sqlite3.DatabaseError as exc:
            # SQLite's messages never quote bound values; they name what broke
            raise StoreError(f"{self.path} cannot be used as the state store: {exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {type(exc).__name__}: {exc}") from None
        except UnicodeEncodeError:
            raise StoreError("a name or a value is not valid text (lone surrogates)") from None

    @property
    def description(self) -> str:
        return f"sqlite {self.path}"

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the state store {self.path} is not open")
        return self._conn

    @property
    def _seal(self) -> crypto.Sealer:
        if self._sealer is None:
            raise StoreError(f"the state store {self.path} is not open")
        return self._sealer

    def _open(self, secrets: SecretStore) -> None:
        _prepare_file(self.path)
        # isolation_level None: no implicit transactions; the ones needed are written out
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        self._conn = conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path} cannot use WAL mode (got {mode!r})")
        # FULL: a rotated refresh token lost to a power cut would log that user out
        conn.execute("PRAGMA synchronous=FULL")
        with self._transaction():
            self._migrate()
            row = conn.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
            unlocked = crypto.unlock(secrets, row[0] if row else None, str(self.path))
            if unlocked.new_check is not None:
                conn.execute("INSERT INTO meta (name, value) VALUES ('key_check', ?)", (unlocked.new_check,))
        self._sealer = unlocked.sealer

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE takes the write lock up front: two processes opening one new file cannot
        both create a master key."""
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        conn = self._db
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        current = row[0] or 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer broker (schema {current}; this one knows up to "
                f"{SCHEMA_VERSION})"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ------------------------------------------------------------ grants

    def _get_grant(self, route: str, client: str, user: str) -> Grant | None:
        row = self._db.execute(
            "SELECT sealed, state, expires_at, last_used, version FROM grants"
            " WHERE route = ? AND client = ? AND user = ?",
            (route, client, user),
        ).fetchone()
        if row is None:
            return None
        try:
            tokens = self._seal.open(row[0], crypto.grant_place(route, client, user))
        except crypto.SealBroken as exc:
            raise crypto.SealBroken(
                f"the grant of user {user!r} of client {client!r} on route {route!r} in {self.path}: {exc}"
            ) from None
        return Grant(route, client, user, tokens.decode("utf-8"), row[1], row[2], row[3], row[4])

    def _sealed_tokens(self, g: Grant) -> bytes:
        return self._seal.seal(g.tokens.encode("utf-8"), crypto.grant_place(g.route, g.client, g.user))

    def _put_grant(self, g: Grant) -> None:
        # one statement: two writers (threads or processes) cannot both make the same next version
        self._db.execute(
            "INSERT INTO grants (route, client, user, sealed, state, expires_at, last_used, version)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (route, client, user) DO UPDATE"
            " SET sealed = excluded.sealed, state = excluded.state, expires_at = excluded.expires_at,"
            " last_used = excluded.last_used, version = grants.version + 1",
            (g.route, g.client, g.user, self._sealed_tokens(g), g.state, g.expires_at, g.last_used),
        )

    def _replace_grant(self, g: Grant, version: int) -> bool:
        cur = self._db.execute(
            "UPDATE grants SET sealed = ?, state = ?, expires_at = ?, last_used = ?, version = version + 1"
            " WHERE route = ? AND client = ? AND user = ? AND version = ?",
            (self._sealed_tokens(g), g.state, g.expires_at, g.last_used, g.route, g.client, g.user, version),
        )
        return cur.rowcount > 0

    def _touch_grant(self, route: str, client: str, user: str, when: float) -> bool:
        # not a write of the grant: the version stays, so requests never fail a refresh's replace
        cur = self._db.execute(
            "UPDATE grants SET last_used = ? WHERE route = ? AND client = ? AND user = ?",
            (when, route, client, user),
        )
        return cur.rowcount > 0

    def _delete_grant(self, route: str, client: str, user: str) -> bool:
        cur = self._db.execute(
            "DELETE FROM grants WHERE route = ? AND client = ? AND user = ?", (route, client, user)
        )
        return cur.rowcount > 0

    def _list_grants(self, route: str | None) -> list[GrantInfo]:
        columns = "SELECT route, client, user, state, expires_at, last_used FROM grants"
        order = " ORDER BY route, client, user"
        if route is None:
            rows = self._db.execute(columns + order).fetchall()
        else:
            rows = self._db.execute(columns + " WHERE route = ?" + order, (route,)).fetchall()
        return [GrantInfo(*row) for row in rows]

    def _count_grants(self, route: str) -> dict[str, int]:
        rows = self._db.execute(
            "SELECT state, count(*) FROM grants WHERE route = ? GROUP BY state ORDER BY state", (route,)
        ).fetchall()
        return {str(state): int(n) for state, n in rows}

    async def get_grant(self, route: str, client: str, user: str) -> Grant | None:
        return await self._run(self._get_grant, route, client, user)

    async def put_grant(self, grant: Grant) -> None:
        await self._run(self._put_grant, grant)

    async def replace_grant(self, grant: Grant, version: int) -> bool:
        return await self._run(self._replace_grant, grant, version)

    async def touch_grant(self, route: str, client: str, user: str, when: float) -> bool:
        return await self._run(self._touch_grant, route, client, user, when)

    async def delete_grant(self, route: str, client: str, user: str) -> bool:
        return await self._run(self._delete_grant, route, client, user)

    async def list_grants(self, route: str | None = None) -> list[GrantInfo]:
        return await self._run(self._list_grants, route)

    async def count_grants(self, route: str) -> dict[str, int]:
        return await self._run(self._count_grants, route)

    # ------------------------------------------------------------ connect states

    def _put_connect(self, connect_id: str, record: ConnectRecord, ttl_s: float) -> None:
        now = self._clock()
        doc = {"route": record.route, "client": record.client, "user": record.user}
        doc |= {"label": record.label, "flow": record.flow}
        sealed = self._seal.seal(json.dumps(doc).encode("utf-8"), crypto.connect_place(connect_id))
        with self._transaction():
            self._db.execute("DELETE FROM connects WHERE deadline <= ?", (now,))
            self._db.execute(
                "INSERT OR REPLACE INTO connects (id_hash, sealed, deadline) VALUES (?, ?, ?)",
                (_connect_id_hash(connect_id), sealed, now + ttl_s),
            )

    def _take_connect(self, connect_id: str) -> ConnectRecord | None:
        # one statement: of two takers (threads or processes), only one gets the row back
        rows = self._db.execute(
            "DELETE FROM connects WHERE id_hash = ? RETURNING sealed, deadline",
            (_connect_id_hash(connect_id),),
        ).fetchall()
        if not rows or rows[0][1] <= self._clock():
            return None
        try:
            doc = json.loads(self._seal.open(rows[0][0], crypto.connect_place(connect_id)))
        except crypto.SealBroken as exc:
            raise crypto.SealBroken(f"a connect state in {self.path}: {exc}") from None
        return ConnectRecord(**doc)

    async def put_connect(self, connect_id: str, record: ConnectRecord, ttl_s: float) -> None:
        await self._run(self._put_connect, connect_id, record, ttl_s)

    async def take_connect(self, connect_id: str) -> ConnectRecord | None:
        return await self._run(self._take_connect, connect_id)

    # ------------------------------------------------------------ platform clients

    def _add_client(self, name: str, token_hash: str) -> bool:
        cur = self._db.execute(
            "INSERT INTO clients (name, token_hash, created_at) VALUES (?, ?, ?)"
            " ON CONFLICT (name) DO NOTHING",
            (name, token_hash, self._clock()),
        )
        return cur.rowcount > 0

    def _remove_client(self, name: str) -> bool:
        return self._db.execute("DELETE FROM clients WHERE name = ?", (name,)).rowcount > 0

    def _list_clients(self) -> list[ClientInfo]:
        rows = self._db.execute("SELECT name, created_at FROM clients ORDER BY name").fetchall()
        return [ClientInfo(*row) for row in rows]

    def _client_for_token_hash(self, token_hash: str) -> str | None:
        row = self._db.execute("SELECT name FROM clients WHERE token_hash = ?", (token_hash,)).fetchone()
        return None if row is None else str(row[0])

    async def add_client(self, name: str, token_hash: str) -> bool:
        return await self._run(self._add_client, name, token_hash)

    async def remove_client(self, name: str) -> bool:
        return await self._run(self._remove_client, name)

    async def list_clients(self) -> list[ClientInfo]:
        return await self._run(self._list_clients)

    async def client_for_token_hash(self, token_hash: str) -> str | None:
        return await self._run(self._client_for_token_hash, token_hash)

    # ------------------------------------------------------------ refresh leases

    def _acquire_lease(self, key: str, holder: str, ttl_s: float) -> bool:
        now = self._clock()
        cur = self._db.execute(
            "INSERT INTO leases (key, holder, deadline) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE"
            " SET holder = excluded.holder, deadline = excluded.deadline"
            " WHERE leases.deadline <= ? OR leases.holder = excluded.holder",
            (key, holder, now + ttl_s, now),
        )
        return cur.rowcount > 0

    def _release_lease(self, key: str, holder: str) -> None:
        self._db.execute("DELETE FROM leases WHERE key = ? AND holder = ?", (key, holder))

    async def acquire_lease(self, key: str, holder: str, ttl_s: float) -> bool:
        return await self._run(self._acquire_lease, key, holder, ttl_s)

    async def release_lease(self, key: str, holder: str) -> None:
        await self._run(self._release_lease, key, holder)

    # ------------------------------------------------------------ sealed documents

    def _get_doc(self, name: str) -> str | None:
        row = self._db.execute("SELECT sealed FROM docs WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        try:
            return self._seal.open(row[0], crypto.doc_place(name)).decode("utf-8")
        except crypto.SealBroken as exc:
            raise crypto.SealBroken(f"the document {name!r} in {self.path}: {exc}") from None

    def _put_doc(self, name: str, value: str, only_new: bool) -> bool:
        sealed = self._seal.seal(value.encode("utf-8"), crypto.doc_place(name))
        statement = _PUT_NEW_DOC if only_new else _PUT_DOC
        return self._db.execute(statement, (name, sealed)).rowcount > 0

    def _delete_doc(self, name: str) -> bool:
        return self._db.execute("DELETE FROM docs WHERE name = ?", (name,)).rowcount > 0

    async def get_doc(self, name: str) -> str | None:
        return await self._run(self._get_doc, name)

    async def put_doc(self, name: str, value: str, only_new: bool = False) -> bool:
        return await self._run(self._put_doc, name, value, only_new)

    async def delete_doc(self, name: str) -> bool:
        return await self._run(self._delete_doc, name)

    # ------------------------------------------------------------ the store itself

    def _ping(self) -> None:
        self._db.execute("SELECT max(version) FROM schema_version").fetchone()  # reads the file

    async def ping(self) -> float:
        start = time.perf_counter()
        await self._run(self._ping)
        return time.perf_counter() - start

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._worker, self._close)
        finally:
            self._worker.shutdown(wait=False)
