"""Helpers shared by the benchmarks in bench/: each script puts bench/ on sys.path and imports from here.

Not a benchmark itself. What is here: ports, HTTP GETs and process plumbing on 127.0.0.1 (`BenchRun`
wraps a script's run: its temporary directory, signals, errors and the processes it started); the
nginx test bed of rest.py (a fast upstream, /big, /_bench/auth, a proxy that injects the key); the
broker in a temporary HOME with a fake key; /proc readings; percentiles; the target checks, tables
and the JSON file every script prints and writes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import inspect
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

FAKE_KEY = "sk_test_BENCHfake0000000000000000"
BENCH_PATH = "/api/v1/cards"
BIG_BYTES = 200 * 1024 * 1024
CHUNK = 1024 * 1024
HOST = "127.0.0.1"


# ---------------------------------------------------------------- ports and HTTP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def free_ports(*names: str) -> dict[str, int]:
    """A free port per name, all different."""
    ports = {name: free_port() for name in names}
    if len(set(ports.values())) != len(names):
        raise RuntimeError(f"port picking collided: {ports}")
    return ports


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout}s")


def get(
    port: int, path: str, timeout: float = 10.0, context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    """One GET on a new connection (HTTPS with `context`, no TLS session reused), closed afterwards."""
    conn = (
        http.client.HTTPConnection(HOST, port, timeout=timeout)
        if context is None
        else http.client.HTTPSConnection(HOST, port, timeout=timeout, context=context)
    )
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- /proc and files


def proc_status(pid: int, keys: Iterable[str] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """These fields of /proc/PID/status as numbers (KiB for the Vm* ones); by default VmRSS and VmHWM."""
    wanted = set(keys)
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in wanted:
            out[key] = int(rest.split()[0])
    return out


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    return proc_status(pid)


def proc_usage(pid: int) -> dict[str, Any]:
    """VmRSS, VmHWM (KiB), open fds and threads of a process, from /proc (empty off Linux)."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        out.update(proc_status(pid, ("VmRSS", "VmHWM", "Threads")))
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds a process has used so far, from /proc (None off Linux).

    Counted in clock ticks (10 ms): read it over thousands of requests, not a few."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def broker_code() -> str:
    """Which broker code this checkout runs: the commit, plus uncommitted changes under broker/
    (an editable install runs them); "unknown (no git)" outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = capture(["git", "rev-parse", "--short", "HEAD"], cwd=repo)
        dirty = capture(["git", "status", "--porcelain", "--", "broker"], cwd=repo)
    except OSError:
        return "unknown (no git)"
    if head.returncode or dirty.returncode:
        return "unknown (no git)"
    changed = dirty.stdout.splitlines()
    return head.stdout.strip() + (f" + {len(changed)} uncommitted file(s) under broker/" if changed else "")


def machine_cpu_ticks() -> list[int] | None:
    """The machine's CPU time by kind (the `cpu` line of /proc/stat: user nice system idle iowait
    irq softirq steal ...), None off Linux."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None


def steal_fraction(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of CPU time a hypervisor gave to others between two machine_cpu_ticks()."""
    if before is None or after is None or len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return round((after[7] - before[7]) / total, 4) if total > 0 else None


class _GetConnection(asyncio.Protocol):
    """One keep-alive connection of LeanClient: a GET at a time, its answer read by Content-Length."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            self._fail(ConnectionError("an answer without Content-Length"))
            return
        stop = head.find(b"\r\n", at + 2)
        try:
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
            status = int(head[9:12])
        except ValueError:
            self._fail(ConnectionError(f"an answer this client cannot read: {head[:40]!r}"))
            return
        if len(buf) < end + 4 + length:
            return
        del buf[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(ConnectionError("the connection closed"))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()


class LeanClient:
    """GET one path over keep-alive connections to one port, as little client work as can be.

    Why not aiohttp for measuring: its ~450 µs of CPU per request (on the 2-core bench VM, at
    a few hundred requests/s) made the client the busiest process of the latency bench, and its
    own stalls (start lag p99 4-7 ms) landed in every target's tail alike. This one (~240 µs,
    most of it asyncio's task and timer per request) writes a prepared request and reads the
    answer's head and Content-Length body, nothing else: an answer without Content-Length, or
    a 1xx, fails the request. A request finding no idle connection opens one (counted in
    `opened`).
    """

    def __init__(self, port: int, path: str = BENCH_PATH, timeout: float = 10.0) -> None:
        self.port = port
        self.timeout = timeout
        self.request = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
        self.idle: list[_GetConnection] = []
        self.opened = 0

    async def get(self) -> int:
        """One GET: the answer's status. ConnectionError or TimeoutError when it fails."""
        loop = asyncio.get_running_loop()
        conn = self.idle.pop() if self.idle else None
        if conn is None or conn.transport is None:
            _, conn = await loop.create_connection(_GetConnection, HOST, self.port)
            self.opened += 1
        waiter = conn.waiter = loop.create_future()
        assert conn.transport is not None
        conn.transport.write(self.request)
        try:
            async with asyncio.timeout(self.timeout):
                status = await waiter
        except BaseException:
            conn._fail(ConnectionError("the request was abandoned"))  # never reused: closed
            raise
        self.idle.append(conn)
        return status

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


@contextlib.contextmanager
def client_collector_paused() -> Iterator[None]:
    """The measuring client's own garbage collector off while it measures, so its pauses are not
    counted as the targets' latency.

    Why: a full collection walks every object the client holds (aiohttp, the schedule, the
    samples so far), and it comes more often the more it holds. In the latency bench these
    pauses were the client's start lag p99 of ~7 ms, and every request in flight during one, to
    any target, took it as latency. What start-up and warm-up built is frozen first; the
    measured run's garbage waits until the end (a few MB for 10 000 requests).
    """
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def tcp_table_size() -> int | None:
    """Entries in /proc/net/tcp and tcp6 (TIME_WAIT included): what a per-connection lookup there reads.

    The broker looks a loopback peer up there once per new agent connection (broker/service/peers.py), so
    its cost grows with this count. None off Linux.
    """
    try:
        return sum(len(Path(t).read_text().splitlines()) - 1 for t in ("/proc/net/tcp", "/proc/net/tcp6"))
    except OSError:
        return None


def tcp_table_read_ms(repeat: int = 5) -> float | None:
    """Median ms to read /proc/net/tcp once, here and now (the broker's loopback peer-uid check reads it)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        try:
            Path("/proc/net/tcp").read_bytes()
        except OSError:
            return None
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def tcp_table() -> dict[str, Any]:
    """{"entries": tcp_table_size(), "read_ms": tcp_table_read_ms()}."""
    return {"entries": tcp_table_size(), "read_ms": tcp_table_read_ms()}


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children started later inherit it). Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            print(f"note: could not raise RLIMIT_NOFILE to {target}: {exc}", file=sys.stderr)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---------------------------------------------------------------- processes, options and the run itself


def pdeathsig() -> None:  # runs in the child before exec: die with us even on SIGKILL of this script
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def capture(cmd: list[str], *, timeout: float | None = 60, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """subprocess.run, its output captured as text, the exit code left to the caller to look at."""
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, **kwargs)


def stop_process(proc: subprocess.Popen[bytes] | None, name: str, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"warning: {name} (pid {proc.pid}) ignored signal {sig}; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=5)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP become KeyboardInterrupt, so `finally` blocks stop what the bench started."""

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def restore_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def interrupted() -> int:
    print("interrupted", file=sys.stderr)
    return 130


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run(main), for a main that runs `async with BenchRun(...)`; a KeyboardInterrupt raised in
    the event loop itself (not in main, which BenchRun reports) ends it: "interrupted", 130."""
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        return interrupted()


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's option parser, described by the first paragraph of its docstring."""
    return argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])


def add_output_args(p: argparse.ArgumentParser, kept: str = "logs, configs") -> None:
    """--json PATH, and --keep the temporary directory (which holds `kept`)."""
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help=f"keep the temporary directory ({kept})")


class BenchRun:
    """One run of a bench script: `with BenchRun(...) as run:` (or `async with`) around its work.

    Entering turns SIGTERM/SIGHUP into KeyboardInterrupt and makes the temporary directory `run.tmp`
    (the broker logs to `run.broker_log` in it). Leaving reports what ended the block, if anything:
    KeyboardInterrupt as "interrupted" (`run.exit_code` 130), one of `errors` as "bench failed: ..."
    plus the last `log_lines` lines of the broker log when there is one (0: not) and whatever was
    registered with `on_failure` (`run.exit_code` 1); both are swallowed, other exceptions pass. Then
    it runs the cleanups, the last registered first (`stop_on_exit` processes, `callback`s; an async
    callback needs `async with`), restores the signal handlers and removes the directory, or with
    `keep` says where it is.
    """

    def __init__(
        self,
        prefix: str,
        keep: bool,
        *,
        errors: tuple[type[BaseException], ...] = (RuntimeError,),
        log_lines: int = 20,
    ) -> None:
        self.prefix, self.keep, self.errors, self.log_lines = prefix, keep, errors, log_lines
        self.exit_code = 0
        self._cleanups: list[Callable[[], Any]] = []
        self._failure_notes: list[Callable[[], None]] = []

    def __enter__(self) -> BenchRun:
        install_signal_handlers()
        self.tmp = Path(tempfile.mkdtemp(prefix=self.prefix))
        self.broker_log = self.tmp / "broker.log"
        return self

    async def __aenter__(self) -> BenchRun:
        return self.__enter__()

    def stop_on_exit(self, proc: subprocess.Popen[bytes], name: str) -> subprocess.Popen[bytes]:
        self._cleanups.append(lambda: stop_process(proc, name))
        return proc

    def callback(self, fn: Callable[[], Any]) -> None:
        self._cleanups.append(fn)

    def on_failure(self, fn: Callable[[], None]) -> None:
        self._failure_notes.append(fn)

    def _report(self, exc: BaseException | None) -> bool:
        if isinstance(exc, KeyboardInterrupt):
            self.exit_code = interrupted()
        elif isinstance(exc, self.errors):
            print(f"bench failed: {exc}", file=sys.stderr)
            if self.log_lines and self.broker_log.exists():
                print(f"broker log tail:\n{tail(self.broker_log, self.log_lines)}", file=sys.stderr)
            for note in self._failure_notes:
                note()
            self.exit_code = 1
        else:
            return False
        return True

    def _finish(self) -> None:
        restore_signal_handlers()
        if self.keep:
            print(f"kept {self.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __exit__(
        self, _type: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> bool:
        handled = self._report(exc)
        try:
            while self._cleanups:
                if inspect.isawaitable(self._cleanups.pop()()):
                    raise TypeError("an async cleanup needs `async with BenchRun(...)`")
        finally:
            self._finish()
        return handled

    async def __aexit__(
        self, _type: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> bool:
        handled = self._report(exc)
        try:
            while self._cleanups:
                if inspect.isawaitable(result := self._cleanups.pop()()):
                    await result
        finally:
            self._finish()
        return handled


# ---------------------------------------------------------------- nginx: rest.py's test bed


NGINX_FRAME = """\
{user}daemon off;
master_process on;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
{http}
    client_body_temp_path {tmp}/nginx-tmp/client_body;
    proxy_temp_path {tmp}/nginx-tmp/proxy;
    fastcgi_temp_path {tmp}/nginx-tmp/fastcgi;
    uwsgi_temp_path {tmp}/nginx-tmp/uwsgi;
    scgi_temp_path {tmp}/nginx-tmp/scgi;
    default_type application/json;
    keepalive_requests 10000000;
    keepalive_timeout 120s;

{servers}
}}
"""

# what an upstream server answers: `{"ok":true}`, and /_bench/auth 200 only with the expected Bearer header
UPSTREAM_LOCATIONS = f"""\
        location / {{
            return 200 '{{"ok":true}}';
        }}
        location = /_bench/auth {{
            if ($http_authorization = "Bearer {FAKE_KEY}") {{
                return 200 '{{"auth":"ok"}}';
            }}
            return 401 '{{"auth":"missing or wrong"}}';
        }}"""

REST_SERVERS = """\
    upstream fast {{
        server {host}:{direct};
        keepalive 64;
    }}

    # (a) the fast upstream
    server {{
        listen {host}:{direct};
{locations}
        location = /big {{
            types {{ }}
            default_type application/octet-stream;
            alias {tmp}/big.bin;
        }}
    }}

    # (b) nginx doing the broker's job: inject the header, keep upstream connections alive
    server {{
        listen {host}:{proxy};
        location / {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {key}";
        }}
    }}"""


def nginx_conf(tmp: Path, http: str, servers: str, workers: int = 1) -> str:
    """A whole nginx.conf for launch_nginx: pid, error log and temp paths in `tmp`, JSON by default, long
    keep-alive; `http` (directives) and `servers` (server and upstream blocks) go in its http block."""
    return NGINX_FRAME.format(user=nginx_user_line(), workers=workers, tmp=tmp, http=http, servers=servers)


def nginx_user_line() -> str:
    return "user root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 temp dir


def launch_nginx(tmp: Path, conf_text: str, ports: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """nginx with this nginx.conf text (prefix `tmp`, `daemon off;`), once it listens on every port."""
    (tmp / "nginx-tmp").mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(conf_text)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    errlog = tmp / "nginx-error.log"
    test = capture([nginx, "-t", "-q", "-p", f"{tmp}/", "-c", str(conf), "-e", str(errlog)], timeout=None)
    if test.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{test.stderr}")
    proc = subprocess.Popen(
        [nginx, "-p", f"{tmp}/", "-c", str(conf), "-e", str(errlog)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=pdeathsig,
    )
    try:
        for port in ports:
            wait_port(port, proc, "nginx")
    except RuntimeError as exc:
        stop_process(proc, "nginx")
        raise RuntimeError(f"{exc}\nnginx error log:\n{tail(errlog)}") from None
    return proc


def start_nginx(
    tmp: Path, direct: int, proxy: int, workers: int = 1, big_bytes: int = 0
) -> subprocess.Popen[bytes]:
    """rest.py's nginx: "direct" (the fast upstream, plus /big: tmp/big.bin, `big_bytes` of sparse zeros,
    no disk used, nginx sendfiles it; empty by default) and "nginx" (a proxy to it that injects the key)."""
    with (tmp / "big.bin").open("wb") as f:
        f.truncate(big_bytes)
    servers = REST_SERVERS.format(
        host=HOST, direct=direct, proxy=proxy, tmp=tmp, key=FAKE_KEY, locations=UPSTREAM_LOCATIONS
    )
    conf_text = nginx_conf(tmp, "    access_log off;\n    sendfile on;", servers, workers)
    return launch_nginx(tmp, conf_text, (direct, proxy))


def sanity(ports: dict[str, int]) -> None:
    """One GET through the broker and through the nginx proxy must answer 200, with the header added."""
    for name in ("broker", "nginx"):
        status, body = get(ports[name], BENCH_PATH)
        if status != 200:
            raise RuntimeError(f"sanity: GET {BENCH_PATH} via {name} answered {status}: {body[:200]!r}")
        status, body = get(ports[name], "/_bench/auth")
        if status != 200:
            raise RuntimeError(f"sanity: {name} did not inject the expected Authorization header ({status})")
    status, _ = get(ports["direct"], "/_bench/auth")
    if status != 401:
        raise RuntimeError(f"sanity: the upstream's auth check is broken (direct answered {status}, not 401)")


def stream_big(port: int, broker_pid: int) -> dict[str, Any]:
    """Download /big through the broker in 1 MiB reads, never holding the body; sample RSS meanwhile."""
    peak = {"rss_kib": 0}
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                peak["rss_kib"] = max(peak["rss_kib"], rss_kib(broker_pid)["VmRSS"])
            stop.wait(0.02)

    t = threading.Thread(target=sampler, daemon=True)
    t.start()
    started = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    got = 0
    try:
        conn.request("GET", "/big")
        resp = conn.getresponse()
        status, length = resp.status, resp.getheader("Content-Length")
        chunked = (resp.getheader("Transfer-Encoding") or "").lower() == "chunked"
        while True:
            chunk = resp.read(CHUNK)
            if not chunk:
                break
            got += len(chunk)
    finally:
        conn.close()
        elapsed = time.perf_counter() - started
        stop.set()
        t.join()
    if status != 200:
        raise RuntimeError(f"GET /big through the broker answered {status}")
    if got != BIG_BYTES:
        raise RuntimeError(f"GET /big through the broker gave {got} bytes, expected {BIG_BYTES}")
    return {
        "status": status,
        "bytes": got,
        "content_length": int(length) if length is not None else None,
        "chunked": chunked,
        "seconds": round(elapsed, 3),
        "mib_per_s": round(got / CHUNK / elapsed, 1),
        "peak_rss_during_kib": peak["rss_kib"],
    }


# ---------------------------------------------------------------- the broker


def broker_env(tmp: Path) -> dict[str, str]:
    home = tmp / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTCARD_")}
    env.update(
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_STATE_HOME=str(home / "state"),
        XDG_CONFIG_HOME=str(home / "config"),
        PYTHON_KEYRING_BACKEND="keyrings.alt.file.PlaintextKeyring",
    )
    for sub in ("", "data", "state", "config"):
        (home / sub).mkdir(mode=0o700, exist_ok=True)
    return env


def api_route(upstream: str, name: str = "api", prefix: str = "/") -> dict[str, Any]:
    """An api_key route whose key is in the keyring (store_key puts FAKE_KEY there)."""
    return {
        "name": name,
        "prefix": prefix,
        "upstream": upstream,
        "auth": {"type": "api_key", "key": "keyring"},
    }


def broker_config(tmp: Path, port: int, routes: list[dict[str, Any]], *, insecure: bool = True) -> Path:
    """tmp/config/broker.yaml: listen on HOST:port, these routes, keyring secrets, warning-level JSON
    log with the audit line off. `insecure` is allow_insecure_upstream.

    In a directory of its own, as installed (~/.config/agentcard-broker): the broker watches the
    config's directory, and the log file written beside it would wake the watcher on every line.
    """
    import yaml  # a dependency of the broker itself

    doc = {
        "listen": [f"{HOST}:{port}"],
        "allow_insecure_upstream": insecure,
        "secret_store": "keyring",
        "timeouts": {"connect": 10, "first_byte": 60, "idle": 300, "drain": 2},
        "log": {"level": "warning", "format": "json", "audit": False},
        "routes": routes,
    }
    (tmp / "config").mkdir(mode=0o700, exist_ok=True)
    path = tmp / "config" / "broker.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


def broker_cmd() -> str:
    exe = shutil.which("agentcard-broker")
    if exe is None:
        raise RuntimeError("the `agentcard-broker` command is not on PATH (pip install -e . in the repo)")
    return exe


def store_key(cfg: Path, env: dict[str, str], route: str = "api") -> None:
    done = capture(
        [broker_cmd(), "set-key", route, "--config", str(cfg), "--stdin"], input=FAKE_KEY + "\n", env=env
    )
    if done.returncode != 0:
        raise RuntimeError(f"set-key failed ({done.returncode}): {done.stdout}{done.stderr}")


def prepare_broker(
    tmp: Path, port: int, routes: list[dict[str, Any]], *, insecure: bool = True
) -> tuple[Path, dict[str, str]]:
    """broker_env, broker_config and FAKE_KEY stored for every api_key route: (config path, env)."""
    env = broker_env(tmp)
    cfg = broker_config(tmp, port, routes, insecure=insecure)
    for route in routes:
        if route["auth"]["type"] == "api_key":
            store_key(cfg, env, route["name"])
    return cfg, env


def spawn_broker(exe: str, cfg: Path, env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    """`exe run --config cfg`, its stdout and stderr to `log`; it dies with this script."""
    return subprocess.Popen(
        [exe, "run", "--config", str(cfg)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        preexec_fn=pdeathsig,
    )


def wait_health(
    port: int,
    exit_code: Callable[[], int | None],
    log: Path,
    *,
    started: float,
    poll_s: float = 0.1,
    get_timeout: float = 1.0,
    log_lines: int = 20,
) -> float:
    """Poll GET /_broker/health on a fresh connection every `poll_s` until it answers 200, for 30 s from
    `started` (a time.perf_counter()); returns the seconds since `started`. `exit_code` is the broker's
    (None while it runs): once it has exited, or at 30 s, RuntimeError with the log's tail."""
    deadline = started + 30
    while time.perf_counter() < deadline:
        with contextlib.suppress(OSError):
            status, _ = get(port, "/_broker/health", timeout=get_timeout)
            if status == 200:
                return time.perf_counter() - started
        code = exit_code()
        if code is not None:
            raise RuntimeError(f"broker exited with code {code}; its log:\n{tail(log, log_lines)}")
        time.sleep(poll_s)
    raise RuntimeError(f"broker did not answer /_broker/health within 30s; its log:\n{tail(log, log_lines)}")


def start_broker(cfg: Path, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    """The broker daemon, once /_broker/health answers 200 (stopped again when it does not)."""
    with log.open("wb") as err:
        proc = spawn_broker(broker_cmd(), cfg, env, err)
    try:
        wait_health(port, proc.poll, log, started=time.perf_counter())
    except RuntimeError:
        stop_process(proc, "broker")
        raise
    return proc


def broker_status(port: int) -> dict[str, Any]:
    """GET /_broker/status on a fresh connection, closed afterwards (it counts as one fd and task)."""
    status, body = get(port, "/_broker/status")
    if status != 200:
        raise RuntimeError(f"/_broker/status answered {status}: {body[:200]!r}")
    doc: dict[str, Any] = json.loads(body)
    return doc


GC_LINE = re.compile(r'agentcard_broker_gc_(collections_total|pause_seconds_max)\{generation="(\d)"\} (\S+)')


def gc_pauses(port: int) -> dict[str, dict[str, float]]:
    """The broker's garbage collections by generation from /_broker/metrics: count, longest pause ms."""
    status, body = get(port, "/_broker/metrics")
    if status != 200:
        raise RuntimeError(f"/_broker/metrics answered {status}")
    out: dict[str, dict[str, float]] = {}
    for line in body.decode().splitlines():
        m = GC_LINE.match(line)
        if m:
            key = "count" if m.group(1) == "collections_total" else "max_ms"
            value = float(m.group(3)) * (1000 if key == "max_ms" else 1)
            out.setdefault(m.group(2), {})[key] = round(value, 3)
    return out


def broker_log_problems(log: Path) -> list[dict[str, Any]]:
    """Broker log lines at warning level or above (or not JSON), parsed."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError
        except ValueError:
            doc = {"level": "unparsed", "event": line}
        if str(doc.get("level", "")).lower() not in ("debug", "info"):
            found.append(doc)
    return found


def print_log_problems(problems: list[dict[str, Any]], lines: Iterable[str] | None = None) -> None:
    """Their count, then `lines` (by default the first 10 problems, 300 characters each), indented."""
    print(f"broker log lines at warning or above: {len(problems)}")
    for line in [str(doc)[:300] for doc in problems[:10]] if lines is None else lines:
        print(f"  {line}")


# ---------------------------------------------------------------- statistics


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(samples_ms: list[float], *, interpolate: bool = False, digits: int = 4) -> dict[str, float]:
    """n, p50, p90, p99, mean, min and max, rounded to `digits`. Percentiles are nearest-rank, or with
    `interpolate` statistics.quantiles(method="inclusive") (which needs at least two samples)."""
    s = sorted(samples_ms)
    if not s:
        return {"n": 0}
    if interpolate:
        cuts = statistics.quantiles(s, n=100, method="inclusive")
        p50, p90, p99 = cuts[49], cuts[89], cuts[98]
    else:
        p50, p90, p99 = (percentile(s, q) for q in (50, 90, 99))
    return {
        "n": len(s),
        "p50": round(p50, digits),
        "p90": round(p90, digits),
        "p99": round(p99, digits),
        "mean": round(statistics.fmean(s), digits),
        "min": round(s[0], digits),
        "max": round(s[-1], digits),
    }


# ---------------------------------------------------------------- targets, tables, JSON


def check(
    name: str, value: float | None, unit: str, op: str, target: float, invalid: str | None = None
) -> dict[str, Any]:
    """One measure against its target; op is "<", ">=" or "==". `invalid`: why the figure does not count
    (then it fails, with that note)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        ok = False
    elif op == "<":
        ok = value < target
    elif op == ">=":
        ok = value >= target
    elif op == "==":
        ok = value == target
    else:
        raise ValueError(f"unknown op {op!r}")
    out = {"name": name, "value": value, "unit": unit, "op": op, "target": target, "ok": ok and not invalid}
    if invalid:
        out["note"] = invalid
    return out


def fmt_value(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, float):
        return f"{value} {unit}".strip()
    text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{text} {unit}".strip()


_ALIGN_WIDTH = re.compile(r"((?:.?[<>=^])?)[-+ ]?z?#?0?(\d*)")


class Table:
    """Cells joined by " | " under a heading line and a rule of dashes.

    A column is (heading, the format spec of its cells: "<8", ">10.0f", "" for as is) or (heading,
    cell spec, heading spec); by default the heading takes the cells' alignment and width. The rule is
    as long as the heading line, or with `ruled` a run of dashes per column (its width, or its heading's
    length when it has none) joined by "-+-".
    """

    def __init__(self, *columns: tuple[str, str] | tuple[str, str, str], ruled: bool = False) -> None:
        self.specs = [c[1] for c in columns]
        self.heads: list[tuple[str, str, int]] = []  # heading, its spec, the rule's width
        for heading, spec, *head_spec in columns:
            m = _ALIGN_WIDTH.match(head_spec[0] if head_spec else spec)
            align, width = (m.group(1), m.group(2)) if m else ("", "")
            self.heads.append((heading, align + width, int(width) if width else len(heading)))
        self.ruled = ruled

    def cells(self, *values: Any) -> str:
        """The first len(values) columns of a row."""
        return " | ".join(format(v, spec) for v, spec in zip(values, self.specs, strict=False))

    def print_head(self) -> None:
        head = " | ".join(format(heading, spec) for heading, spec, _ in self.heads)
        print(head)
        print("-+-".join("-" * width for _, _, width in self.heads) if self.ruled else "-" * len(head))

    def print_row(self, *values: Any) -> None:
        print(self.cells(*values))

    def print_all(self, rows: Iterable[Sequence[Any]]) -> None:
        self.print_head()
        for r in rows:
            self.print_row(*r)


def print_checks(checks: list[dict[str, Any]]) -> None:
    if not checks:
        return
    width = max(len(c["name"]) for c in checks)
    print()
    Table(
        ("target", f"<{width}"), ("measured", ">14"), ("goal", ">14"), ("result", ""), ruled=True
    ).print_all(
        (
            c["name"],
            fmt_value(c["value"], c["unit"]),
            f"{c['op']} {fmt_value(c['target'], c['unit'])}",
            f"{'PASS' if c['ok'] else 'FAIL'}{' (' + c['note'] + ')' if c.get('note') else ''}",
        )
        for c in checks
    )


def report_checks(checks: list[dict[str, Any]], json_path: str | None, doc: dict[str, Any]) -> None:
    """print_checks, then write_json: the doc with the checks last."""
    print_checks(checks)
    write_json(json_path, {**doc, "checks": checks})


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {path}")
