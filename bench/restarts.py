"""Rolling restarts behind nginx: what clients see while each of three broker replicas is restarted.

    python bench/restarts.py --code before=/path/to/old/checkout --code after=.
                             [--rounds 3] [--duration 30] [--connections 8] [--threads 2]
                             [--first 4] [--every 9] [--json out.json] [--keep]

Run from the repository root; about 40 s per round and version. Each `--code LABEL=DIR` is a tree
whose `broker` package the replicas import (`python -m broker run` with PYTHONPATH=DIR, started in
a directory of its own so that the current one is not imported instead); without any, this
checkout. The versions take turns round by round (the order rotating), each round on fresh
processes, all on 127.0.0.1:

- a redis-server of its own (`--save "" --appendonly no`);
- three replicas, each its own port and state_dir, sharing the store (`store: redis://…`, one
  master key file), a temporary HOME and `PYTHON_KEYRING_BACKEND=keyrings.alt.file.PlaintextKeyring`.
  One api_key route (`key: env:AGENTCARD_KEY`, a fake sk_test_ key) to a static upstream, with a
  `rate` policy, so that every request takes a trip to Redis. `allowed_uids: [self]`: nginx's
  workers run as this script's user (`user root;` when it is root);
- one nginx: the static upstream (`return 200`) and, in front, the replicas as in
  deploy/nginx.conf: its top-level `proxy_*` and `client_max_body_size` directives and its upstream
  server parameters are read from that file (`resolve` dropped; the Host header set to
  `public_url`'s host, as docs/deploy.md says for replicas on one host);
- wrk, `--connections` keep-alive connections POSTing a small JSON body back to back for
  `--duration` s; a Lua script counts the answers by status.

While the load runs, each replica in turn is restarted once: at `--first` s and every `--every` s
after, SIGTERM, wait for it to exit, start it again, wait until /_broker/health answers 200.
Reported per round: requests, requests per second, non-2xx answers by status (wrk's count), wrk's
socket errors, each non-2xx answer as nginx logged it (when, which replica, its upstream status),
what nginx's error log says (refused connections are retried on another replica: not errors a
client sees), Redis commands per request, and each restart's drain and start times.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

REPO = HERE.parent
DEPLOY_NGINX = REPO / "deploy" / "nginx.conf"
REPLICAS = 3
PUBLIC_HOST = "broker.restarts.invalid"  # public_url's host: admitted by every replica on any port
PATH = "/v1/charges"
BODY = '{"amount_cents":1,"description":"restart bench"}'
FAKE_KEY = "sk_test_RESTARTSfake000000000000"

WRK_LUA = """\
wrk.method = "POST"
wrk.body = '%(body)s'
wrk.headers["Content-Type"] = "application/json"

local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do counts[status] = (counts[status] or 0) + n end
  end
  local parts = {}
  for status, n in pairs(counts) do table.insert(parts, string.format('"%%d":%%d', status, n)) end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%%d,"duration_us":%%d,"statuses":{%%s},' ..
    '"errors":{"connect":%%d,"read":%%d,"write":%%d,"timeout":%%d},"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, table.concat(parts, ","), e.connect, e.read, e.write,
    e.timeout, latency:percentile(99), latency.max))
end
"""

NGINX_SERVERS = """\
    upstream agentcard_replicas {{
        zone agentcard_replicas 64k;
{servers}
    }}

{shared}

    # the replicas' upstream: a static answer to anything, POST included
    server {{
        listen {host}:{upstream};
        location / {{
            return 200 '{{"ok":true}}';
        }}
    }}

    # what the clients reach: the internal site of deploy/nginx.conf
    server {{
        listen {host}:{front};
        access_log {tmp}/access.log restarts;
        location / {{
            proxy_pass http://agentcard_replicas;
        }}
    }}"""

# an nginx error line: what happened, before ", client: ..."
ERROR_LINE = re.compile(r"\[error\] \d+#\d+: \*\d+ (.*?), client: ")


# ---------------------------------------------------------------- setup


def server_port(taken: set[int]) -> int:
    """A free port below the kernel's ephemeral range, not in `taken`: a client connecting to a replica
    that is down could otherwise be given that same port as its own and connect to itself."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(500):
        port = random.randrange(max(1024, low - 12000), low)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind((bl.HOST, port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def deploy_settings(path: Path = DEPLOY_NGINX) -> tuple[list[str], list[str]]:
    """From deploy/nginx.conf: its top-level proxy directives (Host set to PUBLIC_HOST) and the
    parameters of its upstream servers (without `resolve`)."""
    shared: list[str] = []
    params: list[str] | None = None
    depth, in_upstream = 0, False
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if depth == 0 and line.startswith("upstream "):
            in_upstream = True
        elif depth == 0 and line.startswith(("proxy_", "client_max_body_size")):
            if line.startswith("proxy_set_header Host "):
                line = f"proxy_set_header Host {PUBLIC_HOST};"
            shared.append(line)
        elif in_upstream and depth == 1 and line.startswith("server ") and params is None:
            params = [word for word in line.rstrip(";").split()[2:] if word != "resolve"]
        depth += line.count("{") - line.count("}")
        if depth == 0:
            in_upstream = False
    if params is None or not any(d.startswith("proxy_next_upstream ") for d in shared):
        raise RuntimeError(f"{path}: no upstream server or no proxy_next_upstream found")
    if f"proxy_set_header Host {PUBLIC_HOST};" not in shared:
        raise RuntimeError(f"{path}: no `proxy_set_header Host` found")
    return shared, params


def start_redis(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    # fmt: off
    args = [
        exe, "--port", str(port), "--bind", bl.HOST, "--save", "", "--appendonly", "no",
        "--dir", str(tmp), "--logfile", "redis.log", "--daemonize", "no",
    ]
    # fmt: on
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=bl.pdeathsig
    )
    bl.wait_port(port, proc, "redis-server")
    return proc


def redis_calls(port: int) -> int:
    """Commands Redis has run since it started (INFO commandstats), its PINGs and INFOs left out."""
    with socket.create_connection((bl.HOST, port), timeout=5) as s:
        s.sendall(b"INFO commandstats\r\n")
        data = b""
        while b"\r\n" not in data or len(data) < _bulk_size(data):
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"Redis closed the connection: {data[:200]!r}")
            data += chunk
    return sum(
        int(m.group(2))
        for m in re.finditer(rb"cmdstat_([a-z|]+):calls=(\d+)", data)
        if m.group(1) not in (b"ping", b"info")
    )


def _bulk_size(data: bytes) -> int:
    """The length of a whole bulk string reply (`$N\\r\\n` N bytes `\\r\\n`) whose head is in `data`."""
    head = data.partition(b"\r\n")[0]
    if not head.startswith(b"$"):
        raise RuntimeError(f"Redis answered INFO with {head[:200]!r}")
    return len(head) + 2 + int(head[1:]) + 2


@dataclass
class Replica:
    name: str
    port: int
    dir: Path
    cfg: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.dir / "broker.log"


def replica_config(r: Replica, upstream: int, redis: int, key_file: Path) -> None:
    import yaml  # a dependency of the broker itself

    doc = {
        "listen": [f"{bl.HOST}:{r.port}"],
        "allowed_hosts": [bl.HOST],
        "allowed_uids": ["self"],  # nginx's workers run as this script's user
        "allow_insecure_upstream": True,
        "public_url": f"https://{PUBLIC_HOST}",
        "secret_store": "file",
        "state_dir": str(r.dir / "state"),
        "store": {
            "url": f"redis://{bl.HOST}:{redis}/0",
            "master_key": f"file:{key_file}",
            "prefix": "restarts",
        },
        "timeouts": {"drain": 30},
        "log": {"level": "warning", "format": "json", "audit": False},
        "routes": [
            {
                "name": "api",
                "prefix": "/",
                "upstream": f"http://{bl.HOST}:{upstream}",
                "auth": {"type": "api_key", "key": "env:AGENTCARD_KEY"},
                "policy": {"rate": {"requests": 100_000_000, "per": "1m"}},
            }
        ],
    }
    r.cfg.parent.mkdir(mode=0o700, exist_ok=True)
    r.cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    r.cfg.chmod(0o600)


def check_code(code: Path, env: dict[str, str], cwd: Path) -> None:
    """The replicas, started like this, import the `broker` package from `code`."""
    done = bl.capture([sys.executable, "-c", "import broker; print(broker.__file__)"], env=env, cwd=cwd)
    where = Path(done.stdout.strip() or "?").resolve()
    if done.returncode != 0 or not where.is_relative_to(code):
        raise RuntimeError(f"the replicas would import {where}, not {code}/broker: {done.stderr[-500:]}")


def spawn(r: Replica, env: dict[str, str]) -> None:
    with r.log.open("ab") as log:
        r.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "run", "--config", str(r.cfg)],
            cwd=r.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=bl.pdeathsig,
        )


def start(r: Replica, env: dict[str, str]) -> float:
    """Start the replica; the seconds until /_broker/health answers 200."""
    spawn(r, env)
    assert r.proc is not None
    proc = r.proc
    return bl.wait_health(r.port, proc.poll, r.log, started=time.perf_counter(), poll_s=0.01)


def restart(r: Replica, env: dict[str, str]) -> dict[str, Any]:
    """SIGTERM, wait for the exit, start again, wait for health."""
    assert r.proc is not None
    event: dict[str, Any] = {"replica": r.name, "port": r.port, "sigterm_at": time.time()}
    began = time.perf_counter()
    r.proc.send_signal(signal.SIGTERM)
    event["exit_code"] = r.proc.wait(timeout=60)
    event["drain_s"] = round(time.perf_counter() - began, 3)
    event["start_s"] = round(start(r, env), 3)
    event["ready_at"] = time.time()
    r.restarts.append(event)
    return event


def post_once(port: int) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection(bl.HOST, port, timeout=10)
    try:
        conn.request("POST", PATH, body=BODY, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- one round


def read_access_log(
    path: Path, events: list[dict[str, Any]], load_at: float, end_at: float
) -> dict[str, Any]:
    """Answers by status as nginx logged them, and each non-2xx one with the restart before it; a 499
    logged once the load ended is wrk closing its connections, and left out of the failures."""
    statuses: collections.Counter[str] = collections.Counter()
    failures = []
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4:
            continue
        at, status, addr, up_status = float(parts[0]), parts[1], parts[2], parts[3]
        statuses[status] += 1
        if not status.startswith("2") and not (status == "499" and at >= end_at):
            before = [e for e in events if e["sigterm_at"] <= at]
            last = before[-1] if before else None
            failures.append(
                {
                    "at_s": round(at - load_at, 3),
                    "status": int(status),
                    "upstream": addr,
                    "upstream_status": up_status,
                    "after_sigterm_of": last["replica"] if last else None,
                    "after_sigterm_s": round(at - last["sigterm_at"], 3) if last else None,
                }
            )
    return {"statuses": dict(statuses), "failures": failures}


def read_error_log(path: Path) -> dict[str, int]:
    """nginx's [error] lines by message (`connect() failed (111: Connection refused) while connecting
    to upstream` is a request nginx sent to another replica: no client saw it)."""
    kinds: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        if found := ERROR_LINE.search(line):
            kinds[found.group(1)] += 1
        elif "[error]" in line:
            kinds[line.split("] ", 1)[-1][:200]] += 1
    return dict(kinds)


def run_round(tmp: Path, label: str, code: Path, args: Any) -> dict[str, Any]:
    taken: set[int] = set()
    redis_port, upstream, front = (server_port(taken) for _ in range(3))
    replicas = []
    for i in range(REPLICAS):
        d = tmp / f"replica{i + 1}"
        d.mkdir(parents=True)
        replicas.append(Replica(f"replica{i + 1}", server_port(taken), d, d / "config" / "broker.yaml"))
    procs: list[tuple[subprocess.Popen[Any], str]] = []  # stopped at the end, the last first
    try:
        procs.append((start_redis(tmp, redis_port), "redis-server"))
        shared, params = deploy_settings()
        servers = "\n".join(f"        server {bl.HOST}:{r.port} {' '.join(params)};" for r in replicas)
        text = NGINX_SERVERS.format(
            servers=servers,
            shared="\n".join(f"    {d}" for d in shared),
            host=bl.HOST,
            upstream=upstream,
            front=front,
            tmp=tmp,
        )
        http = "    access_log off;\n    log_format restarts '$msec $status $upstream_addr $upstream_status';"
        procs.append(
            (
                bl.launch_nginx(tmp, bl.nginx_conf(tmp, http, text, args.nginx_workers), (upstream, front)),
                "nginx",
            )
        )

        key_file = tmp / "master.key"
        key_file.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        key_file.chmod(0o600)
        env = bl.broker_env(tmp)
        env.update(AGENTCARD_KEY=FAKE_KEY, PYTHONPATH=str(code))
        check_code(code, env, tmp)
        for r in replicas:
            replica_config(r, upstream, redis_port, key_file)
            start(r, env)

        calls_before = redis_calls(redis_port)
        for _ in range(REPLICAS):  # one request through each replica (round robin)
            status, body = post_once(front)
            if status != 200 or b'"ok"' not in body:
                raise RuntimeError(f"sanity: POST through nginx answered {status}: {body[:300]!r}")
        if redis_calls(redis_port) - calls_before < REPLICAS:
            raise RuntimeError("sanity: the requests did not reach Redis (no rate policy in the path?)")

        lua = tmp / "post.lua"
        lua.write_text(WRK_LUA % {"body": BODY})
        calls_before = redis_calls(redis_port)
        # fmt: off
        cmd = [
            shutil.which("wrk") or "wrk", f"-t{args.threads}", f"-c{args.connections}",
            f"-d{args.duration}s", "--timeout", "10s", "-s", str(lua), f"http://{bl.HOST}:{front}{PATH}",
        ]
        # fmt: on
        load_before = os.getloadavg()[0]
        load_at = time.time()
        wrk = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=bl.pdeathsig
        )
        procs.append((wrk, "wrk"))
        events = []
        for i, r in enumerate(replicas):
            time.sleep(max(0.0, load_at + args.first + i * args.every - time.time()))
            events.append(restart(r, env))
        out, err = wrk.communicate(timeout=args.duration + 60)
        calls = redis_calls(redis_port) - calls_before
        found = re.search(r"^RESULT (.*)$", out, re.MULTILINE)
        if wrk.returncode != 0 or found is None:
            raise RuntimeError(f"wrk failed ({wrk.returncode}): {err[-500:]}{out[-500:]}")
        result = json.loads(found.group(1))
        access = read_access_log(tmp / "access.log", events, load_at, load_at + args.duration)
        for e in events:
            e["sigterm_s"] = round(e.pop("sigterm_at") - load_at, 3)
            e["ready_s"] = round(e.pop("ready_at") - load_at, 3)
    finally:
        for r in replicas:
            bl.stop_process(r.proc, r.name)
        for proc, name in reversed(procs):
            bl.stop_process(proc, name)
    requests = result["requests"]
    non2xx = {s: n for s, n in result["statuses"].items() if not s.startswith("2")}
    return {
        "version": label,
        "code": str(code),
        "requests": requests,
        "req_per_s": round(requests / (result["duration_us"] / 1e6)),
        "non_2xx": non2xx,
        "socket_errors": {k: v for k, v in result["errors"].items() if v},
        "p99_ms": round(result["p99_us"] / 1000, 1),
        "max_ms": round(result["max_us"] / 1000, 1),
        "redis_calls_per_request": round(calls / requests, 2) if requests else None,
        "nginx_statuses": access["statuses"],
        "nginx_failures": access["failures"],
        "nginx_error_log": read_error_log(tmp / "nginx-error.log"),
        "restarts": events,
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


# ---------------------------------------------------------------- the run


def parse_code(values: list[str] | None) -> list[tuple[str, Path]]:
    if not values:
        return [("this", REPO)]
    out = []
    for value in values:
        label, sep, where = value.partition("=")
        path = Path(where).resolve()
        if not sep or not label or not (path / "broker" / "__init__.py").is_file():
            raise SystemExit(f"--code {value!r}: expected LABEL=DIR, DIR holding the broker package")
        out.append((label, path))
    if len({label for label, _ in out}) != len(out):
        raise SystemExit("--code: every LABEL must differ")
    return out


def fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} x {s}" for s, n in sorted(counts.items())) or "0"


def print_round(res: dict[str, Any], n: int) -> None:
    restarts = ", ".join(f"{e['drain_s']:.2f}+{e['start_s']:.2f}" for e in res["restarts"])
    print(
        f"{res['version']:>8} round {n}: {res['requests']:>6} requests, {res['req_per_s']} req/s, "
        f"non-2xx: {fmt_counts(res['non_2xx'])}; socket errors: {fmt_counts(res['socket_errors'])}; "
        f"p99 {res['p99_ms']} ms; Redis {res['redis_calls_per_request']}/request; "
        f"drain+start s: {restarts}; load average {res['loadavg_1m']}"
    )
    for f in res["nginx_failures"]:
        print(
            f"          {f['status']} at {f['at_s']} s, {f['after_sigterm_s']} s after SIGTERM to "
            f"{f['after_sigterm_of']} (upstream {f['upstream']} {f['upstream_status']})"
        )
    for message, n in sorted(res["nginx_error_log"].items()):
        print(f"          nginx error log: {n} x {message}")


def summarize(results: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    out = {}
    for label in labels:
        mine = [r for r in results if r["version"] == label]
        non2xx: collections.Counter[str] = collections.Counter()
        for r in mine:
            non2xx.update(r["non_2xx"])
        out[label] = {
            "rounds": len(mine),
            "restarts": sum(len(r["restarts"]) for r in mine),
            "requests": sum(r["requests"] for r in mine),
            "non_2xx": dict(non2xx),
            "non_2xx_per_round": [sum(r["non_2xx"].values()) for r in mine],
            "socket_errors": sum(sum(r["socket_errors"].values()) for r in mine),
        }
    return out


def main() -> int:
    p = bl.arg_parser(__doc__)
    p.add_argument("--code", action="append", metavar="LABEL=DIR", help="a version to measure (repeat)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per version")
    p.add_argument("--duration", type=int, default=30, help="seconds of load per round")
    p.add_argument("--connections", type=int, default=8, help="wrk's concurrent connections")
    p.add_argument("--threads", type=int, default=2, help="wrk's threads")
    p.add_argument("--first", type=float, default=4.0, help="seconds into the load of the first restart")
    p.add_argument("--every", type=float, default=9.0, help="seconds between restarts")
    p.add_argument("--nginx-workers", type=int, default=2, help="nginx worker_processes")
    bl.add_output_args(p, "configs, logs, nginx's access log")
    args = p.parse_args()
    if args.first + (REPLICAS - 1) * args.every + 3 > args.duration:
        raise SystemExit("--duration is too short for three restarts at --first and --every")
    versions = parse_code(args.code)
    results: list[dict[str, Any]] = []
    with bl.BenchRun("restarts-", args.keep, log_lines=0) as run:
        for n in range(args.rounds):
            for k in range(len(versions)):
                label, code = versions[(n + k) % len(versions)]
                res = run_round(run.tmp / f"round{n + 1}-{label}", label, code, args)
                results.append(res)
                print_round(res, n + 1)
        totals = summarize(results, [label for label, _ in versions])
        print()
        for label, t in totals.items():
            print(
                f"{label:>8}: {t['requests']} requests in {t['rounds']} rounds ({t['restarts']} restarts), "
                f"non-2xx {fmt_counts(t['non_2xx'])} (per round: {t['non_2xx_per_round']}), "
                f"socket errors {t['socket_errors']}"
            )
        bl.write_json(
            args.json, {"bench": "restarts", "args": vars(args), "rounds": results, "totals": totals}
        )
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
