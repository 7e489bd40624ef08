"""REST forwarding benchmark: the broker against nginx doing the same job, and against no proxy at all.

    python bench/rest.py [--duration 5] [--connections 32] [--threads 2] [--json out.json]

What it starts, all on 127.0.0.1 and all inside one temporary directory removed on exit:

* nginx (own prefix, own nginx.conf, `daemon off;`) with two servers:
  - "direct": the fast upstream, `return 200 '{"ok":true}'`, plus `/big` (a 200 MiB sparse file)
    and `/_bench/auth` (200 only when the expected Bearer header arrived, else 401);
  - "nginx": a keepalive reverse proxy to "direct" that injects `Authorization: Bearer <fake key>`,
    i.e. the broker's job done by nginx, as the reference point.
* the broker (`agentcard-broker run`), one api_key route `/` -> "direct", keyring file backend in a
  temporary HOME, logging at warning level with the audit line off.

Then wrk measures req/s and p50/p99 for direct, broker and nginx on /api/v1/cards, and the broker's
RSS is read from /proc/PID/status idle, after the wrk runs and after streaming 200 MiB through it.

The key is an obviously fake sk_test_ key; nothing leaves 127.0.0.1. On a 2-core machine wrk and
the server under test share the CPU: the numbers are what they are, compare them with each other.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

FAKE_KEY = "sk_test_BENCHfake0000000000000000"
BENCH_PATH = "/api/v1/cards"
BIG_BYTES = 200 * 1024 * 1024
CHUNK = 1024 * 1024
HOST = "127.0.0.1"


# ---------------------------------------------------------------- small helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout}s")


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _pdeathsig() -> None:  # runs in the child before exec: die with us even on SIGKILL of this script
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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


# ---------------------------------------------------------------- nginx


NGINX_CONF = """\
{user}daemon off;
master_process on;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-tmp/client_body;
    proxy_temp_path {tmp}/nginx-tmp/proxy;
    fastcgi_temp_path {tmp}/nginx-tmp/fastcgi;
    uwsgi_temp_path {tmp}/nginx-tmp/uwsgi;
    scgi_temp_path {tmp}/nginx-tmp/scgi;
    default_type application/json;
    sendfile on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;

    upstream fast {{
        server {host}:{direct};
        keepalive 64;
    }}

    # (a) the fast upstream
    server {{
        listen {host}:{direct};
        location / {{
            return 200 '{{"ok":true}}';
        }}
        location = /big {{
            types {{ }}
            default_type application/octet-stream;
            alias {tmp}/big.bin;
        }}
        location = /_bench/auth {{
            if ($http_authorization = "Bearer {key}") {{
                return 200 '{{"auth":"ok"}}';
            }}
            return 401 '{{"auth":"missing or wrong"}}';
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
    }}
}}
"""


def nginx_user_line() -> str:
    return "user root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 temp dir


def launch_nginx(tmp: Path, conf_text: str, ports: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """nginx with this nginx.conf text (prefix `tmp`, `daemon off;`), once it listens on every port."""
    (tmp / "nginx-tmp").mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(conf_text)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    errlog = tmp / "nginx-error.log"
    test = subprocess.run(
        [nginx, "-t", "-q", "-p", f"{tmp}/", "-c", str(conf), "-e", str(errlog)],
        capture_output=True,
        text=True,
        check=False,
    )
    if test.returncode != 0:
        raise RuntimeError(f"nginx -t failed:\n{test.stderr}")
    proc = subprocess.Popen(
        [nginx, "-p", f"{tmp}/", "-c", str(conf), "-e", str(errlog)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_pdeathsig,
    )
    try:
        for port in ports:
            wait_port(port, proc, "nginx")
    except RuntimeError as exc:
        stop_process(proc, "nginx")
        raise RuntimeError(f"{exc}\nnginx error log:\n{tail(errlog)}") from None
    return proc


def start_nginx(tmp: Path, direct: int, proxy: int, workers: int) -> subprocess.Popen[bytes]:
    conf_text = NGINX_CONF.format(
        user=nginx_user_line(), workers=workers, tmp=tmp, host=HOST, direct=direct, proxy=proxy, key=FAKE_KEY
    )
    return launch_nginx(tmp, conf_text, (direct, proxy))


# ---------------------------------------------------------------- broker


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


def broker_config(
    tmp: Path,
    port: int,
    upstream_port: int,
    *,
    upstream: str | None = None,
    insecure: bool = True,
    extra_routes: list[dict[str, Any]] | None = None,
) -> Path:
    """The bench config: route `api` (prefix /) -> http://HOST:upstream_port, or `upstream` when given.

    `insecure` is allow_insecure_upstream; `extra_routes` are appended after `api`.
    """
    import yaml  # a dependency of the broker itself

    doc = {
        "listen": [f"{HOST}:{port}"],
        "allow_insecure_upstream": insecure,
        "secret_store": "keyring",
        "timeouts": {"connect": 10, "first_byte": 60, "idle": 300, "drain": 2},
        "log": {"level": "warning", "format": "json", "audit": False},
        "routes": [
            {
                "name": "api",
                "prefix": "/",
                "upstream": upstream or f"http://{HOST}:{upstream_port}",
                "auth": {"type": "api_key", "key": "keyring"},
            },
            *(extra_routes or []),
        ],
    }
    path = tmp / "broker.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


def broker_cmd() -> str:
    exe = shutil.which("agentcard-broker")
    if exe is None:
        raise RuntimeError("the `agentcard-broker` command is not on PATH (pip install -e . in the repo)")
    return exe


def store_key(cfg: Path, env: dict[str, str], route: str = "api") -> None:
    done = subprocess.run(
        [broker_cmd(), "set-key", route, "--config", str(cfg), "--stdin"],
        input=FAKE_KEY + "\n",
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"set-key failed ({done.returncode}): {done.stdout}{done.stderr}")


def start_broker(cfg: Path, env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [broker_cmd(), "run", "--config", str(cfg)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            preexec_fn=_pdeathsig,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with code {proc.returncode}; its log:\n{tail(log)}")
        with contextlib.suppress(OSError):
            status, _ = get(port, "/_broker/health", timeout=1)
            if status == 200:
                return proc
        time.sleep(0.1)
    raise RuntimeError(f"broker did not answer /_broker/health within 30s; its log:\n{tail(log)}")


# ---------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    target: str
    url: str
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p75_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    avg_ms: float = 0.0
    max_ms: float = 0.0
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(target: str, url: str, out: str) -> WrkResult:
    r = WrkResult(target=target, url=url, raw=out)
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M):
        setattr(r, f"p{pct}_ms", round(_ms(val), 3))
    m = re.search(r"^\s+Latency\s+(\S+)\s+\S+\s+(\S+)", out, re.M)
    if m:
        r.avg_ms, r.max_ms = round(_ms(m.group(1)), 3), round(_ms(m.group(2)), 3)
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m:
        r.requests = int(m.group(1))
        r.seconds = _ms(m.group(2) + m.group(3)) / 1000
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk output has no Requests/sec line:\n{out}")
    r.rps = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r.non_2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    return r


def run_wrk(target: str, url: str, args: argparse.Namespace, duration: float) -> WrkResult:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency", url]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}) on {url}:\n{done.stdout}{done.stderr}")
    return parse_wrk(target, url, done.stdout)


# ---------------------------------------------------------------- the 200 MiB stream


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


# ---------------------------------------------------------------- main


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


def _epoch(stamp: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def summarize_problems(problems: list[dict[str, Any]], phases: list[tuple[str, float, float]]) -> list[str]:
    """Group problem lines by (level, event, last exception line) and say which bench phase they fell in."""
    groups: dict[tuple[str, str, str], list[float | None]] = {}
    for doc in problems:
        exc = str(doc.get("exception") or "").strip().splitlines()
        frames = re.findall(r'File "[^"]*/(broker/[^"]+)", line (\d+)', "\n".join(exc))
        at = f" (deepest broker frame {frames[-1][0]}:{frames[-1][1]})" if frames else ""
        key = (str(doc.get("level")), str(doc.get("event")), (exc[-1] + at) if exc else "")
        groups.setdefault(key, []).append(_epoch(doc.get("timestamp")))
    out = []
    for (level, event, what), stamps in groups.items():
        where: dict[str, int] = {}
        for t in stamps:
            name = "outside the timed phases"
            for phase, t0, t1 in phases:
                if t is not None and t0 <= t <= t1 + 1.0:
                    # wrk stops by closing its connections with requests still in flight
                    name = f"{phase}, last 0.5s or after" if t >= t1 - 0.5 else phase
                    break
            where[name] = where.get(name, 0) + 1
        known = [t for t in stamps if t is not None]
        span = f", within {max(known) - min(known):.3f}s" if len(known) > 1 else ""
        out.append(f"{len(stamps)} x {level}: {event}: {what or '-'}{span}; phases: {where}")
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run (default 5)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded wrk before each run")
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed", file=sys.stderr)
            return 2

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    tmp = Path(tempfile.mkdtemp(prefix="agentcard-bench-"))
    nginx: subprocess.Popen[bytes] | None = None
    broker: subprocess.Popen[bytes] | None = None
    broker_log = tmp / "broker.log"
    try:
        ports = {"direct": free_port(), "nginx": free_port(), "broker": free_port()}
        if len(set(ports.values())) != 3:
            raise RuntimeError(f"port picking collided: {ports}")
        with (tmp / "big.bin").open("wb") as f:
            f.truncate(BIG_BYTES)  # sparse zeros: costs no disk, nginx sendfiles it
        nginx = start_nginx(tmp, ports["direct"], ports["nginx"], args.nginx_workers)

        env = broker_env(tmp)
        cfg = broker_config(tmp, ports["broker"], ports["direct"])
        store_key(cfg, env)
        broker = start_broker(cfg, env, ports["broker"], broker_log)
        pid = broker.pid
        time.sleep(0.5)  # let start-up settle before the idle reading
        rss_idle = rss_kib(pid)
        _, status_body = get(ports["broker"], "/_broker/status")
        reported_pid = json.loads(status_body).get("pid")
        if reported_pid != pid:
            print(f"note: broker reports pid {reported_pid}, spawned pid is {pid}", file=sys.stderr)

        sanity(ports)
        results: list[WrkResult] = []
        phases: list[tuple[str, float, float]] = []
        for target in ("direct", "broker", "nginx"):
            url = f"http://{HOST}:{ports[target]}{BENCH_PATH}"
            sanity(ports)
            if args.warmup > 0:
                t0 = time.time()
                run_wrk(target, url, args, args.warmup)
                phases.append((f"wrk {target} warmup", t0, time.time()))
            t0 = time.time()
            res = run_wrk(target, url, args, args.duration)
            phases.append((f"wrk {target}", t0, time.time()))
            results.append(res)
            errs = sum(res.socket_errors.values())
            print(
                f"  {target:<7} {res.rps:>10.0f} req/s  p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms"
                + (f"  non-2xx {res.non_2xx}" if res.non_2xx else "")
                + (f"  socket errors {res.socket_errors}" if errs else ""),
                file=sys.stderr,
            )
        if broker.poll() is not None:
            raise RuntimeError(f"broker died during wrk (code {broker.returncode}):\n{tail(broker_log)}")
        time.sleep(0.5)
        rss_after_wrk = rss_kib(pid)

        t0 = time.time()
        big = stream_big(ports["broker"], pid)
        phases.append(("200 MiB stream", t0, time.time()))
        time.sleep(0.5)
        rss_after_big = rss_kib(pid)
        if broker.poll() is not None:
            raise RuntimeError(f"broker died during the 200 MiB stream:\n{tail(broker_log)}")
        sanity(ports)  # still serving afterwards

        by = {r.target: r for r in results}
        ratios = {
            "broker/nginx": round(by["broker"].rps / by["nginx"].rps, 3) if by["nginx"].rps else None,
            "broker/direct": round(by["broker"].rps / by["direct"].rps, 3) if by["direct"].rps else None,
        }
        rss = {
            "idle_mib": mib(rss_idle["VmRSS"]),
            "after_wrk_mib": mib(rss_after_wrk["VmRSS"]),
            "during_200mib_peak_mib": mib(big["peak_rss_during_kib"]),
            "after_200mib_mib": mib(rss_after_big["VmRSS"]),
            "delta_200mib_mib": mib(rss_after_big["VmRSS"] - rss_after_wrk["VmRSS"]),
            "delta_total_mib": mib(rss_after_big["VmRSS"] - rss_idle["VmRSS"]),
            "hwm_mib": mib(rss_after_big["VmHWM"]),
        }
        problems = broker_log_problems(broker_log)

        print()
        print(
            f"agentcard-broker REST bench: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
            f"GET {BENCH_PATH} ({os.cpu_count()} CPUs, nginx workers {args.nginx_workers})"
        )
        print()
        print(f"{'target':<8} | {'req/s':>10} | {'p50 ms':>8} | {'p99 ms':>8} | errors")
        print(f"{'-' * 8}-+-{'-' * 10}-+-{'-' * 8}-+-{'-' * 8}-+-------")
        for r in results:
            errs = r.non_2xx + sum(r.socket_errors.values())
            print(f"{r.target:<8} | {r.rps:>10.0f} | {r.p50_ms:>8.2f} | {r.p99_ms:>8.2f} | {errs}")
        print()
        print("direct = nginx fast upstream, no proxy; nginx = nginx proxy injecting the header")
        for k, v in ratios.items():
            print(f"req/s {k:<14} {v:.3f}" if v is not None else f"req/s {k:<14} n/a")
        print()
        print(f"broker RSS (pid {pid}, /proc VmRSS)")
        print(f"  idle after start        {rss['idle_mib']:>8.1f} MiB")
        print(f"  after wrk runs          {rss['after_wrk_mib']:>8.1f} MiB")
        print(f"  peak while streaming    {rss['during_200mib_peak_mib']:>8.1f} MiB")
        print(f"  after 200 MiB stream    {rss['after_200mib_mib']:>8.1f} MiB")
        print(f"  delta from the stream   {rss['delta_200mib_mib']:>+8.1f} MiB")
        print(f"  delta since idle        {rss['delta_total_mib']:>+8.1f} MiB")
        print(f"  high-water mark (VmHWM) {rss['hwm_mib']:>8.1f} MiB")
        print(
            f"200 MiB stream: {big['bytes']} bytes ok in {big['seconds']:.2f}s ({big['mib_per_s']} MiB/s), "
            f"{'chunked' if big['chunked'] else 'content-length ' + str(big['content_length'])}"
        )
        print(f"broker log lines at warning or above: {len(problems)}")
        for line in summarize_problems(problems, phases):
            print(f"  {line}")

        if args.json:
            doc = {
                "config": {
                    "duration_s": args.duration,
                    "connections": args.connections,
                    "threads": args.threads,
                    "warmup_s": args.warmup,
                    "nginx_workers": args.nginx_workers,
                    "path": BENCH_PATH,
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "results": [{k: v for k, v in asdict(r).items() if k != "raw"} for r in results],
                "ratios_rps": ratios,
                "rss": rss,
                "stream_200mib": big,
                "broker_log_problems": problems,
                "phases": [{"name": n, "start": t0, "end": t1} for n, t0, t1 in phases],
            }
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        if broker_log.exists():
            print(f"broker log tail:\n{tail(broker_log)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        stop_process(broker, "broker", signal.SIGTERM)
        stop_process(nginx, "nginx", signal.SIGTERM)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
