"""Broker replicas on one shared Redis (issue 17): calls/s through one replica and three, Redis
round trips per forwarded call and per refresh, and what grants, budgets and rates weigh in Redis.

    python bench/replicas.py [--users 300] [--connections 24] [--duration 3] [--rounds 3]
                             [--calls 300] [--latency-calls 600] [--grants 10000]
                             [--parts 1,2,2b,3,4] [--json out.json]

Run from the repository root; about two minutes. Everything runs on 127.0.0.1 in one temporary
directory removed on exit. What it starts: a redis-server of its own (`--save "" --appendonly no`),
three upstreams, and three brokers (`agentcard-broker run`) with `store: {url:
redis://127.0.0.1:PORT/0, master_key: file:…, prefix: bench}`, one HOME and keyring file between
them, each its own `listen` port and `state_dir`, one `public_url` (replica 0's). The upstreams:
the sandbox of bench/per_user.py (its MCP SDK server, stateless JSON, and its OAuth 2.1 server;
`bench/per_user.py --serve-upstream`), the same with access tokens of SHORT_TTL seconds, and a lean
one (this script, `--serve-lean`: it looks the bearer token up among the seeded users' tokens and
answers a canned `tools/call` result naming the user, so that the brokers, not the MCP SDK, are
what the CPUs are spent on). Per-user routes: `peruser`, `rate` (`rate: {requests: 100000, per:
1m}`) and `budget` (`budget: {amount_cents: 1000000000, per: 24h}`; a call spends 1 cent) to the
sandbox, `short` to the short-lived one, `lean` to the lean one. The platform client's token comes
from the real `clients add` (its hash in Redis, so one token for all three); two users connect the
real way through replica 0 (connect link, page, the sandbox's consent picker); `--users` (+30 kept
cold for part 2) have their grants written with `RedisStore.put_grant` (this process, the same
master key file), their tokens issued by the sandbox's provider (its seed file, as
bench/per_user.py part 2 does). Every script is loaded into Redis's cache first, as on a server
that has run a while. Before measuring, every user calls `whoami` through every replica on
`peruser` and `lean` and must come back as themself.

1. Calls per second: `tools/call whoami` on `peruser` (sandbox) and on `lean`, three wrk
   processes of `--connections`/3 keep-alive connections each (one thread; a Lua script cycling
   the users), all three against replica 0 ("one replica") or one per replica ("three replicas"):
   the same load generator and concurrency, only the ports differ. "direct": the same calls
   straight to the upstream with each user's own access token, once, the upstream's ceiling.
   `--rounds` rounds of `--duration` s, the targets taking turns (the order rotating). Per target:
   the median calls/s, p50/p99, the CPU per call of each process (brokers, upstream, Redis, wrk;
   /proc and the children's rusage), the machine's busy share, and "others": cores that processes
   outside this run kept busy (another job on the VM; interrupt time is not counted there).
2. Redis commands per call with a fresh access token: MONITOR (which tells commands a client sent,
   round trips, from those a Lua script ran inside Redis) and `INFO commandstats` around 3 idle
   seconds, then the first call of each of 30 cold users through each replica, then `--calls`
   calls per route (`create_card` with `amount_cents: 1`, round-robin over replicas and users,
   each user having called each replica before). PING (the health check, once a second per
   replica) and this script's INFO are counted apart.
2b. Refreshes: REFRESH_USERS users connect on `short` and call every replica; after their tokens
   expire each calls one replica, and after the new ones expire each calls all three at once.
   Counted: refresh_token grants at the sandbox per user (one is right) and round trips per user.
3. Latency and broker CPU per call with the shared rate and budget: the three sandbox routes
   taking turns in blocks of `--block` calls on replica 0, one keep-alive connection.
4. Redis memory: a second redis-server, empty; `INFO memory` used_memory before and after
   `--grants` grants through `RedisStore.put_grant` (user ids are UUIDs) with sandbox-sized tokens,
   with JWT-sized ones (a 1000-character access token, a 64-character refresh token), and with
   JWT-sized ones and `hash-max-listpack-value 4096`; then rate windows (`hit_rate`,
   `--window-users` x `--rate-hits`) and budget windows (`reserve_budget`, `--window-users` x
   `--budget-spends`), each batch on connections closed before the second reading. The time
   Redis spends in `reserve_budget` (commandstats) with 1, 1000 and 5000 entries in the window.
   redis-benchmark (50 clients, no pipelining): GET, HMGET of a stored grant, EVALSHA of the
   rate and budget scripts.

Prints tables and exits 0 when it ran; no target is judged. Three replicas, three upstreams,
Redis and wrk share the machine's cores: compare figures within a run, and look at "others".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402
from rest import parse_wrk  # noqa: E402

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# after rest: importing per_user drops bench/ from sys.path (bench/mcp.py would shadow the MCP SDK)
import per_user as pu  # noqa: E402

CLIENT = pu.CLIENT
PLAIN, RATE, BUDGET, LEAN, SHORT = "peruser", "rate", "budget", "lean", "short"
ROUTES = (PLAIN, RATE, BUDGET)  # to the sandbox
COLD_USERS = 30  # seeded, and left alone until part 2 counts their first calls
SHORT_TTL = 4  # s: the access tokens of the upstream behind SHORT (refreshed 0.8 s before)
REFRESH_USERS = 10
REPLICAS = 3
LONG_TTL = 3600
PREFIX = "bench"
JSON_HEADERS = pu.JSON_HEADERS
WHOAMI = json.dumps(pu.CALL).encode()
SPEND = json.dumps(
    {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
     "params": {"name": "create_card", "arguments": {"amount_cents": 1}}}
).encode()  # fmt: skip
REDIS_READY_S = 10.0


# ---------------------------------------------------------------- redis-server


@dataclass
class RedisProc:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://{bl.HOST}:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host=bl.HOST, port=self.port, decode_responses=True)


def start_redis(run: bl.BenchRun, name: str) -> RedisProc:
    d = run.tmp / name
    d.mkdir()
    port = bl.free_port()
    # fmt: off
    cmd = [
        "redis-server", "--port", str(port), "--bind", bl.HOST, "--protected-mode", "yes",
        "--dir", str(d), "--logfile", "redis.log", "--save", "", "--appendonly", "no",
    ]
    # fmt: on
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, preexec_fn=bl.pdeathsig)
    run.stop_on_exit(proc, f"redis-server {name}")
    deadline = time.monotonic() + REDIS_READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited at start:\n{bl.tail(d / 'redis.log')}")
        with contextlib.suppress(OSError), socket.create_connection((bl.HOST, port), 0.5) as s:
            s.sendall(b"PING\r\n")
            if s.recv(64).startswith(b"+PONG"):
                return RedisProc(proc, port)
        time.sleep(0.01)
    raise RuntimeError(f"redis-server did not answer within {REDIS_READY_S} s")


def commandstats(r: Any) -> Counter[str]:
    """calls by command, from INFO commandstats."""
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in r.info("commandstats").items()})


class Monitor:
    """MONITOR on a connection of its own, in a thread: commands counted by who ran them, a
    client (a round trip) or a Lua script inside Redis."""

    LINE = re.compile(rb'^\+[\d.]+ \[\d+ (\S+)\] "([^"]*)"')

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((bl.HOST, port), 5)
        self.sock.sendall(b"MONITOR\r\n")
        if not self._readline().startswith(b"+OK"):
            raise RuntimeError("MONITOR was refused")
        self.sent: Counter[str] = Counter()  # by clients
        self.scripted: Counter[str] = Counter()  # inside scripts
        self._buf = b""
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.started = time.monotonic()
        self.seconds = 0.0

    def _readline(self) -> bytes:
        data = b""
        while not data.endswith(b"\r\n"):
            data += self.sock.recv(1)
        return data

    def _read(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            self._buf += chunk
            *lines, self._buf = self._buf.split(b"\r\n")
            for line in lines:
                m = self.LINE.match(line)
                if m:
                    (self.scripted if m.group(1) == b"lua" else self.sent)[m.group(2).decode().lower()] += 1

    def stop(self) -> None:
        self.seconds = time.monotonic() - self.started
        time.sleep(0.3)  # what Redis already wrote reaches us
        self._stop = True
        self._thread.join(5)
        self.sock.close()


# ---------------------------------------------------------------- the lean upstream (--serve-lean)


class LeanUpstream(asyncio.Protocol):
    """POSTs on keep-alive connections: the bearer token looked up among the seeded users' access
    tokens (401 when it is not one), a canned `tools/call` result naming the token's user. As
    little upstream work as can be, so the brokers are what the CPUs are spent on."""

    tokens: dict[bytes, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)]) if at >= 0 else 0
            if len(buf) < end + 4 + length:
                return
            auth = head.find(b"\r\nauthorization: bearer ")
            token = bytes(buf[auth + 24 : buf.find(b"\r\n", auth + 2)]).strip() if auth >= 0 else b""
            del buf[: end + 4 + length]
            user = self.tokens.get(token)
            if user is None:
                body = b'{"error":"invalid_token"}'
                status = b'401 Unauthorized\r\nWWW-Authenticate: Bearer error="invalid_token"'
            else:
                body = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"you are ' + user
                body += b' (lean)"}],"isError":false}}'
                status = b"200 OK"
            self.transport.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )


async def serve_lean(seed_file: str) -> None:
    import signal

    LeanUpstream.tokens = {at.encode(): u.encode() for u, at, _ in json.loads(Path(seed_file).read_text())}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(LeanUpstream, bl.HOST, 0)
    port = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"base": f"http://{bl.HOST}:{port}", "pid": os.getpid()}), flush=True)
    await stop.wait()
    server.close()


async def start_lean(run: bl.BenchRun, seed_file: Path) -> pu.Upstream:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-lean", str(seed_file)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, preexec_fn=bl.pdeathsig
    )
    run.stop_on_exit(proc, "lean upstream")
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
    if not line:
        raise RuntimeError("the lean upstream exited before it was ready")
    proc.stdout.close()
    return pu.Upstream(proc, json.loads(line)["base"], 0)


# ---------------------------------------------------------------- the replicas


def master_key_file(tmp: Path) -> Path:
    path = tmp / "master.key"
    path.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    path.chmod(0o600)
    return path


def redis_settings(url: str, key_file: Path) -> Any:
    from broker.config import RedisSettings, SecretRef

    return RedisSettings(url, master_key=SecretRef("file", str(key_file)), prefix=PREFIX)


def make_replicas(
    run: bl.BenchRun, ups: dict[str, pu.Upstream], redis: RedisProc, key_file: Path, env: dict[str, str]
) -> list[pu.Broker]:
    import yaml

    ports = [bl.free_port() for _ in range(REPLICAS)]
    policies = {
        PLAIN: None,
        RATE: {"rate": {"requests": 100_000, "per": "1m"}},
        BUDGET: {"budget": {"amount_cents": 1_000_000_000, "per": "24h"}},
        LEAN: None,
        SHORT: None,
    }
    routes = []
    for name, policy in policies.items():
        up = ups[{LEAN: "lean", SHORT: "short"}.get(name, "sandbox")]
        auth = {"type": "oauth", "per_user": True, "scopes": ["cards"], "user_header": "X-User-ID"}
        route: dict[str, Any] = {"name": name, "prefix": f"/{name}", "upstream": up.mcp_url, "auth": auth}
        if policy is not None:
            route["policy"] = policy
        routes.append(route)
    out = []
    for i, port in enumerate(ports):
        d = run.tmp / f"replica{i}"
        d.mkdir()
        cfg = bl.broker_config(d, port, routes)
        doc = yaml.safe_load(cfg.read_text())
        doc.update(
            public_url=f"http://{bl.HOST}:{ports[0]}",
            state_dir=str(d / "state"),
            clients=[{"name": CLIENT}],
            store={"url": redis.url, "master_key": f"file:{key_file}", "prefix": PREFIX},
        )
        cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(pu.Broker(f"replica{i}", d, port, env, cfg))
    done = bl.capture([bl.broker_cmd(), "clients", "add", CLIENT, "--config", str(out[0].cfg)], env=env)
    if done.returncode != 0 or not done.stdout.strip().startswith("acb_"):
        raise RuntimeError(f"clients add failed ({done.returncode}): {done.stderr}")
    for b in out:  # one client token for all: the store keeps its hash, shared
        b.token = done.stdout.strip()
    return out


async def seed_grants(redis: RedisProc, key_file: Path, seeds: list[list[str]]) -> int:
    """Every seeded user's grant on every route, through the store's own put_grant."""
    from broker.auth.oauth.tokens import TokenSet
    from broker.auth.secret_store import open_store
    from broker.store import Grant
    from broker.store.redis import RedisStore

    store = await RedisStore.open(redis_settings(redis.url, key_file), open_store("file", key_file.parent))
    now = time.time()
    sem = asyncio.Semaphore(32)

    async def put(route: str, user: str, at: str, rt: str) -> None:
        tokens = TokenSet(at, rt, now + LONG_TTL, "cards", subject=user, obtained_at=now).to_json()
        async with sem:
            await store.put_grant(Grant(route, CLIENT, user, tokens, "active", now + LONG_TTL, None))

    try:
        await asyncio.gather(*(put(r, u, at, rt) for u, at, rt in seeds for r in (*ROUTES, LEAN)))
        # every script in Redis's cache, as on a server that has run a while (not a NOSCRIPT and a
        # SCRIPT LOAD on each one's first use)
        from broker.store.redis import SCRIPTS

        with contextlib.closing(redis.client()) as r:
            for lua in SCRIPTS.values():
                r.script_load(lua)
        return len(await store.list_grants())
    finally:
        await store.close()


async def post(s: Any, b: pu.Broker, route: str, user: str, body: bytes) -> tuple[float, dict[str, Any]]:
    """One call through replica `b`: (ms, the JSON-RPC answer). Anything but a result raises."""
    started = time.perf_counter()
    async with s.post(f"{b.url}/{route}", data=body, headers=b.headers(route, user)) as r:
        raw = await r.read()
    ms = (time.perf_counter() - started) * 1000
    if r.status != 200:
        raise RuntimeError(f"{b.name} {route} {user}: {r.status} {raw[:300]!r}")
    doc: dict[str, Any] = json.loads(raw)
    if "result" not in doc or doc["result"].get("isError"):
        raise RuntimeError(f"{b.name} {route} {user}: {raw[:300]!r}")
    return ms, doc


async def whoami(s: Any, b: pu.Broker, route: str, user: str) -> float:
    ms, doc = await post(s, b, route, user, WHOAMI)
    text = doc["result"]["content"][0]["text"]
    if f" {user} " not in text:
        raise RuntimeError(f"{user}'s call through {b.name} came back as {text!r}")
    return ms


async def every_user_everywhere(
    bs: list[pu.Broker], route: str, users: list[str], body: bytes, parallel: int = 16
) -> int:
    """Each user calls through each replica once (whoami: the answer must be theirs)."""
    import aiohttp

    sem = asyncio.Semaphore(parallel)

    async def one(s: Any, b: pu.Broker, u: str) -> None:
        async with sem:
            if body is WHOAMI:
                await whoami(s, b, route, u)
            else:
                await post(s, b, route, u, body)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(one(s, b, u) for b in bs for u in users))
    return len(bs) * len(users)


# ---------------------------------------------------------------- 1. calls per second


WRK_LUA = """\
local users = {users}
local auths = {auths}
local body = {body}
local path = {path}
local headers = {{["Content-Type"] = "application/json",
                 ["Accept"] = "application/json, text/event-stream"}}
local i = {start}
request = function()
  i = i + 1
  local n = (i % #users) + 1
  headers["Authorization"] = auths[n]
  {user_line}
  return wrk.format("POST", path, headers, body)
end
"""


def lua_list(values: list[str]) -> str:
    return "{" + ",".join(json.dumps(v) for v in values) + "}"


def wrk_script(
    tmp: Path, name: str, path: str, users: list[str], auths: list[str], start: int, direct: bool
) -> Path:
    f = tmp / f"wrk-{name}.lua"
    f.write_text(
        WRK_LUA.format(
            users=lua_list(users), auths=lua_list(auths), body=json.dumps(WHOAMI.decode()),
            path=json.dumps(path), start=start,
            user_line="" if direct else 'headers["X-User-ID"] = users[n]',
        )
    )  # fmt: skip
    return f


@dataclass
class Target:
    name: str
    upstream: str  # "sandbox" or "lean"
    ports: list[int]  # one per wrk process
    scripts: list[Path]


def cpu_now(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each process of the run: `pids`, wrk (finished children) and this one."""
    out = {}
    for name, pid in pids.items():
        c = bl.cpu_seconds(pid)
        if c is None:
            raise RuntimeError(f"cannot read the CPU time of {name} (pid {pid})")
        out[name] = c
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["wrk"] = ru.ru_utime + ru.ru_stime
    me = resource.getrusage(resource.RUSAGE_SELF)
    out["bench"] = me.ru_utime + me.ru_stime
    return out


def machine_load(
    ticks0: list[int] | None, ticks1: list[int] | None, cpu: dict[str, float], seconds: float
) -> tuple[float | None, float | None]:
    """(the machine's busy share, the cores other processes kept busy: another job on the VM)
    between two readings of /proc/stat, `cpu` being this run's processes' CPU seconds meanwhile.
    Interrupt time (the loopback's packets, much of it) is busy but in no process's account."""
    if not ticks0 or not ticks1:
        return None, None
    d = [b - a for a, b in zip(ticks0[:8], ticks1[:8], strict=True)]
    total, idle = sum(d), d[3] + d[4]
    if not total:
        return None, None
    in_processes_s = (d[0] + d[1] + d[2]) / os.sysconf("SC_CLK_TCK")  # user, nice, system
    return round(1 - idle / total, 3), round(max(0.0, in_processes_s - sum(cpu.values())) / seconds, 2)


def run_target(t: Target, args: argparse.Namespace, duration: float, pids: dict[str, int]) -> dict[str, Any]:
    conns = max(1, args.connections // len(t.ports))
    ticks0, cpu0 = bl.machine_cpu_ticks(), cpu_now(pids)
    procs = [
        subprocess.Popen(
            [
                "wrk",
                "-t1",
                f"-c{conns}",
                f"-d{duration:g}s",
                "--latency",
                "-s",
                str(script),
                f"http://{bl.HOST}:{port}/",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for port, script in zip(t.ports, t.scripts, strict=True)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=duration + 60)
        if p.returncode != 0:
            raise RuntimeError(f"wrk failed ({p.returncode}) on {t.name}:\n{out}{err}")
        outs.append(out)
    cpu1, ticks1 = cpu_now(pids), bl.machine_cpu_ticks()
    res = [parse_wrk(t.name, f"port {port}", out) for port, out in zip(t.ports, outs, strict=True)]
    requests = sum(r.requests for r in res)
    bad = sum(r.non_2xx for r in res) + sum(sum(r.socket_errors.values()) for r in res)
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    busy, others = machine_load(ticks0, ticks1, cpu, duration)
    return {
        "calls_per_s": round(sum(r.rps for r in res), 1),
        "requests": requests,
        "errors": bad,
        "p50_ms": round(statistics.median(r.p50_ms for r in res), 2),
        "p99_ms": round(max(r.p99_ms for r in res), 2),
        "cpu_s": cpu,
        "machine_busy": busy,
        "other_cores": others,
        "steal": bl.steal_fraction(ticks0, ticks1),
    }


def part_throughput(
    run: bl.BenchRun, bs: list[pu.Broker], ups: dict[str, pu.Upstream], pids: dict[str, int],
    users: list[str], tokens: dict[str, str], args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    step = len(users) // 3  # the three wrk processes start at different users
    client_auth = [f"Bearer {bs[0].token}"] * len(users)
    user_auth = [f"Bearer {tokens[u]}" for u in users]
    directs, targets = [], []
    for kind, route in (("sandbox", PLAIN), ("lean", LEAN)):
        up = ups[kind]
        via = [
            wrk_script(run.tmp, f"{kind}{k}", f"/{route}", users, client_auth, k * step, False)
            for k in range(3)
        ]
        own = [wrk_script(run.tmp, f"{kind}-direct{k}", urlpath(up.mcp_url), users, user_auth, k * step, True)
               for k in range(3)]  # fmt: skip
        up_port = int(up.base.rsplit(":", 1)[1])
        directs.append(Target(f"{kind}: direct", kind, [up_port] * 3, own))
        targets.append(Target(f"{kind}: one replica", kind, [bs[0].port] * 3, via))
        targets.append(Target(f"{kind}: three replicas", kind, [b.port for b in bs], via))
    for t in targets:  # warm-up: connections, caches
        run_target(t, args, 1.0, pids)
    results: dict[str, list[dict[str, Any]]] = {t.name: [] for t in directs + targets}
    for t in directs:  # the upstream's own ceiling, once
        results[t.name].append(run_target(t, args, args.duration, pids))
    for i in range(args.rounds):
        k = i % len(targets)
        for t in targets[k:] + targets[:k]:
            results[t.name].append(run_target(t, args, args.duration, pids))
    out: dict[str, Any] = {"connections": args.connections, "users": len(users), "targets": {}}
    for t in directs + targets:
        out["targets"][t.name] = summarize_target(t, results[t.name])
    for kind in ("sandbox", "lean"):
        one, three = results[f"{kind}: one replica"], results[f"{kind}: three replicas"]
        ratios = [b["calls_per_s"] / a["calls_per_s"] for a, b in zip(one, three, strict=True)]
        out[f"{kind}_ratio_three_over_one"] = round(statistics.median(ratios), 3)
        out[f"{kind}_ratio_rounds"] = [round(r, 3) for r in ratios]
    return out


def summarize_target(t: Target, rs: list[dict[str, Any]]) -> dict[str, Any]:
    requests = sum(r["requests"] for r in rs)
    cpu: Counter[str] = Counter()
    for r in rs:
        cpu.update(r["cpu_s"])
    brokers = sum(v for k, v in cpu.items() if k.startswith("replica"))
    us = {
        "brokers": round(brokers * 1e6 / requests),
        "upstream": round(cpu[f"upstream {t.upstream}"] * 1e6 / requests),
        "redis": round(cpu["redis"] * 1e6 / requests),
        "wrk": round(cpu["wrk"] * 1e6 / requests),
    }
    return {
        "calls_per_s": statistics.median(r["calls_per_s"] for r in rs),
        "rounds_calls_per_s": [r["calls_per_s"] for r in rs],
        "rounds_other_cores": [r["other_cores"] for r in rs],
        "p50_ms": statistics.median(r["p50_ms"] for r in rs),
        "p99_ms": statistics.median(r["p99_ms"] for r in rs),
        "errors": sum(r["errors"] for r in rs),
        "cpu_us_per_call": us,
        "broker_cpu_share": {
            k: round(v / brokers, 3)
            for k, v in sorted(cpu.items())
            if k.startswith("replica") and brokers and v
        },
        "machine_busy": statistics.median(r["machine_busy"] or 0 for r in rs),
        "other_cores": max((r["other_cores"] or 0) for r in rs),
        "steal": max((r["steal"] or 0) for r in rs),
    }


def urlpath(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).path


# ---------------------------------------------------------------- 2. round trips per call


def per_call(counts: Counter[str], n: int) -> dict[str, float]:
    return {k: round(v / n, 3) for k, v in sorted(counts.items()) if v}


async def counted(redis: RedisProc, work: Any, n: int) -> dict[str, Any]:
    """Run `work` (n calls) between two INFO commandstats, MONITOR beside it."""
    r = redis.client()
    r.ping()  # its connection's set-up (HELLO) before MONITOR looks
    mon = Monitor(redis.port)
    before = commandstats(r)
    t0 = time.perf_counter()
    await work()
    seconds = time.perf_counter() - t0
    after = commandstats(r)
    mon.stop()
    r.close()
    stats = after - before
    apart = {k: stats.pop(k, 0) for k in ("ping", "info", "monitor")}
    sent = Counter(mon.sent)
    sent_apart = {k: sent.pop(k, 0) for k in ("ping", "info")}
    return {
        "calls": n,
        "seconds": round(seconds, 2),
        "round_trips_per_call": round(sum(sent.values()) / n, 3),
        "sent_per_call": per_call(sent, n),
        "in_scripts_per_call": per_call(mon.scripted, n),
        "commandstats_per_call": per_call(stats, n),
        "commandstats_apart": apart,
        "pings_sent": sent_apart["ping"],
        "monitor_seconds": round(mon.seconds, 2),
    }


async def part_round_trips(
    bs: list[pu.Broker], redis: RedisProc, users: list[str], cold: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    import aiohttp

    out: dict[str, Any] = {"idle": await counted(redis, lambda: asyncio.sleep(3.0), 1)}
    # the first call of a user on a replica: users no replica has seen yet, each through each replica
    out["first_call"] = await counted(
        redis, lambda: every_user_everywhere(bs, PLAIN, cold, WHOAMI, parallel=1), len(cold) * len(bs)
    )
    sub = users[: min(len(users), 30)]
    for route in (RATE, BUDGET):  # these users' first calls there, and the scripts loaded
        await every_user_everywhere(bs, route, sub, SPEND)
    for route in ROUTES:

        async def work(route: str = route) -> None:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
                for i in range(args.calls):
                    await post(s, bs[i % len(bs)], route, sub[i % len(sub)], SPEND)

        out[route] = await counted(redis, work, args.calls)
    return out


async def connect_on(s: Any, b: pu.Broker, route: str, user: str) -> None:
    """bench/per_user.py's connect_user on any per-user route: the connect link the broker answers
    a user without a grant with, its page, the sandbox's consent picker choosing `user`."""
    import html

    async with s.post(f"{b.url}/{route}", data=WHOAMI, headers=b.headers(route, user)) as r:
        body = await r.json(content_type=None)
        if r.status != 403 or r.headers.get("X-Broker-Error") != "needs_connect":
            raise RuntimeError(f"{user}: expected needs_connect, got {r.status} {str(body)[:200]}")
    link = body["error"]["data"]["elicitations"][0]["url"]
    async with s.get(link, headers=pu.NAV) as r:
        page = await r.text()
    action = re.search(r"<form method='post' action='([^']+)'", page)
    cid = re.search(r"name='connect_id' value='([^']+)'", page)
    if action is None or cid is None:
        raise RuntimeError(f"{user}: no connect form on the page")
    own = {"Origin": b.url, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}
    form = {"connect_id": html.unescape(cid[1])}
    async with s.post(html.unescape(action[1]), data=form, headers=own, allow_redirects=False) as r:
        authorize = r.headers.get("Location", "")
    callback = await pu.consent(s, authorize, user)
    async with s.get(callback, headers=pu.NAV) as r:
        if r.status != 200:
            raise RuntimeError(f"{user}: the callback answered {r.status}")


async def part_refresh(bs: list[pu.Broker], redis: RedisProc, up: pu.Upstream) -> dict[str, Any]:
    """Users connected to an upstream whose access tokens live SHORT_TTL s, every replica holding
    their tokens; then, each time after the tokens expired: (a) each user calls one replica, (b)
    each user calls all three at once. The sandbox counts the refresh_token grants per user."""
    import aiohttp

    users = [f"short{i:02d}" for i in range(REFRESH_USERS)]
    out: dict[str, Any] = {"users": len(users), "ttl_s": SHORT_TTL}
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(connect_on(s, bs[0], SHORT, u) for u in users))
    last = time.monotonic()
    await every_user_everywhere(bs, SHORT, users, WHOAMI)  # every replica holds the pair now

    async def one_replica_each() -> None:
        async with aiohttp.ClientSession() as s:
            await asyncio.gather(*(whoami(s, bs[i % len(bs)], SHORT, u) for i, u in enumerate(users)))

    async def all_replicas_at_once() -> None:
        await every_user_everywhere(bs, SHORT, users, WHOAMI)

    for key, work, n in (("one replica each", one_replica_each, len(users)),
                         ("three replicas at once", all_replicas_at_once, len(users) * len(bs))):  # fmt: skip
        await asyncio.sleep(max(0.0, last + SHORT_TTL + 0.3 - time.monotonic()))
        before = (await up.state())["refreshes"]
        counts = await counted(redis, work, n)
        last = time.monotonic()
        after = (await up.state())["refreshes"]
        refreshes = [after.get(u, 0) - before.get(u, 0) for u in users]
        counts["refresh_grants"] = sum(refreshes)
        counts["refresh_grants_max_per_user"] = max(refreshes)
        counts["round_trips_per_user"] = round(counts["round_trips_per_call"] * n / len(users), 2)
        out[key] = counts
    return out


# ---------------------------------------------------------------- 3. latency and CPU


async def part_latency(
    b: pu.Broker, users: list[str], pids: dict[str, int], args: argparse.Namespace
) -> dict[str, Any]:
    import aiohttp

    assert b.proc is not None
    pid = b.proc.pid
    lat: dict[str, list[float]] = {r: [] for r in ROUTES}
    cpu: dict[str, float] = dict.fromkeys(ROUTES, 0.0)
    n_cpu: dict[str, int] = dict.fromkeys(ROUTES, 0)
    blocks = max(1, args.latency_calls // args.block)
    sub = users[:10]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as s:
        for i in range(30):
            await post(s, b, ROUTES[i % 3], sub[i % len(sub)], SPEND)
        t0, ticks0, cpu0 = time.perf_counter(), bl.machine_cpu_ticks(), cpu_now(pids)
        with bl.client_collector_paused():
            k = 0
            for i in range(blocks):
                order = ROUTES[i % 3 :] + ROUTES[: i % 3]
                for route in order:
                    c0 = bl.cpu_seconds(pid)
                    for _ in range(args.block):
                        k += 1
                        lat[route].append((await post(s, b, route, sub[k % len(sub)], SPEND))[0])
                    c1 = bl.cpu_seconds(pid)
                    if c0 is not None and c1 is not None:
                        cpu[route] += c1 - c0
                        n_cpu[route] += args.block
        cpu1, ticks1 = cpu_now(pids), bl.machine_cpu_ticks()
    ours = {k: cpu1[k] - cpu0[k] for k in cpu0}
    out: dict[str, Any] = {"other_cores": machine_load(ticks0, ticks1, ours, time.perf_counter() - t0)[1]}
    for route in ROUTES:
        out[route] = {
            **bl.summarize_ms(lat[route], digits=3),
            "cpu_us_per_call": round(cpu[route] * 1e6 / n_cpu[route], 1) if n_cpu[route] else None,
        }
    return out


# ---------------------------------------------------------------- 4. Redis memory and capacity


def used_memory(r: Any) -> int:
    return int(r.info("memory")["used_memory"])


async def part_memory(run: bl.BenchRun, key_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Each batch on connections of its own, closed before used_memory is read again: what the
    figures hold is the data, not the clients' buffers."""
    import uuid

    from broker.auth.oauth.tokens import TokenSet
    from broker.auth.secret_store import open_store
    from broker.store import Grant
    from broker.store.redis import SCRIPTS, RedisStore

    red = start_redis(run, "redis-memory")
    r = red.client()
    settings = redis_settings(red.url, key_file)
    secret_store = open_store("file", key_file.parent)

    async def batch(coros: Any, parallel: int = 64) -> tuple[int, float]:
        """(bytes more in used_memory, seconds) for the store calls `coros(store)` makes."""
        await asyncio.sleep(0.2)
        before = used_memory(r)
        store = await RedisStore.open(settings, secret_store)
        sem = asyncio.Semaphore(parallel)

        async def one(c: Any) -> None:
            async with sem:
                await c

        t0 = time.perf_counter()
        try:
            await asyncio.gather(*(one(c) for c in coros(store)))
        finally:
            seconds = time.perf_counter() - t0
            await store.close()
        await asyncio.sleep(0.2)  # the server has dropped the connections
        return used_memory(r) - before, seconds

    def grant(route: str, user: str, at_len: int, rt_len: int) -> Grant:
        now = time.time()
        at = "at_" + secrets.token_urlsafe(at_len)[: at_len - 3]
        rt = "rt_" + secrets.token_urlsafe(rt_len)[: rt_len - 3]
        ts = TokenSet(at, rt, now + 3600, "cards", subject=user, obtained_at=now).to_json()
        return Grant(route, "platform", user, ts, "active", now + 3600, now)

    out: dict[str, Any] = {"user_ids": "uuid4 strings (36 characters)", "client": "platform"}
    users = [str(uuid.uuid4()) for _ in range(max(args.grants, 3 * args.window_users))]
    try:
        await batch(lambda st: [st.ping()])  # the key check written, the scripts' cache warm
        cases = (
            ("sandbox-sized", "small", 35, 35, None),
            ("JWT-sized", "jwt", 1000, 64, None),
            ("JWT-sized, hash-max-listpack-value 4096", "jwt-lp", 1000, 64, "4096"),
        )
        for label, route, at_len, rt_len, listpack in cases:
            r.config_set("hash-max-listpack-value", listpack or "64")
            grown, seconds = await batch(
                lambda st, route=route, a=at_len, b=rt_len: [
                    st.put_grant(grant(route, u, a, b)) for u in users[: args.grants]
                ]
            )
            sample = f"{PREFIX}:grant:" + next(iter(r.sscan_iter(f"{PREFIX}:grants:" + b64(route))))
            out[f"grant {label}"] = {
                "grants": args.grants,
                "bytes_per_grant": round(grown / args.grants),
                "sealed_bytes": r.hstrlen(sample, "sealed"),
                "memory_usage_one_key": r.memory_usage(sample),
                "encoding": r.object("encoding", sample),
                "put_per_s": round(args.grants / seconds),
            }
        r.config_set("hash-max-listpack-value", "64")
        n = args.window_users
        for kind, many in (("rate", args.rate_hits), ("budget", args.budget_spends)):
            # one entry per user, unmeasured (what the first windows cost once: the expires table, the
            # script), one entry per user (a window key's own cost), then windows of `many` entries
            sizes: dict[str, int] = {}
            for k, each in enumerate((0, 1, many)):
                who = users[k * n : (k + 1) * n]
                if kind == "rate":
                    grown, _ = await batch(
                        lambda st, who=who, each=each: [
                            st.hit_rate(f"r\x1fplatform\x1f{u}", 10_000, 60)
                            for u in who
                            for _ in range(each or 1)
                        ]
                    )
                else:
                    grown, _ = await batch(
                        lambda st, who=who, each=each: [
                            st.reserve_budget(f"b\x1fplatform\x1f{u}", 1, 10**9, 86400)
                            for u in who
                            for _ in range(each or 1)
                        ]
                    )
                if each:
                    sizes[str(each)] = round(grown / n)
            out[f"{kind}_window"] = {
                "users": n, "bytes_per_user": sizes, "entries": many,
                "bytes_per_entry": round((sizes[str(many)] - sizes["1"]) / (many - 1), 1),
            }  # fmt: skip
        # the server's time for one budget check as a user's window fills (its script sums it all)
        heavy = "b\x1fplatform\x1fheavy"
        key = f"{PREFIX}:budget:{b64(heavy)}"
        out["reserve_budget_server_us"] = {}
        for size in (1, 1000, 5000):
            fill = size - r.zcard(key)
            await batch(lambda st, k=fill: [st.reserve_budget(heavy, 1, 10**9, 86400) for _ in range(k)])
            before_stats = r.info("commandstats")["cmdstat_evalsha"]
            await batch(
                lambda st: [st.reserve_budget(heavy, 1, 10**9, 86400) for _ in range(100)], parallel=1
            )
            after_stats = r.info("commandstats")["cmdstat_evalsha"]
            us = (after_stats["usec"] - before_stats["usec"]) / (after_stats["calls"] - before_stats["calls"])
            out["reserve_budget_server_us"][size] = round(us, 1)
        out["used_memory_total"] = used_memory(r)
        if not args.no_redis_benchmark:
            shas = {k: r.script_load(SCRIPTS[k]) for k in ("hit_rate", "reserve_budget")}
            sample = f"{PREFIX}:grant:" + next(iter(r.sscan_iter(f"{PREFIX}:grants:" + b64("jwt"))))
            fields = ["sealed", "state", "expires_at", "last_used", "version"]
            # the window, and since 2bddce4 its running total (redis-benchmark draws each
            # __rand_int__ apart: a window and a total of two accounts, each as small as the other)
            budget_keys = [f"{PREFIX}:budget:__rand_int__"]
            if hasattr(RedisStore, "_budget_keys"):
                budget_keys.append(f"{PREFIX}:budget_total:__rand_int__")
            budget_keys.insert(0, str(len(budget_keys)))
            # fmt: off
            commands = {
                "GET": ["GET", "bench:key:__rand_int__"],
                "HMGET grant": ["HMGET", sample, *fields],
                "EVALSHA hit_rate": ["EVALSHA", shas["hit_rate"], "1", f"{PREFIX}:rate:__rand_int__",
                                     "1000000", "60000", "m__rand_int__"],
                "EVALSHA reserve_budget": ["EVALSHA", shas["reserve_budget"], *budget_keys, "1.0", "1e12",
                                           "86400000", "e__rand_int__|1"],
            }
            # fmt: on
            out["redis_benchmark"] = {k: redis_benchmark(red.port, cmd, args) for k, cmd in commands.items()}
    finally:
        r.close()
        bl.stop_process(red.proc, "redis-server memory")
    return out


def b64(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).rstrip(b"=").decode()


def redis_benchmark(port: int, cmd: list[str], args: argparse.Namespace) -> dict[str, Any]:
    # fmt: off
    argv = ["redis-benchmark", "-h", bl.HOST, "-p", str(port), "-c", "50", "-n", str(args.bench_requests),
            "-r", "100000", "--csv", *cmd]
    # fmt: on
    done = bl.capture(argv, timeout=120)
    rows = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or len(rows) < 2:
        raise RuntimeError(f"redis-benchmark failed ({done.returncode}): {done.stdout}{done.stderr}")
    head = [h.strip('"') for h in rows[0].split(",")]
    vals = [v.strip('"') for v in rows[1].split(",")]
    doc = dict(zip(head, vals, strict=False))
    return {
        "per_s": round(float(doc["rps"])),
        "p50_ms": float(doc["p50_latency_ms"]),
        "p99_ms": float(doc["p99_latency_ms"]),
    }


# ---------------------------------------------------------------- the run


def print_report(doc: dict[str, Any]) -> None:
    print(f"\nreplicas on a shared Redis, broker {doc['broker_code']}; {doc['machine']}")
    shows = {"throughput": print_throughput, "round_trips": print_round_trips, "refresh": print_refresh,
             "latency": print_latency, "memory": print_memory}  # fmt: skip
    for key, show in shows.items():
        if doc.get(key):
            show(doc[key])


def print_throughput(tp: dict[str, Any]) -> None:
    print(
        f"\n1. tools/call whoami on a per-user route, {tp['users']} users, {tp['connections']} connections "
        "(3 wrk x 1 thread); medians over the rounds"
    )
    t = bl.Table(
        ("target", "<23"), ("calls/s", ">7"), ("p50 ms", ">6"), ("p99 ms", ">6"), ("errors", ">6"),
        ("CPU µs/call: brokers, upstream, redis, wrk", "<42"), ("busy", ">4"), ("others", ">6"), ruled=True,
    )  # fmt: skip
    t.print_head()
    for name, x in tp["targets"].items():
        c = x["cpu_us_per_call"]
        t.print_row(
            name, f"{x['calls_per_s']:.0f}", f"{x['p50_ms']:.2f}", f"{x['p99_ms']:.2f}", x["errors"],
            f"{c['brokers']}, {c['upstream']}, {c['redis']}, {c['wrk']}", f"{x['machine_busy']:.2f}",
            f"{x['other_cores']:.2f}",
        )  # fmt: skip
    print("(busy: the machine's share of CPU in use; others: cores busy outside this run, at most)")
    for kind in ("sandbox", "lean"):
        share = tp["targets"][f"{kind}: three replicas"]["broker_cpu_share"]
        ratio, rounds = tp[f"{kind}_ratio_three_over_one"], tp[f"{kind}_ratio_rounds"]
        print(f"{kind}: three / one replica x{ratio} (rounds {rounds}); broker CPU by replica: {share}")


def print_round_trips(rt: dict[str, Any]) -> None:
    print("\n2. Redis commands per forwarded call (create_card; fresh access token; PING and INFO apart)")
    t = bl.Table(
        ("calls", "<38"), ("round trips", ">11"), ("sent by the brokers", "<20"),
        ("run inside their scripts", "<52"), ruled=True,
    )  # fmt: skip
    t.print_head()
    rows = (("first_call", "a user's first call on a replica"), (PLAIN, "peruser (no policy)"),
            (RATE, "rate"), (BUDGET, "budget"))  # fmt: skip
    for key, what in rows:
        x = rt[key]
        t.print_row(
            f"{what} ({x['calls']})", f"{x['round_trips_per_call']:.3f}", fmt_counts(x["sent_per_call"]),
            fmt_counts(x["in_scripts_per_call"]),
        )  # fmt: skip
    idle = rt["idle"]
    print(
        f"idle, 3 s: {idle['pings_sent'] / idle['monitor_seconds']:.1f} PING/s (the replicas' health "
        f"checks), anything else: {fmt_counts(idle['sent_per_call'])}"
    )
    print(f"INFO commandstats, budget route, per call: {fmt_counts(rt[BUDGET]['commandstats_per_call'])}")


def print_refresh(rf: dict[str, Any]) -> None:
    print(
        f"\n2b. refreshes: {rf['users']} users, access tokens of {rf['ttl_s']} s, called after they expired"
    )
    t = bl.Table(
        ("calls", "<34"), ("refresh grants", ">14"), ("round trips per user", ">20"),
        ("sent by the brokers, per user", ""), ruled=True,
    )  # fmt: skip
    t.print_head()
    for key in ("one replica each", "three replicas at once"):
        x = rf[key]
        per_user = {k: round(v * x["calls"] / rf["users"], 2) for k, v in x["sent_per_call"].items()}
        t.print_row(
            f"{key} ({x['calls']} calls)", f"{x['refresh_grants']} (max {x['refresh_grants_max_per_user']})",
            f"{x['round_trips_per_user']:.2f}", fmt_counts(per_user),
        )  # fmt: skip


def print_latency(lat: dict[str, Any]) -> None:
    print(
        "\n3. latency and broker CPU per call, the routes taking turns in blocks (replica 0, one "
        f"connection; others {lat['other_cores']} cores)"
    )
    t = bl.Table(("route", "<10"), ("p50 ms", ">7"), ("p99 ms", ">7"), ("CPU µs/call", ">11"), ruled=True)
    t.print_head()
    for route in ROUTES:
        x = lat[route]
        t.print_row(route, f"{x['p50']:.3f}", f"{x['p99']:.3f}", x["cpu_us_per_call"])


def print_memory(mem: dict[str, Any]) -> None:
    print(f"\n4. Redis memory (used_memory before/after, through RedisStore; user ids {mem['user_ids']})")
    for key, g in mem.items():
        if key.startswith("grant "):
            print(
                f"  {key}: {g['bytes_per_grant']} B each over {g['grants']} (sealed {g['sealed_bytes']} B, "
                f"MEMORY USAGE of one {g['memory_usage_one_key']} B, {g['encoding']}); "
                f"put_grant {g['put_per_s']}/s"
            )
    for kind, what in (("rate", "hit"), ("budget", "spend")):
        w = mem[f"{kind}_window"]
        one, many = w["bytes_per_user"]["1"], w["bytes_per_user"][str(w["entries"])]
        print(
            f"  {kind} window: {one} B per user with one {what}, {many} B with {w['entries']} "
            f"({w['bytes_per_entry']} B per {what} more)"
        )
    print(f"  reserve_budget, µs in Redis by entries in the window: {mem['reserve_budget_server_us']}")
    for name, x in mem.get("redis_benchmark", {}).items():
        print(f"  redis-benchmark -c 50 {name}: {x['per_s']}/s, p50 {x['p50_ms']} ms, p99 {x['p99_ms']} ms")


def fmt_counts(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in d.items()) or "-"


async def amain(args: argparse.Namespace) -> int:
    parts = set(args.parts.split(","))
    async with bl.BenchRun("agentcard-bench-replicas-", args.keep, log_lines=0) as run:
        started = time.perf_counter()
        doc: dict[str, Any] = {
            "broker_code": bl.broker_code(),
            "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {redis_version()}",
        }
        took: dict[str, float] = {}
        mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            took[name] = round(time.perf_counter() - mark, 1)
            mark = time.perf_counter()

        key_file = master_key_file(run.tmp)
        if parts & {"1", "2", "2b", "3"}:
            await with_replicas(run, key_file, parts, args, doc, lap)
        if "4" in parts and args.grants:
            print(f"4. memory: {args.grants} grants x 3 ...", file=sys.stderr)
            doc["memory"] = await part_memory(run, key_file, args)
            lap("4")
        doc["seconds"] = round(time.perf_counter() - started, 1)
        doc["seconds_by_part"] = took
        doc["broker_log_warnings"] = pu.LOG_PROBLEMS
        print_report(doc)
        print(f"broker log lines at warning or above: {pu.LOG_PROBLEMS}")
        print(f"ran {doc['seconds']} s; by part: {took}")
        bl.write_json(args.json, doc)
    return run.exit_code


async def with_replicas(
    run: bl.BenchRun, key_file: Path, parts: set[str], args: argparse.Namespace, doc: dict[str, Any], lap: Any
) -> None:
    """Parts 1 to 3: Redis, the upstreams and three replicas, every user checked on every replica."""
    env = bl.broker_env(run.tmp)
    users = [f"user{i:05d}" for i in range(args.users)]
    cold = [f"cold{i:05d}" for i in range(COLD_USERS)]
    seeds = [[u, "at_" + secrets.token_urlsafe(24), "rt_" + secrets.token_urlsafe(24)] for u in users + cold]
    seed_file = run.tmp / "seeds.json"
    seed_file.write_text(json.dumps(seeds))
    seed_file.chmod(0o600)
    redis = start_redis(run, "redis")
    ups = {"sandbox": await pu.start_upstream(run, "sandbox", LONG_TTL, seed_file)}
    ups["lean"] = await start_lean(run, seed_file)
    ups["short"] = await pu.start_upstream(run, "short", SHORT_TTL, None)
    bs = make_replicas(run, ups, redis, key_file, env)
    stored = await seed_grants(redis, key_file, seeds)
    for b in bs:
        pu.start(run, b)
    print(
        f"{len(bs)} replicas, {stored} grants in Redis; 2 users connect through replica 0 ...",
        file=sys.stderr,
    )
    live = ["alice", "bob"]
    await pu.connect_users(bs[0], live)
    checked = await every_user_everywhere(bs, PLAIN, live + users, WHOAMI)
    checked += await every_user_everywhere(bs, LEAN, users, WHOAMI)
    print(f"{checked} calls, every user through every replica: each answered as its user", file=sys.stderr)
    doc["checked_calls"] = checked
    lap("setup")
    pids = {b.name: b.proc.pid for b in bs if b.proc is not None}
    pids |= {f"upstream {k}": up.proc.pid for k, up in ups.items()} | {"redis": redis.proc.pid}
    if "1" in parts:
        print("1. calls per second ...", file=sys.stderr)
        doc["throughput"] = part_throughput(run, bs, ups, pids, users, {u: at for u, at, _ in seeds}, args)
        lap("1")
    if "2" in parts:
        print("2. round trips ...", file=sys.stderr)
        doc["round_trips"] = await part_round_trips(bs, redis, users, cold, args)
        lap("2")
    if "2b" in parts:
        print("2b. refreshes ...", file=sys.stderr)
        doc["refresh"] = await part_refresh(bs, redis, ups["short"])
        lap("2b")
    if "3" in parts:
        print("3. latency ...", file=sys.stderr)
        doc["latency"] = await part_latency(bs[0], users, pids, args)
        lap("3")
    for b in bs:
        pu.stop(b)
    for name, up in ups.items():
        bl.stop_process(up.proc, f"upstream {name}")


def redis_version() -> str:
    done = bl.capture(["redis-server", "--version"])
    m = re.search(r"v=(\S+)", done.stdout)
    return f"redis {m.group(1) if m else '?'}"


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument(
        "--users", type=int, default=300, help="users with grants written into Redis (default 300)"
    )
    p.add_argument("--connections", type=int, default=24, help="total wrk connections (default 24)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run (default 3)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per target, interleaved (default 3)")
    p.add_argument("--calls", type=int, default=300, help="calls per route counted in part 2 (default 300)")
    p.add_argument("--latency-calls", type=int, default=600, help="calls per route in part 3 (default 600)")
    p.add_argument("--block", type=int, default=50, help="calls per block in part 3 (default 50)")
    p.add_argument(
        "--grants", type=int, default=10_000, help="grants per size in part 4; 0 skips it (default 10000)"
    )
    p.add_argument("--window-users", type=int, default=1000, help="users with rate/budget windows in part 4")
    p.add_argument("--rate-hits", type=int, default=30, help="hits per user's rate window (default 30)")
    p.add_argument(
        "--budget-spends", type=int, default=10, help="spends per user's budget window (default 10)"
    )
    p.add_argument("--bench-requests", type=int, default=50_000, help="redis-benchmark requests per command")
    p.add_argument("--parts", default="1,2,2b,3,4", help="the parts to run (default 1,2,2b,3,4)")
    p.add_argument("--serve-lean", metavar="SEED_FILE", help=argparse.SUPPRESS)
    p.add_argument("--no-redis-benchmark", action="store_true", help="skip redis-benchmark in part 4")
    bl.add_output_args(p, "configs, logs")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.serve_lean:  # on uvloop when installed, as the broker runs
        uvloop: Any = None
        with contextlib.suppress(ImportError):
            import uvloop
        (uvloop.run if uvloop is not None else asyncio.run)(serve_lean(args.serve_lean))
        return 0
    return bl.run_async(amain(args))


if __name__ == "__main__":
    sys.exit(main())
