"""The daemon's lifecycle: listeners, signals, config watching, sd_notify, drain.

Owns: binding listeners (TCP and unix sockets, safely replacing a stale socket), rebinding on
reload, SIGTERM/SIGINT drain and SIGHUP reload, watching the config file, the systemd
watchdog. The request walk is `pipeline.py`; what the daemon holds is `runtime.py`. Must
never: serve on an address the config does not name, or exit without draining.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any

import structlog

from broker import heap
from broker.config import Config, Listen, file_stamp
from broker.http.listener import AgentServer
from broker.logs import LogSetup
from broker.pipeline import Pipeline
from broker.runtime import ListenError, Runtime
from broker.scrub import SecretSet
from broker.service.sdnotify import Notifier

__all__ = ["Daemon", "ListenError", "Runtime", "serve"]

log = structlog.get_logger("broker")
WATCH_AFTER_S = 1.0  # the config watcher starts this long after READY
WATCH_STEP_MS = 500  # the watcher thread's wake-up period: an edit applies within about a second
WATCH_FALLBACK_S = 5.0  # between stamp comparisons, for file systems without inotify


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


async def _bind(server: AgentServer, listen: Listen, socket_mode: int) -> asyncio.Server:
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


def _bound_addresses(server: AgentServer) -> list[str]:
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

    def __init__(self, rt: Runtime, server: AgentServer, sites: dict[Listen, asyncio.Server]) -> None:
        self.rt = rt
        self.server = server
        self.sites = sites
        rt.rebind = self.rebind

    @classmethod
    async def start(
        cls,
        config: Config,
        secrets: SecretSet | None = None,
        gc_meter: heap.PauseMeter | None = None,
        log_setup: LogSetup | None = None,
    ) -> Daemon:
        rt = Runtime(config, secrets, gc_meter=gc_meter, log_setup=log_setup)
        await rt.start()
        server = AgentServer(
            Pipeline(rt).handle,
            lambda: rt.snapshot.config.limits.max_header_bytes,
            on_connect=rt.connections.opened,
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
        self.rt.approvals.close()  # held requests are answered now, not sent: nobody can approve them
        await self.server.shutdown(self.rt.snapshot.config.timeouts.drain)
        await self.rt.close()
        for listen in self.sites:
            _remove_socket(listen)


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


async def serve(
    config: Config,
    secrets: SecretSet,
    hardening: dict[str, bool] | None = None,
    log_setup: LogSetup | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT. Returns the process exit code.

    `secrets` is the set the log redaction processor already holds: the same object, so every
    key the daemon loads is masked in its logs from the moment it is read.
    """
    notifier = Notifier()
    gc_meter = heap.install()
    try:
        daemon = await Daemon.start(config, secrets, gc_meter, log_setup)
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
    heap.settle(gc_meter, collect=False)  # before READY, while no agent connection exists to freeze
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
