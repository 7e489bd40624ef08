"""MCP forwarding benchmark: mcp.Client straight to an OAuth-protected MCP upstream, and through the broker.

    python bench/mcp.py [--calls 200] [--block 50] [--json out.json]

Run from the repository root. What it starts, all on 127.0.0.1 and all inside one temporary
directory removed on exit:

* the MCP upstream of the tests (tests/mcp_upstream.py): the real MCP SDK server with the SDK's own
  OAuth 2.1 authorization server, in this process under uvicorn, access tokens living an hour so
  no refresh happens while measuring;
* `agentcard-broker login mcp --no-browser` (the real CLI), with this script as the browser;
* the broker daemon (`agentcard-broker run`): one oauth route /mcp -> the upstream, keyring file
  backend in a temporary HOME, logging at warning level with the audit line off.

For "direct" the script registers its own OAuth client at the upstream (dynamic registration,
authorize with PKCE S256, code exchange) and gives `mcp.Client` a transport whose httpx2 client adds
that bearer token. For "broker" `mcp.Client` talks to the broker with no token at all.

For each of mode="legacy" and mode="auto" one session is opened to each target, warmed up (list_tools
and 10 calls), then N sequential `call_tool("create_card", ...)` round trips are timed one by one,
in blocks that alternate direct and broker (and alternate which goes first), so machine noise hits
both alike.

Note the client and the upstream share this process and its event loop in both cases; the broker
is a separate process. On a small machine all three share the CPUs: compare the numbers with each
other, not with other machines. Every value is fake; nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Generator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# This file is named mcp.py: drop its own directory from the import path, or `import mcp` finds it
# instead of the MCP SDK. Then add the repository root, for `tests.mcp_upstream`.
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import httpx2  # noqa: E402
import yaml  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

from tests.mcp_upstream import McpUpstream, run_mcp_upstream  # noqa: E402

HOST = "127.0.0.1"
MODES = ("legacy", "auto")
WARMUP_CALLS = 10
ACCESS_TTL = 3600
DIRECT_REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the 302 is read, not followed


# ---------------------------------------------------------------- small helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _pdeathsig() -> None:  # runs in the child before exec: die with us even on SIGKILL of this script
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def proc_usage(pid: int) -> dict[str, Any]:
    """VmRSS, VmHWM (KiB), open fds and threads of a process, from /proc (empty off Linux)."""
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(rest.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def set_listener_nodelay(port: int) -> int:
    """Set TCP_NODELAY on this process's listening socket on 127.0.0.1:port; returns how many were set.

    tests/mcp_upstream.py binds `socket.socket(AF_INET, SOCK_STREAM)` (proto 0) and hands it to
    uvicorn; asyncio only turns Nagle off for sockets whose proto is IPPROTO_TCP, so the upstream's
    connections keep Nagle on, and its response headers and body (two writes) meet the peer's delayed
    ACK: a ~40 ms stall on some round trips, direct or through the broker alike, which would swamp
    what is measured here. Linux copies TCP_NODELAY from the listener to each accepted connection.
    """
    done = 0
    with contextlib.suppress(OSError):
        fds = os.listdir("/proc/self/fd")
        for fd in fds:
            try:
                s = socket.socket(fileno=os.dup(int(fd)))
            except (OSError, ValueError):
                continue
            with s:
                if (
                    s.family == socket.AF_INET
                    and s.type == socket.SOCK_STREAM
                    and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                    and s.getsockname() == (HOST, port)
                ):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    done += 1
    return done


TCP_STATES = {"01": "established", "06": "time_wait", "08": "close_wait", "0A": "listen"}


def tcp_sockets(pid: int, broker_port: int, upstream_port: int) -> dict[str, int]:
    """The TCP sockets a process holds, by role and state, from /proc (empty off Linux)."""
    out: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for row in Path(table).read_text().splitlines()[1:]:
                    cols = row.split()
                    if cols[9] not in inodes:
                        continue
                    local, remote = int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16)
                    state = TCP_STATES.get(cols[3], cols[3])
                    if state == "listen":
                        role = "listening"
                    elif local == broker_port:
                        role = "from agents"
                    elif remote == upstream_port:
                        role = "to upstream"
                    else:
                        role = f"other (:{local} -> :{remote})"
                    out[f"{role} {state}"] += 1
    return dict(sorted(out.items()))


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


def stats(samples_ms: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {
        "n": len(samples_ms),
        "p50": round(q[49], 3),
        "p90": round(q[89], 3),
        "p99": round(q[98], 3),
        "mean": round(statistics.fmean(samples_ms), 3),
        "min": round(min(samples_ms), 3),
        "max": round(max(samples_ms), 3),
    }


# ---------------------------------------------------------------- the broker side


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


def broker_config(tmp: Path, port: int, up: McpUpstream) -> Path:
    doc = {
        "listen": [f"{HOST}:{port}"],
        "allow_insecure_upstream": True,
        "secret_store": "keyring",
        "timeouts": {"connect": 10, "first_byte": 60, "idle": 300, "drain": 2},
        "log": {"level": "warning", "format": "json", "audit": False},
        "routes": [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": up.mcp_url,
                "auth": {"type": "oauth", "scopes": ["cards"], "redirect_port": free_port()},
            }
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


async def login(cfg: Path, env: dict[str, str], timeout: float = 30) -> str:
    """`agentcard-broker login mcp --no-browser`, and the browser's part: GET the URL, then the callback.

    Asynchronous on purpose: the upstream's authorization server lives on this event loop.
    """
    proc = await asyncio.create_subprocess_exec(
        broker_cmd(), "login", "mcp", "--config", str(cfg), "--no-browser", "--timeout", str(timeout),
        env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        url = None
        while line := await asyncio.wait_for(proc.stdout.readline(), timeout):
            text = line.decode().strip()
            lines.append(text)
            if "/authorize?" in text:
                url = text[text.index("http") :].split()[0]
                break
        if url is None:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
            raise RuntimeError(f"login printed no authorization URL:\n{chr(10).join(lines)}\n{err.decode()}")
        async with aiohttp.ClientSession() as s:
            async with s.get(url, allow_redirects=False) as r:
                if r.status != 302:
                    raise RuntimeError(f"authorize answered {r.status}: {(await r.text())[:300]}")
                location = r.headers["Location"]
            if urlsplit(location).hostname != HOST:
                raise RuntimeError(f"authorize redirected off 127.0.0.1: {location.split('?')[0]}")
            async with s.get(location) as r:
                if r.status != 200:
                    raise RuntimeError(f"login callback answered {r.status}: {(await r.text())[:300]}")
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
        lines.extend(out.decode().splitlines())
        if proc.returncode != 0:
            raise RuntimeError(f"login exited {proc.returncode}:\n{chr(10).join(lines)}\n{err.decode()}")
        return "\n".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def start_broker(cfg: Path, env: dict[str, str], port: int, log: Path) -> asyncio.subprocess.Process:
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            broker_cmd(), "run", "--config", str(cfg),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err, preexec_fn=_pdeathsig,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"broker exited with code {proc.returncode}; its log:\n{tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with s.get(
                    f"http://{HOST}:{port}/_broker/health", timeout=aiohttp.ClientTimeout(total=1)
                ) as r:
                    if r.status == 200:
                        return proc
            await asyncio.sleep(0.1)
    raise RuntimeError(f"broker did not answer /_broker/health within 30s; its log:\n{tail(log)}")


async def broker_status(port: int) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{HOST}:{port}/_broker/status", timeout=aiohttp.ClientTimeout(total=5)) as r,
    ):
        doc: dict[str, Any] = await r.json()
        return doc


async def stop_broker(proc: asyncio.subprocess.Process | None) -> int | None:
    if proc is None:
        return None
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            print(f"warning: broker (pid {proc.pid}) ignored SIGTERM for 15s; killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode


# ---------------------------------------------------------------- the direct side


class Bearer(httpx2.Auth):
    def __init__(self, token: str) -> None:
        self.token = token

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        request.headers["Authorization"] = f"Bearer {self.token}"
        yield request


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


async def direct_token(up: McpUpstream) -> str:
    """This script's own OAuth client at the upstream: register, authorize (auto-approved), exchange."""
    async with httpx2.AsyncClient(timeout=30) as http:  # httpx2 does not follow redirects by default
        r = await http.post(
            f"{up.base}/register",
            json={
                "redirect_uris": [DIRECT_REDIRECT_URI],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "client_name": "agentcard-bench-direct",
            },
        )
        if r.status_code != 201:
            raise RuntimeError(f"direct: /register answered {r.status_code}: {r.text[:300]}")
        client_id = r.json()["client_id"]
        verifier, challenge = pkce()
        state = secrets.token_urlsafe(16)
        r = await http.get(
            f"{up.base}/authorize",
            params={
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": DIRECT_REDIRECT_URI,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
                "state": state,
                "scope": "cards",
                "resource": up.mcp_url,
            },
        )
        if r.status_code != 302:
            raise RuntimeError(f"direct: /authorize answered {r.status_code}: {r.text[:300]}")
        callback = parse_qs(urlsplit(r.headers["location"]).query)
        if callback.get("state") != [state] or "code" not in callback:
            raise RuntimeError(f"direct: bad authorization response: {sorted(callback)}")
        r = await http.post(
            f"{up.base}/token",
            data={
                "grant_type": "authorization_code",
                "code": callback["code"][0],
                "redirect_uri": DIRECT_REDIRECT_URI,
                "client_id": client_id,
                "code_verifier": verifier,
                "resource": up.mcp_url,
            },
        )
        if r.status_code != 200:
            raise RuntimeError(f"direct: /token answered {r.status_code}: {r.text[:300]}")
        token: str = r.json()["access_token"]
        return token


@contextlib.asynccontextmanager
async def direct_client(url: str, mode: str, token: str) -> AsyncIterator[Client]:
    # the same timeouts as the client the SDK builds itself for Client(url) (30 s, 300 s read)
    async with (
        httpx2.AsyncClient(auth=Bearer(token), timeout=httpx2.Timeout(30, read=300)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as c,
    ):
        yield c


# ---------------------------------------------------------------- measuring


class CallFailed(RuntimeError):
    pass


async def one_call(c: Client, target: str, amount: int, timeout: float) -> float:
    """One timed tools/call round trip, checked; returns milliseconds."""
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            r = await c.call_tool("create_card", {"amount_cents": amount})
    except TimeoutError:
        raise CallFailed(
            f"{target}: call_tool(create_card, {amount}) hung for more than {timeout}s"
        ) from None
    except Exception as exc:  # whatever the client raised, reported with the target
        raise CallFailed(f"{target}: call_tool(create_card, {amount}) raised {exc!r}") from exc
    ms = (time.perf_counter() - t0) * 1000
    got = r.structured_content or {}
    if r.is_error or got.get("amount_cents") != amount:
        raise CallFailed(f"{target}: call_tool(create_card, {amount}) gave is_error={r.is_error} {got!r}")
    return ms


async def warm_up(c: Client, target: str, timeout: float, base: int) -> None:
    async with asyncio.timeout(timeout):
        tools = await c.list_tools()
    names = {t.name for t in tools.tools}
    if "create_card" not in names:
        raise CallFailed(f"{target}: list_tools has no create_card: {sorted(names)}")
    for i in range(WARMUP_CALLS):
        await one_call(c, target, base + i, timeout)


async def run_mode(
    mode: str, up: McpUpstream, broker_url: str, token: str, args: argparse.Namespace, seq: int
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {"direct": [], "broker": []}
    blocks: list[dict[str, Any]] = []
    t_open = time.perf_counter()
    t_close: float | None = None
    try:
        async with asyncio.timeout(None) as closing, contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(args.call_timeout):
                clients = {
                    "direct": await stack.enter_async_context(direct_client(up.mcp_url, mode, token)),
                    "broker": await stack.enter_async_context(Client(broker_url, mode=mode)),
                }
            versions = {k: c.protocol_version for k, c in clients.items()}
            for k, c in clients.items():
                await warm_up(
                    c, k, args.call_timeout, base=seq * 1_000_000 + (0 if k == "direct" else 500_000)
                )
            i = 0
            round_no = 0
            while i < args.calls:
                size = min(args.block, args.calls - i)
                order = ("direct", "broker") if round_no % 2 == 0 else ("broker", "direct")
                for target in order:
                    block = []
                    for j in range(size):
                        amount = seq * 1_000_000 + 1000 + i + j
                        block.append(await one_call(clients[target], target, amount, args.call_timeout))
                    samples[target].extend(block)
                    blocks.append(
                        {"round": round_no, "target": target, "median_ms": statistics.median(block)}
                    )
                i += size
                round_no += 1
            t_close = time.perf_counter()
            closing.reschedule(asyncio.get_running_loop().time() + args.call_timeout)
    except TimeoutError:
        step = "opening them / list_tools" if t_close is None else "closing them"
        raise CallFailed(
            f"{mode}: {step} (direct and broker sessions) hung for more than {args.call_timeout}s"
        ) from None
    assert t_close is not None
    close_s = time.perf_counter() - t_close
    direct, broker = stats(samples["direct"]), stats(samples["broker"])
    # per round: broker block median minus direct block median (pairs the two runs that share noise)
    by_round: dict[int, dict[str, float]] = {}
    for b in blocks:
        by_round.setdefault(b["round"], {})[b["target"]] = b["median_ms"]
    paired = [r["broker"] - r["direct"] for r in by_round.values()]
    return {
        "mode": mode,
        "protocol_version": versions,
        "direct": direct,
        "broker": broker,
        "added_ms": {
            "p50": round(broker["p50"] - direct["p50"], 3),
            "mean": round(broker["mean"] - direct["mean"], 3),
            "median_of_paired_block_medians": round(statistics.median(paired), 3),
        },
        "ratio": {
            "p50": round(broker["p50"] / direct["p50"], 3),
            "mean": round(broker["mean"] / direct["mean"], 3),
        },
        "session_open_and_measure_s": round(t_close - t_open, 2),
        "session_close_s": round(close_s, 3),
        "samples_ms": {k: [round(v, 4) for v in vs] for k, vs in samples.items()},
    }


def upstream_traffic(up: McpUpstream, direct_token_value: str) -> dict[str, Any]:
    """What the upstream saw on /mcp, by whose token (the tokens themselves are never printed)."""
    by: Counter[str] = Counter()
    methods: Counter[str] = Counter()
    for h in up.recorder.mcp_headers:
        auth = h.get("authorization", "")
        if not auth:
            who = "no token"
        elif auth == f"Bearer {direct_token_value}":
            who = "bench's own token"
        else:
            who = "broker's token"
        by[who] += 1
        methods[f"{who}: {h['method']}"] += 1
    return {
        "requests_by_token": dict(by),
        "requests_by_token_and_method": dict(sorted(methods.items())),
        "token_grants": dict(up.recorder.grants),
        "register_calls": up.recorder.calls[("POST", "/register")],
    }


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--calls", type=int, default=200, help="timed calls per target and mode (default 200)")
    p.add_argument("--block", type=int, default=50, help="calls per alternating block (default 50)")
    p.add_argument("--call-timeout", type=float, default=30.0, help="seconds before a call counts as hung")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    p.add_argument(
        "--upstream-nagle",
        action="store_true",
        help="leave Nagle on at the test upstream, as tests/mcp_upstream.py has it (~40 ms stalls)",
    )
    a = p.parse_args()
    if a.calls < 2 or a.block < 1:
        p.error("--calls must be at least 2 and --block at least 1")
    return a


def print_report(results: list[dict[str, Any]], extra: dict[str, Any], args: argparse.Namespace) -> None:
    print()
    print(
        f"agentcard-broker MCP bench: {args.calls} sequential tools/call create_card per target and mode, "
        f"blocks of {args.block} alternating direct/broker ({os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, mcp {extra['versions']['mcp']})"
    )
    print(f"upstream TCP_NODELAY: {extra['upstream_nodelay']}")
    print()
    head = f"{'mode':<6} | {'target':<6} | {'p50 ms':>7} | {'p90 ms':>7} | {'p99 ms':>7} | {'mean ms':>7}"
    head += f" | {'min ms':>7} | {'max ms':>7}"
    print(head)
    print("-" * len(head))
    for res in results:
        for target in ("direct", "broker"):
            s = res[target]
            print(
                f"{res['mode']:<6} | {target:<6} | {s['p50']:>7.2f} | {s['p90']:>7.2f} | {s['p99']:>7.2f} | "
                f"{s['mean']:>7.2f} | {s['min']:>7.2f} | {s['max']:>7.2f}"
            )
    print()
    print("added by the broker (broker - direct)")
    for res in results:
        a, r = res["added_ms"], res["ratio"]
        print(
            f"  {res['mode']:<6} p50 {a['p50']:+.2f} ms (x{r['p50']:.2f})   mean {a['mean']:+.2f} ms "
            f"(x{r['mean']:.2f})   per-round block medians, median difference "
            f"{a['median_of_paired_block_medians']:+.2f} ms"
        )
    print()
    for res in results:
        pv = res["protocol_version"]
        print(
            f"  {res['mode']:<6} protocol direct {pv['direct']} / broker {pv['broker']}; "
            f"closing both sessions took {res['session_close_s']:.3f}s"
        )
    print()
    u = extra["upstream"]
    print(f"upstream /mcp requests by token: {u['requests_by_token']}")
    print(f"upstream /token grants: {u['token_grants']} (refresh_token must be absent or 0)")
    b = extra["broker"]
    print(
        f"broker pid {b['pid']}: before {b['usage_before']}  after {b['usage_after']}  "
        f"(VmRSS/VmHWM KiB, open fds, threads)"
    )
    print(f"broker TCP sockets before: {b['tcp_before']}")
    print(f"broker TCP sockets after:  {b['tcp_after']}")
    print(f"broker route state after: {b['route_state_after']}; exit code on SIGTERM: {b['exit_code']}")
    print(f"broker log lines at warning or above: {len(b['log_problems'])}")
    for doc in b["log_problems"][:20]:
        print(f"  {json.dumps(doc)[:400]}")


async def amain(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="agentcard-bench-mcp-"))
    broker: asyncio.subprocess.Process | None = None
    broker_log = tmp / "broker.log"
    extra: dict[str, Any] = {
        "versions": {
            "mcp": importlib.metadata.version("mcp"),
            "httpx2": importlib.metadata.version("httpx2"),
            "python": platform.python_version(),
        }
    }
    try:
        async with run_mcp_upstream(access_ttl=ACCESS_TTL, auth=True) as up:
            try:
                if args.upstream_nagle:
                    extra["upstream_nodelay"] = "left off (--upstream-nagle)"
                else:
                    n = set_listener_nodelay(urlsplit(up.base).port or 0)
                    extra["upstream_nodelay"] = "set by the bench" if n else "could not be set"
                    if not n:
                        print("note: could not set TCP_NODELAY on the upstream listener", file=sys.stderr)
                port = free_port()
                env = broker_env(tmp)
                cfg = broker_config(tmp, port, up)
                print("login via `agentcard-broker login mcp --no-browser` ...", file=sys.stderr)
                login_out = await login(cfg, env)
                broker = await start_broker(cfg, env, port, broker_log)
                status = await broker_status(port)
                route = status["routes"][0]
                if route.get("state") != "ready":
                    raise RuntimeError(f"broker route not ready after login: {route}")
                token = await direct_token(up)
                broker_url = f"http://{HOST}:{port}/mcp"
                await asyncio.sleep(0.3)
                up_port = urlsplit(up.base).port or 0
                usage_before = proc_usage(broker.pid)
                sockets_before = tcp_sockets(broker.pid, port, up_port)

                results = []
                for seq, mode in enumerate(MODES, start=1):
                    print(f"mode {mode}: warm-up, then {args.calls} calls per target ...", file=sys.stderr)
                    res = await run_mode(mode, up, broker_url, token, args, seq)
                    results.append(res)
                    d, b = res["direct"]["p50"], res["broker"]["p50"]
                    print(f"  direct p50 {d:.2f} ms, broker p50 {b:.2f} ms", file=sys.stderr)
                    if broker.returncode is not None:
                        raise RuntimeError(f"broker died during mode {mode}:\n{tail(broker_log)}")
                await asyncio.sleep(1.0)  # let closed sessions and connections settle
                usage_after = proc_usage(broker.pid)
                sockets_after = tcp_sockets(broker.pid, port, up_port)
                route_after = (await broker_status(port))["routes"][0].get("state")
                extra["upstream"] = upstream_traffic(up, token)
            finally:
                exit_code = await stop_broker(broker)
        extra["broker"] = {
            "pid": broker.pid,
            "usage_before": usage_before,
            "usage_after": usage_after,
            "tcp_before": sockets_before,
            "tcp_after": sockets_after,
            "route_state_after": route_after,
            "exit_code": exit_code,
            "log_problems": broker_log_problems(broker_log),
        }
        extra["login_output_lines"] = len(login_out.splitlines())
        print_report(results, extra, args)
        if args.json:
            doc = {
                "config": {
                    "calls": args.calls,
                    "block": args.block,
                    "warmup_calls": WARMUP_CALLS,
                    "access_ttl_s": ACCESS_TTL,
                    "upstream_nodelay": extra["upstream_nodelay"],
                    "cpus": os.cpu_count(),
                    **extra["versions"],
                },
                "results": results,
                "upstream": extra["upstream"],
                "broker": extra["broker"],
            }
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    except (RuntimeError, CallFailed) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        if broker_log.exists():
            print(f"broker log tail:\n{tail(broker_log)}", file=sys.stderr)
        return 1
    finally:
        await stop_broker(broker)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    args = parse_args()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
