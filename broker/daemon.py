"""The daemon: listeners, the request walk, lifecycle, and the one reference reload swaps.

Owns: `Runtime` (the current config snapshot, credentials by route, the upstream session,
metrics), the order of checks for every request (guard -> admin or route -> credential ->
forward -> audit), binding listeners, signals (TERM/INT drain, HUP reload), and watching the
config file. Must never: let a request pick its destination, or drop a login on reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from broker import config as config_mod
from broker import guard, heap, logs, proxy
from broker.admin import api as admin
from broker.auth import Credential, make_credential
from broker.auth.secret_store import SecretStore, open_store
from broker.config import Config, ConfigError, Listen, file_stamp
from broker.errors import BrokerError, error_response
from broker.http import client as upstream
from broker.http import server as agents
from broker.logs import safe_path
from broker.metrics import Metrics
from broker.policy import BudgetLedger, PolicySet
from broker.routing import RouteTable, normalize_path
from broker.scrub import SecretSet
from broker.service import peers
from broker.service.sdnotify import Notifier

log = structlog.get_logger("broker")
JSONRPC_PEEK_BYTES = 1024 * 1024
WATCH_AFTER_S = 1.0  # the config watcher starts this long after READY
WATCH_STEP_MS = 500  # the watcher thread's wake-up period: an edit applies within about a second
WATCH_FALLBACK_S = 5.0  # between stamp comparisons, for file systems without inotify
STATUS_WAIT_S = 5.0  # status and metrics wait this long at most for start-up's credential read
OAUTH_DISCOVERY = re.compile(
    r"/\.well-known/(oauth-protected-resource|oauth-authorization-server|openid-configuration)", re.IGNORECASE
)


class Snapshot:
    """One immutable config plus what is derived from it once (route table, Host allowlists)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.table = RouteTable(config.routes)
        self._hosts: dict[int | None, frozenset[str]] = {}

    def hosts_for(self, port: int | None) -> frozenset[str]:
        hosts = self._hosts.get(port)
        if hosts is None:
            hosts = self._hosts[port] = guard.allowed_host_values(self.config, port)
        return hosts


class Runtime:
    """Everything the daemon holds. `snapshot` is the one reference a reload swaps."""

    def __init__(
        self, config: Config, secrets: SecretSet | None = None, store: SecretStore | None = None
    ) -> None:
        self.config_path = config.path
        # the version of the file in force or refused: as load() found it before reading it
        self.config_stamp = config.stamp if config.stamp is not None else file_stamp(config.path)
        self.snapshot = Snapshot(config)
        self.config_error: str | None = None
        self.secrets = secrets if secrets is not None else SecretSet()
        self.metrics = Metrics()
        self.store = store or open_store(config.secret_store, config.state_path())
        self.credentials: dict[str, Credential] = {
            r.name: make_credential(r, self.store, self.secrets) for r in config.routes
        }
        self.policies = PolicySet(BudgetLedger(config.state_path() / "budgets.json"))
        self.policies.update(config.routes)
        self.pool: upstream.Pool | None = None
        self._warmup: asyncio.Task[None] | None = None
        self.listen_addresses: list[str] = []
        self.in_flight = 0
        self._started = time.monotonic()
        self._reload_lock = asyncio.Lock()
        # a random prefix per process and a counter: unique across restarts, and no getrandom
        # system call per request (it was 2.5% of the daemon's CPU at 200 requests/s)
        prefix = os.urandom(4).hex()
        self._request_ids = (f"{prefix}{n:08x}" for n in itertools.count(1))
        self.rebind: Callable[[Config], Awaitable[None]] | None = None  # set by Daemon

    def uptime(self) -> float:
        return time.monotonic() - self._started

    async def start(self) -> None:
        # No cap on upstream connections: each one serves an agent connection, so agents and the
        # fd limit (raised at start) bound them. A cap here would park long-lived MCP streams
        # behind each other and time out everything else to that upstream. No environment proxy
        # either: credentials go straight to the upstream.
        self.pool = upstream.Pool(keepalive=30.0)
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
        if heap.meter is not None and heap.settled and self.in_flight == 0:
            # what reading them imported (keyring backends, D-Bus) lives as long as the process;
            # the collection walks only what came after start-up's freeze. (Done before READY,
            # READY's own freeze takes it.)
            heap.settle()

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
        for cred in self.credentials.values():
            cred.invalidate()
        reads = [asyncio.ensure_future(cred.prepare()) for cred in self.credentials.values()]
        for task in reads:  # a failed read is the credential's own state to show, never an error here
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if reads:
            await asyncio.wait(reads, timeout=STATUS_WAIT_S)  # never cancels them

    async def close(self) -> None:
        if self._warmup is not None:
            self._warmup.cancel()
        if self.pool is not None:
            self.pool.close()
        for cred in self.credentials.values():
            await cred.close()
        # the budget ledger's pending writes (refunds) reach the disk before the daemon exits
        failed = await asyncio.to_thread(self.policies.ledger.close)
        if failed is not None:
            log.error("budget.save_failed", path=str(self.policies.ledger.path), error=str(failed))

    # ------------------------------------------------------------ reload

    async def reload(self, reason: str) -> None:
        """Re-read the config file and the secret store; a bad config keeps the old one."""
        async with self._reload_lock:
            path = Path(self.config_path)
            self.config_stamp = file_stamp(self.config_path)
            try:
                new = await asyncio.to_thread(config_mod.load, path)
            except ConfigError as exc:
                self.config_error = exc.render()
                log.error("config.rejected", reason=reason, errors=exc.lines(), kept="previous config")
                return
            old = self.snapshot.config
            if new.listen != old.listen and self.rebind is not None:
                try:
                    await self.rebind(new)
                except ListenError as exc:
                    self.config_error = f"{exc}; the previous config stays in force"
                    log.error("config.rejected", reason=reason, errors=[str(exc)], kept="previous config")
                    return
            self.config_error = None
            creds: dict[str, Credential] = {}
            for r in new.routes:
                prev_route = old.route(r.name)
                prev = self.credentials.get(r.name)
                if prev is not None and prev_route is not None and prev_route.auth == r.auth:
                    creds[r.name] = prev  # unchanged auth: keep it (a reload never logs out)
                else:
                    creds[r.name] = make_credential(r, self.store, self.secrets)
            for name, cred in self.credentials.items():
                if creds.get(name) is not cred:
                    await cred.close()
            for cred in creds.values():
                cred.invalidate()
            self.credentials = creds
            self.policies.update(new.routes)
            self.snapshot = Snapshot(new)
            logs.reconfigure(new.log.level, new.log.format)
            log.info("config.reloaded", reason=reason, routes=[r.name for r in new.routes])

    # ------------------------------------------------------------ the request walk

    async def handle(self, request: agents.Request) -> agents.StreamResponse:
        started = time.perf_counter()
        snap = self.snapshot
        cfg = snap.config
        rid = next(self._request_ids)
        ex = proxy.Exchange(request_id=rid)
        route_name: str | None = None
        status = 500
        guarded = False  # refused by the guard: answered without reading a byte of the body
        self.in_flight += 1
        try:
            try:
                err = guard.check(
                    request, cfg, snap.hosts_for(guard.listener_port(request))
                ) or guard.check_peer(request, cfg)
                if err is not None:
                    guarded = True
                    raise err
                header_bytes = sum(len(k) + len(v) + 4 for k, v in request.raw_headers)
                if header_bytes > cfg.limits.max_header_bytes:
                    raise BrokerError(
                        "request_too_large",
                        f"request headers are over limits.max_header_bytes ({cfg.limits.max_header_bytes})",
                        http_status=431,
                    )
                # checked on the normalized path: `%2Ewell-known`, `%5Fbroker` are the same paths
                path = normalize_path(request.raw_path.partition("?")[0])
                if OAUTH_DISCOVERY.search(path):
                    # the broker does OAuth for its agents; an agent that found metadata here
                    # would start its own login against AgentCard
                    raise BrokerError(
                        "not_found", "agents need no OAuth here: the broker holds the credential"
                    )
                if path == "/_broker" or path.startswith("/_broker/"):
                    route_name = "_broker"
                    resp = await admin.handle(request, self)
                else:
                    target = snap.table.target(request.raw_path)
                    route_name = target.route.name
                    credential = self.credentials[route_name]
                    rules = self.policies.by_route.get(route_name)
                    if rules is not None:
                        await credential.prepare()  # the rules may ask its mode (test or live)
                    gate = (
                        await rules.admit(
                            request,
                            target.url.raw_path,
                            credential.mode,
                            cfg.limits.max_body_bytes,
                            ex.hold,
                            has_mode=credential.has_mode,
                        )
                        if rules is not None
                        else None
                    )
                    try:
                        resp = await proxy.forward(
                            request,
                            target,
                            credential,
                            pool=self._pool(),
                            config=cfg,
                            table=snap.table,
                            secrets=self.secrets,
                            ex=ex,
                            body=gate.body if gate else None,
                            response_filter=gate.response_filter if gate else None,
                        )
                    finally:
                        if rules is not None and gate is not None:
                            rules.settle(gate, ex.upstream_status, ex.maybe_sent)
            except BrokerError as err:
                # a message can quote an upstream's words (a token endpoint's error): mask held secrets
                route = err.route or (route_name if route_name not in (None, "_broker") else None)
                err = BrokerError(
                    err.code, self.secrets.redact(err.message), route, err.retry_after, err.http_status
                )
                ex.error = ex.error or err.code
                if err.code in ("policy_denied", "rate_limited"):
                    ex.detail = err.message  # the audit line says which rule refused it
                resp = await self._error(request, err, ex, peek=not guarded)
            if not resp.prepared:
                resp.headers["X-Broker-Request-Id"] = rid
            status = resp.status
            return resp
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - started
            if route_name != "_broker":
                self.metrics.observe(route_name or "-", status, elapsed)
                if ex.error and ex.error.startswith(("upstream_", "stream_")):
                    self.metrics.upstream_error(route_name or "-", ex.error)
                if cfg.log.audit:
                    logs.audit(
                        request_id=rid,
                        route=route_name,
                        method=request.method,
                        path=safe_path(request.raw_path),
                        status=status,
                        upstream_status=ex.upstream_status,
                        error=ex.error,
                        detail=ex.detail,
                        bytes_in=ex.bytes_in,
                        bytes_out=ex.bytes_out,
                        duration_ms=round(elapsed * 1000, 2),
                    )

    def _pool(self) -> upstream.Pool:
        if self.pool is None:
            raise RuntimeError("Runtime.start() was not awaited")
        return self.pool

    async def _error(
        self, request: agents.Request, err: BrokerError, ex: proxy.Exchange, peek: bool = True
    ) -> agents.Response:
        """The error response; a JSON-RPC error object when the request was JSON-RPC. `peek`: the
        body may be read (bounded in size and by timeouts.idle) for the JSON-RPC id."""
        is_rpc, rpc_id = False, None
        if request.method == "POST" and request.content_type == "application/json":
            doc: Any = None
            length = request.content_length
            raw: bytes | None = ex.body  # held for a policy or a retry: already read
            small = length is None or length <= JSONRPC_PEEK_BYTES
            stalled = err.code in ("request_timeout", "bad_request", "request_too_large")
            if raw is None and peek and not stalled and ex.bytes_in == 0 and request.body_exists and small:
                raw = await _read_up_to(request, JSONRPC_PEEK_BYTES)
            if raw is not None:
                with contextlib.suppress(ValueError, RecursionError):
                    doc = json.loads(raw)
            if isinstance(doc, dict) and doc.get("jsonrpc") == "2.0":
                is_rpc, rpc_id = True, doc.get("id")
            elif isinstance(doc, list) and doc and all(isinstance(d, dict) and "jsonrpc" in d for d in doc):
                is_rpc = True
        return error_response(err, jsonrpc_id=rpc_id, jsonrpc=is_rpc)


async def _read_up_to(request: agents.Request, limit: int) -> bytes | None:
    """The whole body if it is at most `limit` bytes (it may arrive in many chunks), else None."""
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
    except (ConnectionError, BrokerError):  # gone, stalled past timeouts.idle, or malformed
        return None
    return b"".join(parts)


# ---------------------------------------------------------------- listeners and lifecycle


class ListenError(Exception):
    pass


def _prepare_unix_path(path: Path) -> None:
    """Refuse a path that is a symlink or not our stale socket; remove a stale socket."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ListenError(f"unix:{path} is a symlink; refusing to replace it")
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"unix:{path} exists and is not a socket; refusing to replace it")
    if st.st_uid != os.getuid():
        raise ListenError(f"unix:{path} belongs to another user")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody is listening
        return
    finally:
        probe.close()
    raise ListenError(f"unix:{path} is in use by a running process (another broker?)")


async def _bind(server: agents.AgentServer, listen: Listen, socket_mode: int) -> asyncio.Server:
    try:
        if listen.kind == "unix":
            path = Path(listen.path)
            _prepare_unix_path(path)
            listener = await server.listen_unix(str(path))
            os.chmod(path, socket_mode)  # umask 077 already made it 0600 at creation
            return listener
        return await server.listen_tcp(listen.host, listen.port)
    except OSError as exc:
        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None


def _bound_addresses(server: agents.AgentServer) -> list[str]:
    out = []
    for addr in server.addresses():
        if isinstance(addr, tuple):
            host, port = addr[0], addr[1]
            out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        else:
            out.append(f"unix:{addr}")
    return out


async def _watch_config(rt: Runtime, stop: asyncio.Event) -> None:
    """Reload when the config file changes (editors that save by rename included).

    File events do the work. A stamp comparison catches what events cannot: once as the watcher
    starts (an edit made since start-up), then every WATCH_FALLBACK_S (file systems without
    inotify). An idle broker wakes about twice a second for all this (watchfiles' default
    step of 50 ms and a 1 s fallback made it 22 context switches a second: laptops notice)."""
    # Importing watchfiles (and anyio) blocks the loop for ~0.1 s: not while the first agents
    # and health checks arrive. An edit made meanwhile is caught by the first stamp comparison.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), WATCH_AFTER_S)
    if stop.is_set():
        return
    import watchfiles

    path = await asyncio.to_thread(lambda: Path(rt.config_path).resolve())
    name = path.name
    beside = await asyncio.to_thread(_log_file_in, path.parent)
    if beside is not None:
        log.warning(
            "config.watch_busy_dir",
            log_file=beside,
            note="the broker's log is written into the directory watched for config changes, so "
            "every log line wakes the watcher (about 60 µs of CPU per request measured); write the "
            "log somewhere else",
        )

    def only_config(_change: watchfiles.Change, changed: str) -> bool:
        return Path(changed).name == name

    try:
        if file_stamp(rt.config_path) != rt.config_stamp:  # an edit made since start-up
            await rt.reload(reason="file_changed")
        async for changes in watchfiles.awatch(
            path.parent,
            watch_filter=only_config,
            stop_event=stop,
            debounce=200,
            step=WATCH_STEP_MS,  # how often its thread wakes (and how long changes must rest)
            recursive=False,
            rust_timeout=int(WATCH_FALLBACK_S * 1000),
            yield_on_timeout=True,
        ):
            if changes or file_stamp(rt.config_path) != rt.config_stamp:
                await rt.reload(reason="file_changed")
    except Exception as exc:  # noqa: BLE001 - a broken watcher must not stop serving
        log.warning("config.watch_failed", error=type(exc).__name__, note="SIGHUP still reloads")


def _log_file_in(directory: Path) -> str | None:
    """The name of the regular file standing for our stderr inside `directory`, if it is there."""
    try:
        st = os.fstat(2)
        if not stat.S_ISREG(st.st_mode):
            return None
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.inode() == st.st_ino and entry.stat(follow_symlinks=False).st_dev == st.st_dev:
                    return entry.name
    except OSError:
        return None
    return None


class Daemon:
    """A started broker: the runtime plus its bound listeners. `serve()` and tests use this."""

    def __init__(self, rt: Runtime, server: agents.AgentServer, sites: dict[Listen, asyncio.Server]) -> None:
        self.rt = rt
        self.server = server
        self.sites = sites
        rt.rebind = self.rebind

    @classmethod
    async def start(cls, config: Config, secrets: SecretSet | None = None) -> Daemon:
        rt = Runtime(config, secrets)
        await rt.start()
        server = agents.AgentServer(
            rt.handle,
            lambda: rt.snapshot.config.limits.max_header_bytes,
            on_connect=_warm_connection,
            body_idle=lambda: rt.snapshot.config.timeouts.idle,
        )
        sites: dict[Listen, asyncio.Server] = {}
        try:
            for listen in config.listen:
                sites[listen] = await _bind(server, listen, config.socket_mode)
        except ListenError:
            await server.shutdown(0)
            await rt.close()
            raise
        rt.listen_addresses = _bound_addresses(server)
        return cls(rt, server, sites)

    async def rebind(self, new: Config) -> None:
        """Listen on `new.listen`: bind what is new first, then close what is gone.

        Raises ListenError (having closed anything it opened) when a new address cannot be
        bound, so the caller can keep the previous config whole.
        """
        added: dict[Listen, asyncio.Server] = {}
        try:
            for listen in new.listen:
                if listen not in self.sites:
                    added[listen] = await _bind(self.server, listen, new.socket_mode)
        except ListenError:
            for listener in added.values():
                await self.server.stop_listening(listener)
            raise
        for listen in [x for x in self.sites if x not in new.listen]:
            # no new connections there; requests in flight on it finish on their connections
            await self.server.stop_listening(self.sites.pop(listen))
            _remove_socket(listen)
        self.sites.update(added)
        self.rt.listen_addresses = _bound_addresses(self.server)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to timeouts.drain), close."""
        await self.server.shutdown(self.rt.snapshot.config.timeouts.drain)
        await self.rt.close()
        for listen in self.sites:
            _remove_socket(listen)


def _warm_connection(transport: asyncio.Transport) -> None:
    """What the guard asks of every connection, asked as it opens (both are cached per connection)."""
    guard.transport_port(transport)
    peers.peer_uid(transport)


def _remove_socket(listen: Listen) -> None:
    if listen.kind == "unix":
        path = Path(listen.path)
        if path.is_socket():  # ours: _bind refused anything else
            path.unlink(missing_ok=True)


async def _watchdog(notifier: Notifier) -> None:
    """Ping systemd from the event loop itself: a wedged loop stops the pings and gets restarted."""
    assert notifier.watchdog_s is not None
    while True:
        notifier.send(WATCHDOG=1)
        await asyncio.sleep(notifier.watchdog_s / 2)


async def serve(config: Config, secrets: SecretSet, hardening: dict[str, bool] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the process exit code.

    `secrets` is the set the log redaction processor already holds: the same object, so every
    key the daemon loads is masked in its logs from the moment it is read.
    """
    notifier = Notifier()
    heap.install()
    try:
        daemon = await Daemon.start(config, secrets)
    except ListenError as exc:
        log.error("broker.listen_failed", error=str(exc))
        notifier.send(STATUS=f"cannot listen: {exc}")
        return 1
    rt = daemon.rt
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_term() -> None:
        if stop.is_set():
            log.warning("broker.exit_now", reason="second signal")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_term)
    background: set[asyncio.Task[Any]] = set()

    def on_hup() -> None:
        task = loop.create_task(rt.reload(reason="SIGHUP"))
        background.add(task)
        task.add_done_callback(background.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watcher = loop.create_task(_watch_config(rt, stop))
    pinger = loop.create_task(_watchdog(notifier)) if notifier.watchdog_s else None
    log.info(
        "broker.ready",
        listen=rt.listen_addresses,
        config=rt.config_path,
        routes=[r.name for r in config.routes],
        secret_store=rt.store.brief,
        pid=os.getpid(),
        hardening=hardening or {},
        systemd_notify=notifier.enabled,
    )
    heap.settle(collect=False)  # before READY, while no agent connection exists to freeze
    notifier.send(READY=1, STATUS=f"serving on {', '.join(rt.listen_addresses)}", MAINPID=os.getpid())
    await stop.wait()
    drain = rt.snapshot.config.timeouts.drain
    notifier.send(STOPPING=1, STATUS=f"draining {rt.in_flight} request(s), up to {drain:g}s")
    log.info("broker.stopping", in_flight=rt.in_flight, drain_s=drain)
    await daemon.stop()
    watcher.cancel()
    if pinger is not None:
        pinger.cancel()
    log.info("broker.stopped")
    return 0
