"""What the daemon holds while it runs, and the one reference a reload swaps.

Owns: `Snapshot` (one config and everything derived from it: route table, credentials by
route, policies, the hook registry, what forwarding needs) and `Runtime` (the snapshot in
force, the secret store, the upstream pool, metrics, the budget ledger, reload). A reload
builds a whole new snapshot and swaps it with one assignment; credentials and policy state
outlive snapshots while their part of the config is unchanged. Must never: log anyone out on
a reload, or let a half-built snapshot serve a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import structlog

from broker import config as config_mod
from broker import guard, heap, logs, proxy
from broker.admin.dashboard_auth import DashboardSessions
from broker.admin.recent import RecentRequests
from broker.auth import Credential, make_credential
from broker.auth.secret_store import SecretStore, open_store
from broker.config import Config, ConfigError, OAuthAuth, Route, file_stamp
from broker.errors import BrokerError
from broker.hooks import UserKey
from broker.http import client as upstream
from broker.http.server import Request
from broker.identity import PlatformClients, user_of
from broker.metrics import Metrics
from broker.pipeline import Hooks, register_hooks
from broker.policy import hold
from broker.policy.approvals import ApprovalBook
from broker.policy.budget import BudgetLedger
from broker.policy.notify import DesktopNotifier, Notifier
from broker.policy.route import RoutePolicy
from broker.routing import RouteTable
from broker.scrub import SecretSet
from broker.store import SharedCounters, StateStore, StoreError
from broker.store.opening import UnavailableStore, store_place
from broker.store.opening import open_store as open_state_store

if TYPE_CHECKING:
    from broker.admin.access import AdminKey
    from broker.auth.per_user import UserGrants

log = structlog.get_logger("broker")
STATUS_WAIT_S = 5.0  # status and metrics wait this long at most for start-up's credential read
STORE_CHECK_S = 1.0  # how often the state store's health is checked (a round trip) while it runs
STORE_FIRST_CHECK_S = 3.0  # start-up waits this long at most for the first check
STORE_CHECK_TIMEOUT_S = 2.5  # a check not answered in this time is a failed one
STORE_STALE_S = 3.5  # a good check vouches for the store this long (the next one is due in 1 s)


class ListenError(Exception):
    pass


def per_user_routes(config: Config) -> frozenset[str]:
    return frozenset(r.name for r in config.routes if isinstance(r.auth, OAuthAuth) and r.auth.per_user)


@dataclass
class StoreHealth:
    """The state store's health as the last check found it: read by every per-user request
    without a round trip, written once a second by `Runtime._watch_store`."""

    place: str
    ok: bool = True  # until a check says otherwise: the first check runs at start
    error: str | None = None
    latency_ms: float | None = None
    checked_at: float | None = None  # epoch seconds
    # monotonic: a good check counts this long; a check that never ends must not keep "ok"
    ok_until: float = field(default_factory=lambda: time.monotonic() + STORE_STALE_S)

    def refusal(self, route: str) -> BrokerError | None:
        if self.ok and time.monotonic() < self.ok_until:
            return None
        why = self.error or f"no answer to its health check for {STORE_STALE_S:.0f} s"
        return BrokerError("store_unavailable", f"the state store cannot be used: {why}", route)

    def document(self) -> dict[str, object]:
        return {
            "place": self.place,
            "ok": self.ok and time.monotonic() < self.ok_until,
            "error": self.error,
            "latency_ms": self.latency_ms,
            "checked_at": self.checked_at,
        }


@dataclass(frozen=True)
class Snapshot:
    """One config and what is derived from it, never changed once built."""

    config: Config
    connections: guard.Connections  # the daemon's one, across snapshots
    table: RouteTable
    credentials: Mapping[str, Credential]
    policies: Mapping[str, RoutePolicy]
    hooks: Hooks
    outbound: proxy.Outbound
    per_user: frozenset[str] = frozenset()  # the per-user routes' names
    user_grants: Mapping[str, UserGrants] = field(default_factory=dict)  # by per-user route
    platform: PlatformClients | None = None  # None: no per-user route, or the store did not open
    store_health: StoreHealth | None = None  # the runtime's one, across snapshots; None: no store
    _hosts: dict[int | None, frozenset[str]] = field(default_factory=dict, repr=False)  # a memo

    def guard(self, request: Request) -> BrokerError | None:
        cfg = self.config
        port, uid = self.connections.facts(request)
        hosts = self._hosts.get(port)
        if hosts is None:
            hosts = self._hosts[port] = guard.allowed_host_values(cfg, port)
        if self.per_user and guard.is_browser_page(request.raw_path):
            refusal = guard.check_page(request, cfg, hosts)
        else:
            refusal = guard.check(request, cfg, hosts)
        return refusal or guard.check_peer(uid, cfg)

    async def end_user(self, request: Request, route: Route) -> tuple[UserKey, Credential]:
        """On a per-user route: (platform client, user id) and that end user's credential."""
        grants = self.user_grants.get(route.name)
        if grants is None or self.platform is None:
            raise BrokerError(
                "store_unavailable", "the state store holding end users' grants is not open", route.name
            )
        health = self.store_health
        if health is not None:  # a cached token must not outlive a store gone
            refusal = health.refusal(route.name)
            if refusal is not None:
                raise refusal
        client = await self.platform.authenticate(request)
        assert isinstance(route.auth, OAuthAuth)
        user, label = user_of(request, route.auth, route.name)
        return (client, user), grants.credential(client, user, label)


class Runtime:
    """Everything the daemon holds. `snapshot` is the one reference a reload swaps."""

    def __init__(
        self,
        config: Config,
        secrets: SecretSet | None = None,
        store: SecretStore | None = None,
        gc_meter: heap.PauseMeter | None = None,
        log_setup: logs.LogSetup | None = None,
    ) -> None:
        self.log_setup = log_setup  # what a reload reconfigures; None: logging left as it is
        self.gc_meter = gc_meter  # the daemon's collector timings; None in tests and library use
        self.config_path = config.path
        # the version of the file in force or refused: as load() found it before reading it
        self.config_stamp = config.stamp if config.stamp is not None else file_stamp(config.path)
        self.config_error: str | None = None
        self.secrets = secrets if secrets is not None else SecretSet()
        self.metrics = Metrics()
        self.recent = RecentRequests()  # the dashboard's live list of requests (a done hook)
        self.dashboard = DashboardSessions()  # its one-time links and sessions, in memory
        self.store = store or open_store(config.secret_store, config.state_path())
        self.ledger = BudgetLedger(config.state_path() / "budgets.json")
        # opened by start() when a route is per-user, or always for `store: redis://` (budgets, rates)
        self.state_store: StateStore | None = None
        self.store_health: StoreHealth | None = None
        self.counters: SharedCounters | None = None  # the Redis store's budgets and rates
        self.admin_key: AdminKey | None = None  # written at start; None: endpoints that decide refuse
        self.approvals = ApprovalBook()  # held requests waiting for a person, across reloads
        self.notifier: Notifier = DesktopNotifier()  # "approve this?" on the desktop, where it can
        self._store_opened_for: tuple[object, ...] | None = None
        self._store_watch: asyncio.Task[None] | None = None
        self._store_watch_stopped = False
        self.connections = guard.Connections()
        self.snapshot = self._build(config, None)
        # No cap on upstream connections: each one serves an agent connection, so agents and the
        # fd limit (raised at start) bound them. A cap here would park long-lived MCP streams
        # behind each other and time out everything else to that upstream. No environment proxy
        # either: credentials go straight to the upstream.
        self.pool = upstream.Pool(keepalive=30.0)
        self._warmup: asyncio.Task[None] | None = None
        self.listen_addresses: list[str] = []
        self.in_flight = 0
        self._started = time.monotonic()
        self._reload_lock = asyncio.Lock()
        self.rebind: Callable[[Config], Awaitable[None]] | None = None  # set by Daemon

    @property
    def credentials(self) -> Mapping[str, Credential]:
        return self.snapshot.credentials

    def _build(self, config: Config, old: Snapshot | None) -> Snapshot:
        """A snapshot of `config`, keeping the credentials and policies of `old` whose part of
        the config is unchanged (a reload never logs out, and a rate window keeps counting)."""
        creds: dict[str, Credential] = {}
        policies: dict[str, RoutePolicy] = {}
        for r in config.routes:
            prev_route = old.config.route(r.name) if old is not None else None
            prev = old.credentials.get(r.name) if old is not None else None
            if prev is not None and prev_route is not None and prev_route.auth == r.auth:
                creds[r.name] = prev
            else:
                creds[r.name] = make_credential(r, self.store, self.secrets)
            if r.policy is not None:
                kept = old.policies.get(r.name) if old is not None else None
                shared = self.shared_counters(config)
                if kept is not None and kept.policy == r.policy and kept.shared is shared:
                    policies[r.name] = kept
                else:
                    policies[r.name] = RoutePolicy(r.name, r.policy, self.ledger, shared)
        per_user = per_user_routes(config)
        grants: dict[str, UserGrants] = {}
        if per_user and self.state_store is not None:
            from broker.auth.per_user import UserGrants

            for r in config.routes:
                if r.name not in per_user:
                    continue
                had = old.user_grants.get(r.name) if old is not None else None
                prev_route = old.config.route(r.name) if old is not None else None
                same = old is not None and prev_route == r and old.config.public_url == config.public_url
                if had is not None and same:
                    grants[r.name] = had
                else:
                    grants[r.name] = UserGrants(r, config, self.state_store, self.store, self.secrets)
        platform = PlatformClients(config, self.state_store) if per_user and self.state_store else None
        request_hooks = hold.after_policies(  # a route's approval hold runs after its policy
            {r.name: (policies[r.name],) if r.name in policies else () for r in config.routes}, config, self
        )
        audit = (logs.Audit(self.log_setup),) if config.log.audit else ()
        hooks = register_hooks(request_hooks, (self.metrics, self.recent, *audit))
        table = RouteTable(config.routes)
        return Snapshot(
            config=config,
            connections=self.connections,
            table=table,
            credentials=MappingProxyType(creds),
            policies=MappingProxyType(policies),
            hooks=hooks,
            outbound=proxy.Outbound(timeouts=config.timeouts, table=table, answer=self.secrets),
            per_user=per_user,
            user_grants=MappingProxyType(grants),
            platform=platform,
            store_health=self.store_health,
        )

    def uptime(self) -> float:
        return time.monotonic() - self._started

    def shared_counters(self, config: Config) -> SharedCounters | None:
        """With `store: redis://`, budgets and rates count in the store every replica shares.
        One that could not be opened refuses them (never a silent local count)."""
        return self.counters if config.store == "redis" else None

    async def open_state_store(self, config: Config) -> None:
        """Open the config's state store when it has a per-user route or names Redis (once: it
        outlives reloads; a changed `store:` takes effect at the next start)."""
        wanted = (config.store, config.redis, config.state_path())
        if self.state_store is not None:
            if wanted != self._store_opened_for:
                log.warning("store.changed", note="a changed `store:` takes effect when the daemon restarts")
            elif isinstance(self.state_store, UnavailableStore):
                self.state_store = None  # a reload after fixing its cause (a password) tries again
            if self.state_store is not None:
                return
        if not per_user_routes(config) and config.store != "redis":
            return
        self._store_opened_for = wanted
        place = store_place(config)
        try:
            self.state_store, self.counters = await open_state_store(config, self.store)
        except Exception as exc:  # noqa: BLE001 - the routes needing it answer store_unavailable
            reason = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
            log.error("store.unavailable", store=place, error=reason, note="routes that need it answer 503")
            self.state_store = self.counters = UnavailableStore(place, reason)
        if self.store_health is None:
            self.store_health = StoreHealth(place)
        if self._store_watch is None:
            # the first check before serving (bounded): status is true from the first request on
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.check_store(), STORE_FIRST_CHECK_S)
            self._store_watch = asyncio.get_running_loop().create_task(self._watch_store())

    async def check_store(self) -> None:
        """One health check of the state store (a round trip), recorded in `store_health`."""
        store, health = self.state_store, self.store_health
        if store is None or health is None or self._store_watch_stopped:
            return
        try:
            seconds = await asyncio.wait_for(store.ping(), STORE_CHECK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - whatever the failure, the store is not usable
            if self._store_watch_stopped:
                return  # the daemon closed the store under a check in flight
            why = str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}"
            if health.ok:
                log.error("store.down", store=health.place, error=why)
            health.ok, health.error, health.latency_ms = False, why, None
        else:
            if not health.ok:
                log.info("store.back", store=health.place)
            health.ok, health.error, health.latency_ms = True, None, round(seconds * 1000, 2)
            health.ok_until = time.monotonic() + STORE_STALE_S
        health.checked_at = time.time()

    async def _watch_store(self) -> None:
        while True:
            await asyncio.sleep(STORE_CHECK_S)
            await self.check_store()

    async def start(self) -> None:
        from broker.admin.access import AdminKey, write_new_key

        try:  # the key the owner's command line proves itself with (approvals, the dashboard)
            self.admin_key = AdminKey(
                await asyncio.to_thread(write_new_key, self.snapshot.config.state_path())
            )
        except OSError as exc:
            log.warning(
                "admin_key.unwritable", error=str(exc), note="approve/deny from the CLI will not work"
            )
        await self.open_state_store(self.snapshot.config)
        if self.state_store is not None:
            self.snapshot = self._build(self.snapshot.config, self.snapshot)
        if self.snapshot.config.secret_store == "file":
            log.warning(
                "secret_store.plaintext_file",
                store=self.store.description,
                note="secrets are kept in a 0600 file, not the OS keyring; anyone who can read "
                "your files can read them",
            )
        # Credentials are read in the background: a keyring (D-Bus, backend discovery) must not
        # delay readiness; a request that comes first reads its own route's credential.
        self._warmup = asyncio.get_running_loop().create_task(self._read_credentials())

    async def _read_credentials(self) -> None:
        for cred in list(self.credentials.values()):
            with contextlib.suppress(Exception):
                await cred.prepare()
        if self.gc_meter is not None and heap.settled() and self.in_flight == 0:
            # what reading them imported (keyring backends, D-Bus) lives as long as the process;
            # the collection walks only what came after start-up's freeze. (Done before READY,
            # READY's own freeze takes it.)
            heap.settle(self.gc_meter)

    async def credentials_read(self) -> None:
        """Wait (bounded) for start-up's credential read, so status never says "not read yet" to
        someone who asks a moment after start: a slow keyring still answers in STATUS_WAIT_S."""
        task = self._warmup
        if task is not None and not task.done():
            await asyncio.wait((task,), timeout=STATUS_WAIT_S)  # never cancels it, never raises its error

    async def reread_credentials(self) -> None:
        """Read every route's credential from the store again, now (bounded like start-up's
        read): after `set-key`, `login` or `logout` changed the store, so a `status` asked right
        after shows the new credential, not what was read before."""
        creds = list(self.credentials.values())
        for cred in creds:
            cred.invalidate()
        for grants in self.snapshot.user_grants.values():
            grants.invalidate()
        reads = [asyncio.ensure_future(cred.prepare()) for cred in creds]
        for task in reads:  # a failed read is the credential's own state to show, never an error here
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if reads:
            await asyncio.wait(reads, timeout=STATUS_WAIT_S)  # never cancels them

    async def close(self) -> None:
        if self._warmup is not None:
            self._warmup.cancel()
        self._store_watch_stopped = True  # a check finishing now must not report the closed store
        if self._store_watch is not None:
            self._store_watch.cancel()
        await self.dashboard.close()
        self.pool.close()
        self.connections.peers.close()
        for cred in self.credentials.values():
            await cred.close()
        for grants in self.snapshot.user_grants.values():
            await grants.close()
        if self.state_store is not None:
            await self.state_store.close()
        # the budget ledger's pending writes (refunds) reach the disk before the daemon exits
        failed = await asyncio.to_thread(self.ledger.close)
        if failed is not None:
            log.error("budget.save_failed", path=str(self.ledger.path), error=str(failed))

    async def reload(self, reason: str) -> None:
        """Re-read the config file and the secret store; a bad config keeps the old one."""
        async with self._reload_lock:
            self.config_stamp = file_stamp(self.config_path)
            try:
                new = await asyncio.to_thread(config_mod.load, Path(self.config_path))
            except ConfigError as exc:
                self.config_error = exc.render()
                log.error("config.rejected", reason=reason, errors=exc.lines(), kept="previous config")
                return
            old = self.snapshot
            if new.listen != old.config.listen and self.rebind is not None:
                try:
                    await self.rebind(new)
                except ListenError as exc:
                    self.config_error = f"{exc}; the previous config stays in force"
                    log.error("config.rejected", reason=reason, errors=[str(exc)], kept="previous config")
                    return
            self.config_error = None
            await self.open_state_store(new)
            fresh = self._build(new, old)
            for cred in fresh.credentials.values():
                cred.invalidate()  # kept ones re-read the store: the reload may follow a set-key
            self.snapshot = fresh  # the swap: requests that arrive from now on see the new config
            for name, cred in old.credentials.items():
                if fresh.credentials.get(name) is not cred:
                    await cred.close()
            for name, grants in old.user_grants.items():
                if fresh.user_grants.get(name) is not grants:
                    await grants.close()
            if self.log_setup is not None:
                self.log_setup.reconfigure(new.log.level, new.log.format)
            log.info("config.reloaded", reason=reason, routes=[r.name for r in new.routes])
