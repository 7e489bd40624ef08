"""Per-user routes (issue 16): their per-call overhead, 10 000 stored users, one refresh per expiry.

    python bench/per_user.py [--calls 1000] [--seeded 10000] [--refresh-users 50] [--json out.json]

Run from the repository root. Everything runs on 127.0.0.1, in one temporary directory removed on
exit. The upstream is the sandbox (broker.tools.sandbox: the MCP SDK's server with its card tools
behind the sandbox's OAuth 2.1 server and consent page with its user picker) in a process of its
own (this script with `--serve-upstream`), its MCP endpoint stateless with JSON answers so that one
`tools/call` is one POST. It counts code and refresh_token grants per sandbox user and tells them on
a second port. Each part starts its own broker (`agentcard-broker run`, keyring file backend in a
temporary HOME, warning-level log, audit line off); the platform client's token comes from the real
`agentcard-broker clients add`, the single-user route logs in with the real `login --no-browser`,
and each end user connects through the broker's connect link, the sandbox's consent page picking
that user (so each token is that user's).

1. Overhead: one broker, two routes to the same upstream: `single` (an ordinary oauth route,
   logged in) and `peruser` (per-user, one connected user). `--calls` sequential `tools/call
   whoami` per route on keep-alive connections, alternating call by call (the order swapping each
   pair): p50/p99 ms. Then the broker's CPU per call (user + system from /proc/PID/stat, as
   bench/ab.py reads it) over blocks of `--block` calls per route, the routes taking turns block by
   block.
2. 10 000 stored users: `--seeded` grants written straight into the broker's SQLite store before
   it starts (this script with `--seed-store`, run with the broker's own environment, so it opens
   the same master key through the same keyring file; the store's own sealing code, one
   transaction). Their tokens are registered at the upstream too, so a seeded user's call is
   accepted. Reported: the broker's RSS idle (against part 1's broker with one user), the p50 of
   calls by 3 connected users, the first call of 20 seeded users (their grant read from the store)
   and repeated calls by 3 seeded users.
3. Refresh under concurrency: an upstream whose access tokens live `--ttl` seconds, `--refresh-users`
   users connected, a wait past the expiry of the last one's token, then 20 concurrent calls per
   user, all at once. Reported: refresh_token grants the token endpoint saw per user (total, max,
   users with exactly one) and the calls that failed.

Prints a table and exits 0 when it ran; no target is judged. Compare figures within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

# bench/mcp.py would shadow the MCP SDK: drop this directory from the path now benchlib is in
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CLIENT = "bench"
SINGLE, PER_USER = "single", "peruser"
LONG_TTL = 3600
READY_S = 30.0
CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
JSON_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
NAV = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}


# ---------------------------------------------------------------- the upstream (--serve-upstream)


async def serve_upstream(access_ttl: int, seed_file: str | None) -> None:
    """The sandbox with a counting OAuth server, stateless JSON MCP, and a state port."""
    from mcp.server.auth.provider import AccessToken, RefreshToken
    from starlette.responses import JSONResponse
    from starlette.types import Receive, Scope, Send

    from broker.tools.sandbox import (
        CONSENT_PATH,
        CardStore,
        RestApi,
        SandboxApp,
        SandboxAuthServer,
        auth_settings,
        card_server,
        loopback_socket,
        serve_asgi,
    )

    @dataclass
    class CountingAuth(SandboxAuthServer):
        codes_by_user: Counter[str] = field(default_factory=Counter)
        refreshes_by_user: Counter[str] = field(default_factory=Counter)
        refresh_refused: int = 0

        async def exchange_authorization_code(self, client: Any, authorization_code: Any) -> Any:
            token = await super().exchange_authorization_code(client, authorization_code)
            self.codes_by_user[self.access_tokens[token.access_token].subject or ""] += 1
            return token

        async def exchange_refresh_token(self, client: Any, refresh_token: Any, scopes: list[str]) -> Any:
            try:
                token = await super().exchange_refresh_token(client, refresh_token, scopes)
            except Exception:
                self.refresh_refused += 1
                raise
            self.refreshes_by_user[refresh_token.subject or ""] += 1
            return token

    sock = loopback_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    auth = CountingAuth(access_ttl=access_ttl, expected_resource=f"{base}/mcp", consent_path=CONSENT_PATH)
    if seed_file:  # seeded users' tokens, valid for an hour
        expires = int(time.time()) + LONG_TTL
        for user, at, rt in json.loads(Path(seed_file).read_text()):
            auth.access_tokens[at] = AccessToken(
                token=at, client_id="seeded", scopes=["cards"], expires_at=expires,
                resource=f"{base}/mcp", subject=user,
            )  # fmt: skip
            auth.refresh_tokens[rt] = RefreshToken(
                token=rt, client_id="seeded", scopes=["cards"], resource=f"{base}/mcp", subject=user
            )
            auth.pairs[at], auth.pairs[rt] = rt, at
    store = CardStore()
    server = card_server(store, auth=auth_settings(base), auth_server_provider=auth)
    mcp_app = server.streamable_http_app(stateless_http=True, json_response=True)
    app = SandboxApp(RestApi(store, None, auth), mcp_app, auth)

    async def state_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        doc = {
            "codes": dict(auth.codes_by_user),
            "refreshes": dict(auth.refreshes_by_user),
            "refresh_refused": auth.refresh_refused,
        }
        await JSONResponse(doc)(scope, receive, send)

    state_sock = loopback_socket()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve_asgi(app, sock), serve_asgi(state_app, state_sock):
        ready = {"base": base, "state_port": state_sock.getsockname()[1], "pid": os.getpid()}
        print(json.dumps(ready), flush=True)
        await stop.wait()


@dataclass
class Upstream:
    proc: subprocess.Popen[bytes]
    base: str
    state_port: int

    @property
    def mcp_url(self) -> str:
        return f"{self.base}/mcp"

    async def state(self) -> dict[str, Any]:
        status, body = await asyncio.to_thread(bl.get, self.state_port, "/")
        if status != 200:
            raise RuntimeError(f"the upstream's state port answered {status}")
        doc: dict[str, Any] = json.loads(body)
        return doc


async def start_upstream(run: bl.BenchRun, name: str, ttl: int, seed_file: Path | None) -> Upstream:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-upstream", "--ttl", str(ttl)]
    if seed_file is not None:
        cmd += ["--seed-file", str(seed_file)]
    log = run.tmp / f"upstream-{name}.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            preexec_fn=bl.pdeathsig,
        )  # fmt: skip
    run.stop_on_exit(proc, f"upstream {name}")
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), READY_S)
    except TimeoutError:
        raise RuntimeError(f"upstream {name} was not ready in {READY_S}s:\n{bl.tail(log)}") from None
    if not line:
        raise RuntimeError(f"upstream {name} exited before it was ready:\n{bl.tail(log)}")
    proc.stdout.close()
    doc = json.loads(line)
    return Upstream(proc, doc["base"], doc["state_port"])


# ---------------------------------------------------------------- seeding the store (--seed-store)


async def seed_store(config_path: str, seed_file: str) -> None:
    """Run with the broker's environment: its master key, through the same keyring file."""
    from broker.auth.oauth.tokens import TokenSet
    from broker.auth.secret_store import open_store
    from broker.config import load
    from broker.store import Grant
    from broker.store.sqlite import SqliteStore, default_path

    cfg = load(Path(config_path))
    store = await SqliteStore.open(
        default_path(cfg.state_path()), open_store(cfg.secret_store, cfg.state_path())
    )
    now = time.time()
    grants = [
        Grant(PER_USER, CLIENT, user, TokenSet(at, rt, now + LONG_TTL, "cards", subject=user).to_json(),
              "active", now + LONG_TTL, None)
        for user, at, rt in json.loads(Path(seed_file).read_text())
    ]  # fmt: skip

    def put_all() -> None:  # the store's own sealing and INSERT, one transaction, not 10 000 fsyncs
        with store._transaction():
            for g in grants:
                store._put_grant(g)

    try:
        await store._run(put_all)
        print(len(await store.list_grants(PER_USER)))
    finally:
        await store.close()


# ---------------------------------------------------------------- the broker


@dataclass
class Broker:
    name: str
    dir: Path
    port: int
    env: dict[str, str]
    cfg: Path
    token: str = ""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{bl.HOST}:{self.port}"

    def headers(self, route: str, user: str) -> dict[str, str]:
        if route == SINGLE:
            return JSON_HEADERS
        return {**JSON_HEADERS, "Authorization": f"Bearer {self.token}", "X-User-ID": user}


def make_broker(run: bl.BenchRun, name: str, up: Upstream, single: bool) -> Broker:
    d = run.tmp / name
    d.mkdir()
    port = bl.free_port()
    env = bl.broker_env(d)
    routes: list[dict[str, Any]] = [
        {"name": PER_USER, "prefix": "/peruser", "upstream": up.mcp_url,
         "auth": {"type": "oauth", "per_user": True, "scopes": ["cards"], "user_header": "X-User-ID"}},
    ]  # fmt: skip
    if single:
        auth = {"type": "oauth", "scopes": ["cards"], "redirect_port": bl.free_port()}
        routes.insert(0, {"name": SINGLE, "prefix": "/single", "upstream": up.mcp_url, "auth": auth})
    cfg = bl.broker_config(d, port, routes)
    import yaml

    doc = yaml.safe_load(cfg.read_text())
    doc.update(public_url=f"http://{bl.HOST}:{port}", state_dir=str(d / "state"), clients=[{"name": CLIENT}])
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    b = Broker(name, d, port, env, cfg)
    done = bl.capture([bl.broker_cmd(), "clients", "add", CLIENT, "--config", str(cfg)], env=env)
    if done.returncode != 0 or not done.stdout.strip().startswith("acb_"):
        raise RuntimeError(f"clients add failed ({done.returncode}): {done.stderr}")
    b.token = done.stdout.strip()
    return b


def start(run: bl.BenchRun, b: Broker) -> None:
    b.proc = run.stop_on_exit(bl.start_broker(b.cfg, b.env, b.port, b.dir / "broker.log"), f"broker {b.name}")


LOG_PROBLEMS: dict[str, int] = {}


def stop(b: Broker) -> None:
    bl.stop_process(b.proc, f"broker {b.name}")
    LOG_PROBLEMS[b.name] = len(bl.broker_log_problems(b.dir / "broker.log"))


async def consent(s: Any, authorize: str, user: str | None) -> str:
    """AgentCard's part of a sign-in: authorize, then its consent page (picking `user`, or as the
    default user by its Continue link). The URL it sends the browser back to."""
    async with s.get(authorize, allow_redirects=False) as r:
        if r.status != 302:
            raise RuntimeError(f"authorize answered {r.status}: {(await r.text())[:200]}")
        location = r.headers["Location"]
    nxt = parse_qs(urlsplit(location).query)["next"][0]
    if user is None:
        return nxt
    page = f"{authorize.split('/authorize')[0]}{urlsplit(location).path}"
    async with s.post(page, data={"next": nxt, "user": user}, allow_redirects=False) as r:
        if r.status != 303:
            raise RuntimeError(f"the consent picker answered {r.status}: {(await r.text())[:200]}")
        return str(r.headers["Location"])


async def login_single(b: Broker) -> None:
    """`agentcard-broker login single --no-browser`, this script as the browser."""
    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        bl.broker_cmd(), "login", SINGLE, "--config", str(b.cfg), "--no-browser", "--timeout", "30",
        env=b.env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        url = None
        while line := await asyncio.wait_for(proc.stdout.readline(), 30):
            text = line.decode()
            if "/authorize?" in text:
                url = text[text.index("http") :].split()[0]
                break
        if url is None:
            raise RuntimeError("login printed no authorization URL")
        async with aiohttp.ClientSession() as s:
            callback = await consent(s, url, None)
            async with s.get(callback) as r:
                if r.status != 200:
                    raise RuntimeError(f"login callback answered {r.status}")
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        if proc.returncode != 0:
            raise RuntimeError(f"login exited {proc.returncode}: {err.decode()[-500:]}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def connect_user(s: Any, b: Broker, user: str) -> None:
    """A user with no grant: the connect link the broker answers with, then the browser's part."""
    import re

    async with s.post(f"{b.url}/peruser", json=CALL, headers=b.headers(PER_USER, user)) as r:
        body = await r.json(content_type=None)
        if r.status != 403 or r.headers.get("X-Broker-Error") != "needs_connect":
            raise RuntimeError(f"{user}: expected needs_connect, got {r.status} {str(body)[:200]}")
    link = body["error"]["data"]["elicitations"][0]["url"]
    async with s.get(link, headers=NAV) as r:
        page = await r.text()
    action = re.search(r"<form method='post' action='([^']+)'", page)
    cid = re.search(r"name='connect_id' value='([^']+)'", page)
    if action is None or cid is None:
        raise RuntimeError(f"{user}: no connect form on the page")
    import html

    own = {"Origin": b.url, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}
    form = {"connect_id": html.unescape(cid[1])}
    async with s.post(html.unescape(action[1]), data=form, headers=own, allow_redirects=False) as r:
        authorize = r.headers.get("Location", "")
    callback = await consent(s, authorize, user)
    async with s.get(callback, headers=NAV) as r:
        if r.status != 200:
            raise RuntimeError(f"{user}: the callback answered {r.status}: {(await r.text())[:200]}")


async def connect_users(b: Broker, users: list[str], parallel: int = 8) -> None:
    import aiohttp

    sem = asyncio.Semaphore(parallel)

    async def one(s: Any, user: str) -> None:
        async with sem:
            await connect_user(s, b, user)

    # a session (cookie jar) per browser
    sessions = [aiohttp.ClientSession() for _ in range(parallel)]
    try:
        await asyncio.gather(*(one(sessions[i % parallel], u) for i, u in enumerate(users)))
    finally:
        for s in sessions:
            await s.close()


async def call(s: Any, b: Broker, route: str, user: str) -> float:
    """One tools/call whoami; ms. The answer must be the user's own (the default user on `single`)."""
    started = time.perf_counter()
    async with s.post(f"{b.url}/{route}", data=CALL_BYTES, headers=b.headers(route, user)) as r:
        body = await r.read()
    ms = (time.perf_counter() - started) * 1000
    if r.status != 200:
        raise RuntimeError(f"{route} {user}: {r.status} {body[:200]!r}")
    text = json.loads(body)["result"]["content"][0]["text"]
    if route == PER_USER and f" {user} " not in text:
        raise RuntimeError(f"{user}'s call came back as {text!r}")
    return ms


CALL_BYTES = json.dumps(CALL).encode()


def summary(ms: list[float]) -> dict[str, float]:
    return bl.summarize_ms(ms, digits=3)


def rss(b: Broker) -> float:
    assert b.proc is not None
    return bl.mib(bl.rss_kib(b.proc.pid)["VmRSS"])


# ---------------------------------------------------------------- the three parts


async def part_overhead(run: bl.BenchRun, up: Upstream, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    b = make_broker(run, "overhead", up, single=True)
    await login_single(b)
    start(run, b)
    await connect_users(b, ["alice"])
    assert b.proc is not None
    pid = b.proc.pid
    routes = (SINGLE, PER_USER)
    lat: dict[str, list[float]] = {r: [] for r in routes}
    cpu: dict[str, float] = dict.fromkeys(routes, 0.0)
    n_cpu: dict[str, int] = dict.fromkeys(routes, 0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as s:
        for i in range(20):  # warm-up
            await call(s, b, routes[i % 2], "alice")
        rss_idle = rss(b)
        with bl.client_collector_paused():
            for i in range(args.calls):
                for r in routes if i % 2 == 0 else routes[::-1]:
                    lat[r].append(await call(s, b, r, "alice"))
            for i in range(args.rounds):
                for r in routes if i % 2 == 0 else routes[::-1]:
                    c0 = bl.cpu_seconds(pid)
                    for _ in range(args.block):
                        await call(s, b, r, "alice")
                    c1 = bl.cpu_seconds(pid)
                    if c0 is not None and c1 is not None:
                        cpu[r] += c1 - c0
                        n_cpu[r] += args.block
    out: dict[str, Any] = {"rss_idle_mib_one_user": rss_idle}
    for r in routes:
        out[r] = {
            **summary(lat[r]),
            "cpu_us_per_call": round(cpu[r] * 1e6 / n_cpu[r], 1) if n_cpu[r] else None,
        }
    stop(b)
    return out


async def part_seeded(
    run: bl.BenchRun, up: Upstream, seeds: list[list[str]], seed_file: Path, args: argparse.Namespace
) -> dict[str, Any]:
    import aiohttp

    b = make_broker(run, "seeded", up, single=False)
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--seed-store", str(b.cfg)]
    done = bl.capture([*cmd, "--seed-file", str(seed_file)], env=b.env, cwd=REPO, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"seeding the store failed: {done.stderr[-1000:]}")
    seed_s = time.perf_counter() - t0
    stored = int(done.stdout.strip().splitlines()[-1])
    t0 = time.perf_counter()
    start(run, b)
    start_s = time.perf_counter() - t0
    await asyncio.sleep(1.0)
    rss_idle = rss(b)
    live = ["carol", "dave", "erin"]
    await connect_users(b, live)
    out: dict[str, Any] = {
        "stored_grants": stored, "seed_s": round(seed_s, 2), "broker_start_s": round(start_s, 2),
        "rss_idle_mib": rss_idle,
    }  # fmt: skip
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as s:
        for u in live:
            await call(s, b, PER_USER, u)
        with bl.client_collector_paused():
            lat = [await call(s, b, PER_USER, live[i % 3]) for i in range(args.calls)]
            # seeded users spread over the file: each one's first call reads its grant from the store
            firsts = [await call(s, b, PER_USER, seeds[i * (len(seeds) // 20)][0]) for i in range(20)]
            again = [seeds[i * (len(seeds) // 20)][0] for i in range(3)]
            repeat = [await call(s, b, PER_USER, again[i % 3]) for i in range(args.calls)]
    out["connected_users"] = summary(lat)
    out["seeded_first_call"] = summary(firsts)
    out["seeded_repeat"] = summary(repeat)
    out["rss_after_mib"] = rss(b)
    stop(b)
    return out


async def part_refresh(run: bl.BenchRun, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    up = await start_upstream(run, "short-ttl", args.ttl, None)
    b = make_broker(run, "refresh", up, single=False)
    start(run, b)
    users = [f"user{i:02d}" for i in range(args.refresh_users)]
    t0 = time.perf_counter()
    await connect_users(b, users)
    connected_at = time.time()
    connect_s = time.perf_counter() - t0
    before = await up.state()
    if sum(before["codes"].get(u, 0) for u in users) != len(users):
        raise RuntimeError(f"expected one code grant per user, the upstream saw {before['codes']}")
    await asyncio.sleep(max(0.0, connected_at + args.ttl + 1.0 - time.time()))  # every token expired
    failed: list[str] = []
    lat: list[float] = []

    async def one(s: Any, user: str) -> None:
        try:
            lat.append(await call(s, b, PER_USER, user))
        except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
            failed.append(f"{type(exc).__name__}: {str(exc)[:120]}")

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(s, u) for _ in range(args.per_user) for u in users))
        burst_s = time.perf_counter() - t0
    after = await up.state()
    refreshes = {u: after["refreshes"].get(u, 0) - before["refreshes"].get(u, 0) for u in users}
    stop(b)
    return {
        "users": len(users),
        "ttl_s": args.ttl,
        "connect_s": round(connect_s, 1),
        "calls": len(users) * args.per_user,
        "failed": len(failed),
        "failures": failed[:5],
        "burst_s": round(burst_s, 2),
        "latency": summary(lat),
        "refreshes_total": sum(refreshes.values()),
        "refreshes_max_per_user": max(refreshes.values()),
        "users_with_exactly_one": sum(1 for n in refreshes.values() if n == 1),
        "refresh_refused": after["refresh_refused"] - before["refresh_refused"],
    }


def print_report(doc: dict[str, Any]) -> None:
    o, sd, rf = doc["overhead"], doc["seeded"], doc["refresh"]
    print(f"\nper-user routes, broker {doc['broker_code']}")
    t = bl.Table(("figure", "<58"), ("value", ">28"), ruled=True)
    t.print_head()
    for r in (SINGLE, PER_USER):
        x = o[r]
        t.print_row(f"1. {r}: tools/call p50 / p99 ({x['n']} calls)", f"{x['p50']:.3f} / {x['p99']:.3f} ms")
        t.print_row(f"1. {r}: broker CPU per call", f"{x['cpu_us_per_call']} µs")
    d_ms = o[PER_USER]["p50"] - o[SINGLE]["p50"]
    d_us = (o[PER_USER]["cpu_us_per_call"] or 0) - (o[SINGLE]["cpu_us_per_call"] or 0)
    t.print_row("1. per-user - single: p50 / CPU", f"{d_ms:+.3f} ms / {d_us:+.1f} µs")
    t.print_row("1. broker RSS idle, 1 user", f"{o['rss_idle_mib_one_user']} MiB")
    t.print_row(f"2. grants stored (seeded in {sd['seed_s']} s)", f"{sd['stored_grants']}")
    t.print_row("2. broker start to healthy, RSS idle", f"{sd['broker_start_s']} s, {sd['rss_idle_mib']} MiB")
    t.print_row("2. RSS after the calls below", f"{sd['rss_after_mib']} MiB")
    for key, what in (("connected_users", "3 connected users"), ("seeded_first_call", "20 seeded users, "
                      "first call"), ("seeded_repeat", "3 seeded users, repeated")):  # fmt: skip
        x = sd[key]
        t.print_row(f"2. {what}: p50 / p99 ({x['n']} calls)", f"{x['p50']:.3f} / {x['p99']:.3f} ms")
    t.print_row(f"3. {rf['users']} users x {rf['calls'] // rf['users']} concurrent calls after expiry",
                f"{rf['calls']} calls, {rf['failed']} failed")  # fmt: skip
    t.print_row("3. refresh_token grants: total / max per user", f"{rf['refreshes_total']} / "
                f"{rf['refreshes_max_per_user']}")  # fmt: skip
    t.print_row(
        "3. users refreshed exactly once; refused", f"{rf['users_with_exactly_one']}; {rf['refresh_refused']}"
    )
    lat = rf["latency"]
    t.print_row(
        "3. burst wall time; call p50 / p99",
        f"{rf['burst_s']} s; {lat.get('p50', 0):.1f} / {lat.get('p99', 0):.1f} ms",
    )
    for f in rf["failures"]:
        print(f"  failure: {f}")


async def amain(args: argparse.Namespace) -> int:
    async with bl.BenchRun("agentcard-bench-per-user-", args.keep, log_lines=0) as run:
        started = time.perf_counter()
        seeds = [[f"seed{i:05d}", "at_" + secrets.token_urlsafe(24), "rt_" + secrets.token_urlsafe(24)]
                 for i in range(args.seeded)]  # fmt: skip
        seed_file = run.tmp / "seeds.json"
        seed_file.write_text(json.dumps(seeds))
        seed_file.chmod(0o600)
        up = await start_upstream(run, "long-ttl", LONG_TTL, seed_file)
        print("1. overhead: single vs per-user route ...", file=sys.stderr)
        overhead = await part_overhead(run, up, args)
        print(f"2. {args.seeded} stored users ...", file=sys.stderr)
        seeded = await part_seeded(run, up, seeds, seed_file, args)
        bl.stop_process(up.proc, "upstream long-ttl")
        print(
            f"3. refresh: {args.refresh_users} users x {args.per_user} concurrent calls ...", file=sys.stderr
        )
        refresh = await part_refresh(run, args)
        doc = {
            "broker_code": bl.broker_code(),
            "overhead": overhead,
            "seeded": seeded,
            "refresh": refresh,
            "seconds": round(time.perf_counter() - started, 1),
            "broker_log_warnings": LOG_PROBLEMS,
        }
        print_report(doc)
        print(f"broker log lines at warning or above: {LOG_PROBLEMS}; ran {doc['seconds']} s")
        bl.write_json(args.json, doc)
    return run.exit_code


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--calls", type=int, default=1000, help="calls per route for latency (default 1000)")
    p.add_argument("--block", type=int, default=100, help="calls per CPU block (default 100)")
    p.add_argument("--rounds", type=int, default=20, help="CPU blocks per route (default 20)")
    p.add_argument("--seeded", type=int, default=10_000, help="grants seeded into the store (default 10000)")
    p.add_argument("--refresh-users", type=int, default=50, help="users in the refresh part (default 50)")
    p.add_argument("--per-user", type=int, default=20, help="concurrent calls per user (default 20)")
    p.add_argument(
        "--ttl", type=int, default=15, help="access token lifetime in the refresh part (default 15 s)"
    )
    p.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--seed-store", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--seed-file", help=argparse.SUPPRESS)
    bl.add_output_args(p, "configs, logs, the stores")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    if args.serve_upstream:  # on uvloop when installed, as the broker runs
        uvloop: Any = None
        with contextlib.suppress(ImportError):
            import uvloop
        (uvloop.run if uvloop is not None else asyncio.run)(serve_upstream(args.ttl, args.seed_file))
        return 0
    if args.seed_store:
        asyncio.run(seed_store(args.seed_store, args.seed_file))
        return 0
    return bl.run_async(amain(args))


if __name__ == "__main__":
    sys.exit(main())
