"""The shared state store: Redis (`store: redis://…` or `rediss://…`), for broker replicas that
serve one set of end users, budgets and rates.

Owns: the Redis client (2 s timeouts, no retried commands, a health check on idle connections,
TLS with certificate checks for rediss://), the key layout below, the Lua scripts that make each
compare-and-set, single take, lease and counter one atomic step on the server, the lazy unlock
(the key check is read, or created under a short lock, on first use: the broker starts while
Redis is down), and the fail-fast window after a failed connection. Must never: resend a write,
put a password, a token, a sealed value or a connect id into an exception or a log event, or
write a token, a connect state or a document unsealed.

Key layout, P being `prefix`; b64(x) is x's UTF-8 in URL-safe base64 without padding, so a `*`,
`?`, `[`, `:` or `.` in a name never reads as a pattern or a separator:

    P:meta:key_check        string  the master key check (`crypto.Sealer.key_check`)
    P:meta:key_check_lock   string  held, PX 10 s, by the one broker making the first key check
    P:grant:<b64 route>.<b64 client>.<b64 user>
                            hash    sealed (bound to route, client, user), state, expires_at,
                                    last_used ("" for none), version (+1 on every write)
    P:grants:<b64 route>    set     the route's grant ids (`<b64 route>.<b64 client>.<b64 user>`)
    P:grant_routes          set     b64 of every route with a grant
    P:connect:<sha256 hex of the id>  string  the sealed record, PX its time to live
    P:clients               hash    name -> JSON {"token_hash", "created_at"}
    P:client_tokens         hash    token hash -> name
    P:lease:<key>           string  the holder, PX the lease's time to live
    P:doc:<name>            string  the sealed document
    P:budget:<b64 account>  zset    "<entry id>|<cents>" scored by the server's TIME in ms, PX window
    P:budget_total:<b64 account>  string  the window's running total, PX window
    P:rate:<b64 key>        zset    "<random id>" scored by the server's TIME in ms, PX window
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

from broker.auth.secret_store import SecretStore, resolve
from broker.config import RedisSettings
from broker.store import crypto
from broker.store.base import ClientInfo, ConnectRecord, Grant, GrantInfo, Spend, StoreError
from broker.store.redis_scripts import SCRIPTS

PASSWORD_ACCOUNT = "store:redis_password"
TIMEOUT_S = 2.0  # connect and each reply: a blackholed Redis costs a request this long, once
FAIL_FAST_S = 1.0  # after a failed connection, calls fail at once for this long
HEALTH_CHECK_S = 30  # a connection idle this long is PINGed before a command goes on it
SCAN_BATCH = 1000  # grant ids per SSCAN step and per pipelined read
KEY_CHECK_LOCK_MS = 10_000

_T = TypeVar("_T")


def _b64(name: str) -> str:
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise StoreError("a route, client, user or key name is not valid text (lone surrogates)") from None
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(part: str) -> str:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode("utf-8")


def _number(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _float(raw: bytes | str | None) -> float | None:
    return float(raw) if raw else None


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def _cents(amount: float) -> float:
    """Whole cents as an int (3000, not 3000.0), as `BudgetLedger.cents` shows them."""
    return int(amount) if amount.is_integer() else amount


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _client(settings: RedisSettings, password: str | None) -> Redis:
    parts = urlsplit(settings.url)
    if parts.scheme not in ("redis", "rediss") or parts.password:
        raise StoreError("the Redis URL must be redis:// or rediss:// with no password in it")
    tls: dict[str, Any] = {}
    if parts.scheme == "rediss":
        tls = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        if settings.ca_file:
            tls["ssl_ca_certs"] = settings.ca_file
    try:
        return Redis.from_url(
            settings.url,
            password=password,
            username=settings.username,
            socket_connect_timeout=TIMEOUT_S,
            socket_timeout=TIMEOUT_S,
            # no retries: a write whose reply was lost may have happened; sending it again could
            # spend a budget twice or take a lease back from its new holder
            retry=Retry(NoBackoff(), 0),
            health_check_interval=HEALTH_CHECK_S,
            **tls,
        )
    except ValueError as exc:
        raise StoreError(f"the Redis URL {settings.where()} cannot be used: {exc}") from None


def _password(settings: RedisSettings, secrets: SecretStore) -> str | None:
    ref = settings.password
    if ref is None:
        return None
    found = resolve(ref, PASSWORD_ACCOUNT, secrets)
    if found.value is not None:
        return found.value
    if ref.kind == "keyring":
        fix = "run `agentcard-broker set-key store`"
    elif ref.kind == "env":
        fix = f"set the environment variable {ref.name} to it"
    else:
        fix = f"write it to {ref.name} (mode 0600)"
    raise StoreError(f"the password of the Redis store {settings.where()} is missing ({found.reason}): {fix}")


class RedisStore:
    """`StateStore` and `SharedCounters` on Redis. `await RedisStore.open(settings, secrets)`
    returns at once; the first call reaches Redis."""

    def __init__(
        self,
        settings: RedisSettings,
        secrets: SecretStore,
        client: Redis,
        password: str | None,
        clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._where = settings.where()
        self._secrets = secrets
        self._redis = client
        self._password = password
        self._clock = clock
        self._sealer: crypto.Sealer | None = None
        self._unlocking = asyncio.Lock()
        self._down_until = 0.0  # monotonic: until then calls fail without touching the network
        self._down_reason = ""
        self._closed = False
        self._p = settings.prefix
        self._client_keys = [f"{self._p}:clients", f"{self._p}:client_tokens"]
        self._scripts = {name: client.register_script(lua) for name, lua in SCRIPTS.items()}

    @classmethod
    async def open(
        cls, settings: RedisSettings, secrets: SecretStore, clock: Callable[[], float] = time.time
    ) -> RedisStore:
        password = await asyncio.to_thread(_password, settings, secrets)  # a keyring call blocks
        return cls(settings, secrets, _client(settings, password), password, clock)

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r}, prefix {self._p!r})"

    @property
    def description(self) -> str:
        return f"redis {self._where}"

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._redis.aclose()

    # ------------------------------------------------------------ calls, errors, unlock

    async def _call(self, work: Callable[[Redis], Awaitable[_T]]) -> _T:
        """One step on Redis; every failure becomes a StoreError naming the store, not a value."""
        if self._closed:
            raise StoreError(f"the Redis store {self._where} is closed")
        wait = self._down_until - time.monotonic()
        if wait > 0:
            raise StoreError(f"{self._down_reason} (the next try in {wait:.1f} s)")
        try:
            return await work(self._redis)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError, EOFError) as exc:
            if isinstance(exc, redis_errors.AuthenticationError):
                reason = self._failure(exc, "refused the login (check its `password:` and `username:`)")
            else:
                reason = self._failure(exc, "cannot be reached")
            self._down_reason, self._down_until = reason, time.monotonic() + FAIL_FAST_S
            raise StoreError(reason) from None
        except redis_errors.RedisError as exc:
            raise StoreError(self._failure(exc, "refused a command")) from None
        except UnicodeEncodeError:
            raise StoreError("a lease key or name is not valid text (lone surrogates)") from None
        except Exception as exc:  # noqa: BLE001 - at the store's edge every failure is a StoreError
            reason = self._failure(exc, "failed")
            self._down_reason, self._down_until = reason, time.monotonic() + FAIL_FAST_S
            raise StoreError(reason) from None

    def _failure(self, exc: BaseException, what: str) -> str:
        text = str(exc) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "[REDACTED]")
        return f"the Redis store {self._where} {what}: {type(exc).__name__}: {text}"

    async def _ready(self) -> crypto.Sealer:
        if self._sealer is None:
            async with self._unlocking:
                if self._sealer is None:
                    self._sealer = await self._unlock()
        return self._sealer

    async def _unlock(self) -> crypto.Sealer:
        """The sealer for the key check in Redis; the first broker to find none makes it under a
        lock, so two brokers sharing one keyring never each create a key there."""
        check_key, lock_key = f"{self._p}:meta:key_check", f"{self._p}:meta:key_check_lock"
        give_up = time.monotonic() + 2 * KEY_CHECK_LOCK_MS / 1000
        while True:
            stored = await self._call(lambda r: r.get(check_key))
            if isinstance(stored, bytes):
                return (await self._unlock_with(stored)).sealer
            made = await self._make_check_if_first(check_key, lock_key)
            if made is not None:
                return made
            if time.monotonic() > give_up:
                raise StoreError(f"{lock_key} in {self._where} is held and no key check appears: delete it")
            await asyncio.sleep(0.05)

    async def _unlock_with(self, stored: bytes | None) -> crypto.Unlocked:
        return await asyncio.to_thread(
            crypto.unlock, self._secrets, stored, self._where, self._settings.master_key
        )

    async def _make_check_if_first(self, check_key: str, lock_key: str) -> crypto.Sealer | None:
        claim = os.urandom(16).hex()
        if not await self._call(lambda r: r.set(lock_key, claim, nx=True, px=KEY_CHECK_LOCK_MS)):
            return None
        try:
            return await self._make_check(check_key)
        finally:
            with contextlib.suppress(StoreError):  # it expires anyway; the first error is the one to show
                await self._call(lambda _: self._scripts["release_if_own"](keys=[lock_key], args=[claim]))

    async def _make_check(self, check_key: str) -> crypto.Sealer:
        unlocked = await self._unlock_with(None)
        if unlocked.new_check is None:
            return unlocked.sealer
        new_check = unlocked.new_check
        if await self._call(lambda r: r.set(check_key, new_check, nx=True)):
            return unlocked.sealer
        stored = await self._call(lambda r: r.get(check_key))
        if isinstance(stored, bytes) and unlocked.sealer.matches(stored):
            return unlocked.sealer
        raise crypto.MasterKeyError(
            f"the master key is not the one {self._where} was sealed with: another broker sealed it "
            "first with its own key; give every replica the same key (`master_key: file:…` or `env:…`)"
        )

    async def _run(self, work: Callable[[Redis], Awaitable[_T]]) -> _T:
        await self._ready()
        return await self._call(work)

    async def _eval(self, script: AsyncScript, keys: list[str], args: list[str | bytes | int]) -> Any:
        await self._ready()
        return await self._call(lambda _: script(keys=keys, args=args))

    async def ping(self) -> float:
        await self._ready()
        start = time.perf_counter()
        answered = await self._call(lambda r: r.ping())
        if answered is not True:  # not Redis: a socket connected to itself reads its own PING back
            reason = f"the Redis store {self._where} answered PING with something else than PONG"
            self._down_reason, self._down_until = reason, time.monotonic() + FAIL_FAST_S
            raise StoreError(reason)
        return time.perf_counter() - start

    # ------------------------------------------------------------ grants

    def _grant_keys(self, route: str, client: str, user: str) -> tuple[list[str], str]:
        """The keys a grant script touches (the grant, its route's index, the routes) and its id."""
        grant_id = f"{_b64(route)}.{_b64(client)}.{_b64(user)}"
        keys = [f"{self._p}:grant:{grant_id}", f"{self._p}:grants:{_b64(route)}", f"{self._p}:grant_routes"]
        return keys, grant_id

    async def get_grant(self, route: str, client: str, user: str) -> Grant | None:
        sealer = await self._ready()
        key = self._grant_keys(route, client, user)[0][0]
        fields = ("sealed", "state", "expires_at", "last_used", "version")
        sealed, state, expires_at, last_used, version = await self._call(lambda r: r.hmget(key, fields))
        if not isinstance(sealed, bytes) or state is None:
            return None
        try:
            tokens = sealer.open(sealed, crypto.grant_place(route, client, user)).decode("utf-8")
        except crypto.SealBroken as exc:
            raise crypto.SealBroken(
                f"the grant of user {user!r} of client {client!r} on route {route!r} in {self._where}: {exc}"
            ) from None
        at, used = _float(expires_at), _float(last_used)
        return Grant(route, client, user, tokens, _text(state), at, used, int(version or 0))

    async def _write_grant(self, g: Grant, expected: str) -> bool:
        sealer = await self._ready()
        keys, grant_id = self._grant_keys(g.route, g.client, g.user)
        sealed = sealer.seal(g.tokens.encode("utf-8"), crypto.grant_place(g.route, g.client, g.user))
        at, used = _number(g.expires_at), _number(g.last_used)
        args: list[str | bytes | int] = [grant_id, _b64(g.route), sealed, g.state, at, used, expected]
        return int(await self._eval(self._scripts["write_grant"], keys, args)) > 0

    async def put_grant(self, grant: Grant) -> None:
        await self._write_grant(grant, "")

    async def replace_grant(self, grant: Grant, version: int) -> bool:
        return await self._write_grant(grant, str(version))

    async def touch_grant(self, route: str, client: str, user: str, when: float) -> bool:
        keys = self._grant_keys(route, client, user)[0][:1]
        return int(await self._eval(self._scripts["touch_grant"], keys, [_number(when)])) == 1

    async def delete_grant(self, route: str, client: str, user: str) -> bool:
        keys, grant_id = self._grant_keys(route, client, user)
        return int(await self._eval(self._scripts["delete_grant"], keys, [grant_id, _b64(route)])) > 0

    async def _grant_rows(self, route_b64: str, fields: tuple[str, ...]) -> list[tuple[str, list[Any]]]:
        """(grant id, fields) of every grant of one route, read in batches: SSCAN never blocks the
        server the way SMEMBERS of 100 000 ids would, and one pipelined read serves each batch."""
        index = f"{self._p}:grants:{route_b64}"
        rows: list[tuple[str, list[Any]]] = []
        seen: set[str] = set()
        cursor = 0
        while True:
            cursor, batch = await self._sscan(index, cursor)
            fresh = [i for i in dict.fromkeys(map(_text, batch)) if i not in seen]  # SSCAN may repeat one
            seen.update(fresh)
            values = await self._hmget_each([f"{self._p}:grant:{i}" for i in fresh], fields)
            rows += [(i, v) for i, v in zip(fresh, values, strict=True) if v[0] is not None]
            if cursor == 0:
                return rows

    async def _sscan(self, key: str, cursor: int) -> tuple[int, list[bytes | str]]:
        return await self._call(lambda r: r.sscan(key, cursor, count=SCAN_BATCH))

    async def _hmget_each(self, keys: list[str], fields: tuple[str, ...]) -> list[list[Any]]:
        async def work(r: Redis) -> list[list[Any]]:
            pipe = r.pipeline(transaction=False)
            for key in keys:
                pipe.hmget(key, fields)
            return await pipe.execute()

        return await self._call(work) if keys else []

    async def list_grants(self, route: str | None = None) -> list[GrantInfo]:
        if route is None:
            routes = sorted(map(_text, await self._run(lambda r: r.smembers(f"{self._p}:grant_routes"))))
        else:
            routes = [_b64(route)]
            await self._ready()
        found = []
        for route_b64 in routes:
            for grant_id, (state, at, used) in await self._grant_rows(
                route_b64, ("state", "expires_at", "last_used")
            ):
                found.append(GrantInfo(*self._names(grant_id), _text(state), _float(at), _float(used)))
        return sorted(found, key=lambda i: (i.route, i.client, i.user))

    def _names(self, grant_id: str) -> tuple[str, str, str]:
        try:
            route, client, user = (_unb64(part) for part in grant_id.split("."))
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors too
            raise StoreError(
                f"{self._where} holds a grant id this broker did not write: {grant_id!r}"
            ) from None
        return route, client, user

    async def count_grants(self, route: str) -> dict[str, int]:
        await self._ready()
        rows = await self._grant_rows(_b64(route), ("state",))
        return dict(Counter(_text(state) for _, (state,) in rows))

    # ------------------------------------------------------------ connect states

    def _connect_key(self, connect_id: str) -> str:
        return f"{self._p}:connect:{hashlib.sha256(connect_id.encode('utf-8')).hexdigest()}"

    async def put_connect(self, connect_id: str, record: ConnectRecord, ttl_s: float) -> None:
        sealer = await self._ready()
        doc = {"route": record.route, "client": record.client, "user": record.user}
        doc |= {"label": record.label, "flow": record.flow}
        sealed = sealer.seal(json.dumps(doc).encode("utf-8"), crypto.connect_place(connect_id))
        key = self._connect_key(connect_id)
        await self._call(lambda r: r.set(key, sealed, px=_ms(ttl_s)))

    async def take_connect(self, connect_id: str) -> ConnectRecord | None:
        sealer = await self._ready()
        key = self._connect_key(connect_id)
        sealed = await self._call(lambda r: r.getdel(key))  # of two takers, one gets it
        if not isinstance(sealed, bytes):
            return None
        try:
            doc = json.loads(sealer.open(sealed, crypto.connect_place(connect_id)))
        except crypto.SealBroken as exc:
            raise crypto.SealBroken(f"a connect state in {self._where}: {exc}") from None
        return ConnectRecord(**doc)

    # ------------------------------------------------------------ platform clients

    async def add_client(self, name: str, token_hash: str) -> bool:
        record = json.dumps({"token_hash": token_hash, "created_at": self._clock()})
        added = int(
            await self._eval(self._scripts["add_client"], self._client_keys, [name, token_hash, record])
        )
        if added < 0:
            raise StoreError(f"another platform client in {self._where} has this client token")
        return added > 0

    async def remove_client(self, name: str) -> bool:
        return int(await self._eval(self._scripts["remove_client"], self._client_keys, [name])) > 0

    async def list_clients(self) -> list[ClientInfo]:
        records = await self._run(lambda r: r.hgetall(self._client_keys[0]))
        found = [ClientInfo(_text(n), float(json.loads(doc)["created_at"])) for n, doc in records.items()]
        return sorted(found, key=lambda c: c.name)

    async def client_for_token_hash(self, token_hash: str) -> str | None:
        name = await self._run(lambda r: r.hget(self._client_keys[1], token_hash))
        return None if name is None else _text(name)

    # ------------------------------------------------------------ refresh leases

    async def acquire_lease(self, key: str, holder: str, ttl_s: float) -> bool:
        keys = [f"{self._p}:lease:{key}"]
        return int(await self._eval(self._scripts["acquire_lease"], keys, [holder, _ms(ttl_s)])) > 0

    async def release_lease(self, key: str, holder: str) -> None:
        await self._eval(self._scripts["release_if_own"], [f"{self._p}:lease:{key}"], [holder])

    # ------------------------------------------------------------ sealed documents

    async def get_doc(self, name: str) -> str | None:
        sealer = await self._ready()
        sealed = await self._call(lambda r: r.get(f"{self._p}:doc:{name}"))
        if not isinstance(sealed, bytes):
            return None
        try:
            return sealer.open(sealed, crypto.doc_place(name)).decode("utf-8")
        except crypto.SealBroken as exc:
            raise crypto.SealBroken(f"the document {name!r} in {self._where}: {exc}") from None

    async def put_doc(self, name: str, value: str, only_new: bool = False) -> bool:
        sealer = await self._ready()
        sealed = sealer.seal(value.encode("utf-8"), crypto.doc_place(name))
        return bool(await self._call(lambda r: r.set(f"{self._p}:doc:{name}", sealed, nx=only_new)))

    async def delete_doc(self, name: str) -> bool:
        return int(await self._run(lambda r: r.delete(f"{self._p}:doc:{name}"))) > 0

    # ------------------------------------------------------------ shared budgets and rates

    async def reserve_budget(self, account: str, amount: float, limit: float, window_s: float) -> Spend:
        entry = f"{os.urandom(8).hex()}|{_cents(float(amount))!r}"
        args: list[str | bytes | int] = [repr(float(amount)), repr(float(limit)), _ms(window_s), entry]
        ok, used = await self._eval(self._scripts["reserve_budget"], self._budget_keys(account), args)
        return Spend(bool(ok), _cents(float(used)), entry if ok else "")

    async def refund_budget(self, account: str, entry: str) -> None:
        await self._eval(self._scripts["refund_budget"], self._budget_keys(account), [entry])

    async def budget_used(self, account: str, window_s: float) -> float:
        used = await self._eval(self._scripts["budget_used"], self._budget_keys(account), [_ms(window_s)])
        return _cents(float(used))

    def _budget_keys(self, account: str) -> list[str]:
        """The account's window (reservations) and its running total."""
        b64 = _b64(account)
        return [f"{self._p}:budget:{b64}", f"{self._p}:budget_total:{b64}"]

    async def hit_rate(self, key: str, limit: int, window_s: float) -> float:
        args: list[str | bytes | int] = [int(limit), _ms(window_s), os.urandom(8).hex()]
        wait_ms = await self._eval(self._scripts["hit_rate"], [f"{self._p}:rate:{_b64(key)}"], args)
        return int(wait_ms) / 1000
