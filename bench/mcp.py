"""MCP forwarding benchmark: mcp.Client straight to an OAuth-protected MCP upstream, through the
broker, and through mcp-remote.

    python bench/mcp.py [--calls 200] [--block 1] [--json out.json] [--no-mcp-remote]

Run from the repository root. What it starts, all on 127.0.0.1 and all inside one temporary
directory removed on exit:

* `npm install --prefix TMP/mcp-remote mcp-remote@0.15.1` (the one request that leaves 127.0.0.1:
  the npm registry; `--no-mcp-remote` skips it and the third target);
* the MCP upstream of the tests (tests/mcp_upstream.py): the real MCP SDK server with the SDK's own
  OAuth 2.1 authorization server, under uvicorn, in a process of its own (bench/mcp_upstream_proc.py,
  on uvloop when installed, as the broker runs), access tokens living an hour so no refresh happens
  while measuring. It tells its URL on a ready line, and a second port of its own answers with what
  it has seen (requests by path, /token grants, /mcp requests by user-agent and a hash of their
  token); it dies with this script (PR_SET_PDEATHSIG);
* `agentcard-broker login mcp --no-browser` (the real CLI), with this script as the browser;
* the broker daemon (`agentcard-broker run`): one oauth route /mcp -> the upstream, keyring file
  backend in a temporary HOME, logging at warning level with the audit line off;
* mcp-remote (TMP/mcp-remote/node_modules/.bin/mcp-remote, under node), one process per session,
  spawned by `mcp.Client` over stdio with StdioServerParameters.

For "direct" the script registers its own OAuth client at the upstream (dynamic registration,
authorize with PKCE S256, code exchange) and gives `mcp.Client` a transport whose httpx2 client adds
that bearer token. For "broker" `mcp.Client` talks to the broker with no token at all. For
"mcp-remote" `mcp.Client` talks JSON-RPC over stdio to `mcp-remote URL --transport http-only
--header "Authorization: Bearer ${BENCH_MCP_REMOTE_TOKEN}" --silent`, the same token as direct's,
in that environment variable: mcp-remote 0.15.1 expands ${VAR} in --header values itself, so the
token is never on a command line. It needs no --allow-http for http://127.0.0.1 (0.15.1 allows
http:// for localhost and 127.0.0.1). It gets a throwaway HOME and MCP_REMOTE_CONFIG_DIR in the
temporary directory; with the header it needs no OAuth of its own (it still reads the upstream's
/.well-known metadata at start), which the script checks: no /register, /authorize or /token
request may reach the upstream while measuring. `--silent` drops mcp-remote's per-message stderr
lines, as the broker runs with its audit line off; `--mcp-remote-logs` keeps them.

For each of mode="legacy" and mode="auto" one session is opened to each target, warmed up (list_tools
and 10 calls), then N sequential `call_tool("create_card", ...)` round trips are timed one by one,
one call per target in turn, the order rotating each round (direct, broker, mcp-remote; then broker,
mcp-remote, direct; ...), so a stall of the machine lands on all targets alike (`--block N` times N
calls per target in a row instead: with 50, as this script had, one noisy second could fall on one
target's block and decide the comparison). Before a mode, a short mcp-remote session in that
mode is tried (open, list_tools, one call); if it fails, mcp-remote is left out of that mode and the
report says why.

Every target has its client and its server in separate processes: direct is this process -> the
upstream process; broker is this process -> the broker daemon -> the upstream process; mcp-remote is
this process -> node (over stdio) -> the upstream process. That is what makes the three comparable:
with the upstream on the client's own event loop, as this script once ran it, direct had no process
hop at all and its client and server took turns on one loop, while mcp-remote's HTTP work ran in node
in parallel with it, so mcp-remote could come out faster than direct. Now direct is the one hop every
target needs, and the overhead of the broker or of mcp-remote over it is their own hop and process.
In mode "legacy" mcp.Client (mcp 2.3.0) opens a new TCP connection for every call, to the upstream
and to the broker alike, and the broker looks each new loopback peer up in /proc/net/tcp, whose cost
grows with the sockets on the machine (TIME_WAIT leftovers of earlier runs included): the report
prints that count. On a small machine all the processes share the CPUs: compare the numbers with
each other, not with other machines. The report also gives each process's CPU time per call (user +
system from /proc): the broker and mcp-remote over the calls they served, the client and the upstream
over all. On a 2-CPU machine the client and the upstream alone keep more than one CPU busy, so a
middleman's CPU per call shows up nearly whole in its wall-clock overhead. Every value is fake;
nothing but the npm install leaves 127.0.0.1.
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
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

# This file is named mcp.py: now that benchlib is in, drop its own directory from the import path, or
# `import mcp` finds it instead of the MCP SDK.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]

import aiohttp  # noqa: E402
import httpx2  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters, stdio_client  # noqa: E402
from mcp.client.streamable_http import streamable_http_client  # noqa: E402

LOG_LINES = 30  # of the broker log, when something fails
UPSTREAM_SCRIPT = HERE / "mcp_upstream_proc.py"
UPSTREAM_READY_S = 30.0
MODES = ("legacy", "auto")
WARMUP_CALLS = 10
ACCESS_TTL = 3600
DIRECT_REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the 302 is read, not followed
MCP_REMOTE_VERSION = "0.15.1"
MCP_REMOTE_TOKEN_ENV = "BENCH_MCP_REMOTE_TOKEN"  # mcp-remote expands ${NAME} in --header values
TARGETS = ("direct", "broker", "mcp-remote")
WARMUP_BASE = {"direct": 0, "broker": 500_000, "mcp-remote": 700_000}  # amounts, so each call is told apart
PREFLIGHT_BASE = 900_000
OAUTH_PATHS = (("POST", "/register"), ("GET", "/authorize"), ("POST", "/token"))


# ---------------------------------------------------------------- small helpers


def child_pids(needle: str) -> list[int]:
    """This process's children whose command line holds `needle`, from /proc (empty off Linux)."""
    found = []
    with contextlib.suppress(OSError):
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = Path(f"/proc/{d}/cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == os.getpid() and needle.encode() in cmdline:
                found.append(int(d))
    return found


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


def auth_digest(value: str) -> str:
    """How the upstream's state port names an Authorization header (bench/mcp_upstream_proc.py)."""
    return hashlib.sha256(value.encode()).hexdigest() if value else ""


# ---------------------------------------------------------------- the upstream process


@dataclass
class Upstream:
    """The MCP upstream in its own process (bench/mcp_upstream_proc.py), and what its ready line said."""

    proc: subprocess.Popen[bytes]
    log: Path  # its stderr
    base: str
    state_url: str
    loop: str
    listener_nodelay: bool

    @property
    def mcp_url(self) -> str:
        return f"{self.base}/mcp"

    @property
    def port(self) -> int:
        return urlsplit(self.base).port or 0

    async def state(self) -> dict[str, Any]:
        """What the upstream has seen so far, from its state port (a fresh connection, closed after)."""
        port = urlsplit(self.state_url).port or 0
        status, body = await asyncio.to_thread(bl.get, port, "/")
        if status != 200:
            raise RuntimeError(f"the upstream's state port answered {status}: {body[:200]!r}")
        doc: dict[str, Any] = json.loads(body)
        return doc

    def check_alive(self, when: str) -> None:
        code = self.proc.poll()
        if code is not None:
            tail = bl.tail(self.log, LOG_LINES)
            raise RuntimeError(f"the MCP upstream exited with code {code} {when}:\n{tail}")


async def start_upstream(run: bl.BenchRun, nagle: bool) -> Upstream:
    """`python bench/mcp_upstream_proc.py`, once it has printed its ready line; it dies with this script.

    Started from this (the event loop's) thread: PR_SET_PDEATHSIG fires when the thread that forked
    the child ends, not only the process.
    """
    cmd = [sys.executable, str(UPSTREAM_SCRIPT), "--access-ttl", str(ACCESS_TTL)]
    if nagle:
        cmd.append("--nagle")
    log = run.tmp / "upstream.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            preexec_fn=bl.pdeathsig,
        )  # fmt: skip
    run.stop_on_exit(proc, "MCP upstream")
    assert proc.stdout is not None
    try:
        # read in a thread: should the child hang, the cleanup's stop_process ends it, and so the read
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), UPSTREAM_READY_S)
    except TimeoutError:
        raise RuntimeError(
            f"the MCP upstream printed no ready line within {UPSTREAM_READY_S}s:\n{bl.tail(log, LOG_LINES)}"
        ) from None
    if not line:
        proc.wait(5)
        tail = bl.tail(log, LOG_LINES)
        raise RuntimeError(
            f"the MCP upstream exited with code {proc.returncode} before it was ready:\n{tail}"
        )
    proc.stdout.close()  # it prints nothing more
    doc = json.loads(line)
    return Upstream(proc, log, doc["base"], doc["state"], doc["loop"], doc["listener_nodelay"])


async def stop_upstream(up: Upstream) -> int | None:
    """SIGTERM, as bl.stop_process does it (waited for in a thread); the exit code."""
    await asyncio.to_thread(bl.stop_process, up.proc, "MCP upstream")
    return up.proc.returncode


# ---------------------------------------------------------------- the broker side


def mcp_broker_config(tmp: Path, port: int, up: Upstream) -> Path:
    route = {
        "name": "mcp",
        "prefix": "/mcp",
        "upstream": up.mcp_url,
        "auth": {"type": "oauth", "scopes": ["cards"], "redirect_port": bl.free_port()},
    }
    return bl.broker_config(tmp, port, [route])


async def login(cfg: Path, env: dict[str, str], timeout: float = 30) -> str:
    """`agentcard-broker login mcp --no-browser`, and the browser's part: GET the URL, then the callback."""
    proc = await asyncio.create_subprocess_exec(
        bl.broker_cmd(), "login", "mcp", "--config", str(cfg), "--no-browser", "--timeout", str(timeout),
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
            if urlsplit(location).hostname != bl.HOST:
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
            bl.broker_cmd(), "run", "--config", str(cfg),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=err, stderr=err, preexec_fn=bl.pdeathsig,
        )  # fmt: skip
    # polled from a thread, not to block the event loop
    await asyncio.to_thread(
        bl.wait_health, port, lambda: proc.returncode, log, started=time.perf_counter(), log_lines=LOG_LINES
    )
    return proc


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


async def direct_token(up: Upstream) -> str:
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


# ---------------------------------------------------------------- the mcp-remote side


@dataclass
class McpRemote:
    bin: Path  # TMP/mcp-remote/node_modules/.bin/mcp-remote (a `#!/usr/bin/env node` script)
    home: Path  # its throwaway HOME; MCP_REMOTE_CONFIG_DIR is home/.mcp-auth
    logs: Path  # a directory: one stderr log per session
    version: str
    node: str
    silent: bool

    def env(self, token: str) -> dict[str, str]:
        # merged by the SDK over its default environment (HOME, PATH, ... of this process)
        return {
            "HOME": str(self.home),
            "MCP_REMOTE_CONFIG_DIR": str(self.home / ".mcp-auth"),
            "XDG_CONFIG_HOME": str(self.home / "config"),
            "XDG_CACHE_HOME": str(self.home / "cache"),
            "XDG_DATA_HOME": str(self.home / "data"),
            "XDG_STATE_HOME": str(self.home / "state"),
            MCP_REMOTE_TOKEN_ENV: token,
        }

    def args(self, url: str) -> list[str]:
        """The command line: the token's variable name only, never the token."""
        args = [
            url,
            "--transport", "http-only",
            "--header", f"Authorization: Bearer ${{{MCP_REMOTE_TOKEN_ENV}}}",
            "--auth-timeout", "5",  # should the header ever be refused: fail fast, not wait for a browser
        ]  # fmt: skip
        if self.silent:
            args.append("--silent")
        return args

    def params(self, url: str, token: str) -> StdioServerParameters:
        return StdioServerParameters(command=str(self.bin), args=self.args(url), env=self.env(token))

    @contextlib.asynccontextmanager
    async def client(self, url: str, mode: str, token: str, log_name: str) -> AsyncIterator[Client]:
        # Client(StdioServerParameters) is Client(stdio_client(params)); spelt out only to send
        # mcp-remote's stderr to a log file instead of this script's stderr
        with (self.logs / log_name).open("a") as errlog:
            async with Client(stdio_client(self.params(url, token), errlog=errlog), mode=mode) as c:
                yield c

    def home_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.home)) for p in self.home.rglob("*"))

    def log_lines(self) -> dict[str, list[str]]:
        return {
            p.name: [line for line in p.read_text(errors="replace").splitlines() if line.strip()]
            for p in sorted(self.logs.glob("*.log"))
        }


async def run_quiet(*cmd: str, env: dict[str, str], timeout: float) -> str:
    """Run a command, return its stdout and stderr together; RuntimeError unless it exits 0 in time."""
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` took more than {timeout}s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        tail_text = "\n".join(text.splitlines()[-20:])
        raise RuntimeError(f"`{' '.join(cmd[:3])} ...` exited {proc.returncode}:\n{tail_text}")
    return text


async def install_mcp_remote(tmp: Path, silent: bool) -> McpRemote:
    """`npm install --prefix TMP/mcp-remote mcp-remote@VERSION` (no install scripts), then check it."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        raise RuntimeError("mcp-remote needs node and npm on PATH (or pass --no-mcp-remote)")
    prefix = tmp / "mcp-remote"
    prefix.mkdir()
    env = dict(os.environ, npm_config_update_notifier="false", npm_config_fund="false")
    await run_quiet(
        npm, "install", "--prefix", str(prefix), "--ignore-scripts", "--no-audit", "--no-fund",
        f"mcp-remote@{MCP_REMOTE_VERSION}", env=env, timeout=300,
    )  # fmt: skip
    remote = McpRemote(
        bin=prefix / "node_modules" / ".bin" / "mcp-remote",
        home=tmp / "mcp-remote-home",
        logs=tmp / "mcp-remote-logs",
        version="",
        node=(await run_quiet(node, "--version", env=env, timeout=30)).strip(),
        silent=silent,
    )
    remote.home.mkdir(mode=0o700)
    remote.logs.mkdir()
    if not remote.bin.exists():
        raise RuntimeError(f"npm installed no {remote.bin}")
    menv = dict(os.environ, **remote.env(""))
    remote.version = (await run_quiet(str(remote.bin), "--version", env=menv, timeout=30)).strip()
    if remote.version != MCP_REMOTE_VERSION:
        raise RuntimeError(f"mcp-remote --version says {remote.version!r}, not {MCP_REMOTE_VERSION}")
    return remote


async def mcp_remote_preflight(
    remote: McpRemote, url: str, mode: str, token: str, timeout: float, base: int
) -> tuple[str | None, str | None]:
    """A short mcp-remote session in this mode: (protocol version, None), or (None, what failed)."""
    try:
        async with (
            asyncio.timeout(timeout),
            remote.client(url, mode, token, f"{mode}-preflight.log") as c,
        ):
            tools = await c.list_tools()
            if "create_card" not in {t.name for t in tools.tools}:
                return None, f"list_tools has no create_card: {sorted(t.name for t in tools.tools)}"
            await one_call(c, "mcp-remote", base, timeout)
            return c.protocol_version, None
    except TimeoutError:
        return None, f"opening a session, list_tools and one call took more than {timeout}s"
    except Exception as exc:  # noqa: BLE001 -- reported: mcp-remote is then left out of this mode
        return None, describe(exc)


def describe(exc: BaseException) -> str:
    """An exception as one line; a task group's by its leaves."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


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


def rotated(targets: list[str], n: int) -> list[str]:
    k = n % len(targets)
    return targets[k:] + targets[:k]


async def run_mode(
    mode: str,
    up: Upstream,
    broker_url: str,
    token: str,
    remote: McpRemote | None,
    args: argparse.Namespace,
    seq: int,
    broker_pid: int,
) -> dict[str, Any]:
    """One mode: a session per target, warm-up, then rotating blocks of timed calls.

    `remote` None leaves mcp-remote out (--no-mcp-remote, or its preflight failed in this mode).
    """
    targets = ["direct", "broker"] + (["mcp-remote"] if remote is not None else [])
    samples: dict[str, list[float]] = {t: [] for t in targets}
    blocks: list[dict[str, Any]] = []
    remote_proc: dict[str, Any] = {}
    tcp_rows_before = bl.tcp_table_size()
    t_open = time.perf_counter()
    t_close: float | None = None
    try:
        async with asyncio.timeout(None) as closing, contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(args.call_timeout):
                clients = {
                    "direct": await stack.enter_async_context(direct_client(up.mcp_url, mode, token)),
                    "broker": await stack.enter_async_context(Client(broker_url, mode=mode)),
                }
                if remote is not None:
                    clients["mcp-remote"] = await stack.enter_async_context(
                        remote.client(up.mcp_url, mode, token, f"{mode}.log")
                    )
            versions = {k: c.protocol_version for k, c in clients.items()}
            for k, c in clients.items():
                await warm_up(c, k, args.call_timeout, base=seq * 1_000_000 + WARMUP_BASE[k])
            pids = child_pids("mcp-remote") if remote is not None else []
            if len(pids) == 1:
                remote_proc = {"pid": pids[0], "usage_after_warmup": bl.proc_usage(pids[0])}
            # CPU seconds of every process while measuring: each middleman works only in its own
            # blocks (and idles in the others), so its CPU over the calls it served is its cost per call
            procs = {"client": os.getpid(), "upstream": up.proc.pid, "broker": broker_pid}
            if remote_proc:
                procs["mcp-remote"] = remote_proc["pid"]
            cpu_before = {k: bl.cpu_seconds(pid) for k, pid in procs.items()}
            t_calls = time.perf_counter()
            i = 0
            round_no = 0
            with bl.client_collector_paused():
                while i < args.calls:
                    size = min(args.block, args.calls - i)
                    for target in rotated(targets, round_no):
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
            cpu_after = {k: bl.cpu_seconds(pid) for k, pid in procs.items()}
            calls_wall_s = time.perf_counter() - t_calls
            if remote_proc:
                remote_proc["usage_after_calls"] = bl.proc_usage(remote_proc["pid"])
            tcp_rows_after = bl.tcp_table_size()
            t_close = time.perf_counter()
            closing.reschedule(asyncio.get_running_loop().time() + args.call_timeout)
    except TimeoutError:
        step = "opening them / list_tools" if t_close is None else "closing them"
        raise CallFailed(
            f"{mode}: {step} ({', '.join(targets)} sessions) hung for more than {args.call_timeout}s"
        ) from None
    assert t_close is not None
    close_s = time.perf_counter() - t_close
    if remote_proc:
        await asyncio.sleep(0.2)
        remote_proc["exited_after_close"] = not Path(f"/proc/{remote_proc['pid']}").exists()
    st = {t: bl.summarize_ms(samples[t], interpolate=True, digits=3) for t in targets}
    direct = st["direct"]
    # per round: a target's block median minus direct's block median (pairs the runs that share noise)
    by_round: dict[int, dict[str, float]] = {}
    for b in blocks:
        by_round.setdefault(b["round"], {})[b["target"]] = b["median_ms"]
    overhead: dict[str, dict[str, float]] = {}
    ratio: dict[str, dict[str, float]] = {}
    for t in targets[1:]:
        paired = [r[t] - r["direct"] for r in by_round.values()]
        overhead[t] = {q: round(st[t][q] - direct[q], 3) for q in ("p50", "p90", "p99", "mean")}
        overhead[t]["median_of_paired_block_medians"] = round(statistics.median(paired), 3)
        ratio[t] = {q: round(st[t][q] / direct[q], 3) for q in ("p50", "mean")}
    res: dict[str, Any] = {
        "mode": mode,
        "targets": targets,
        "protocol_version": versions,
        **st,
        # the broker's figures under the names earlier versions of this script used
        "added_ms": {k: overhead["broker"][k] for k in ("p50", "mean", "median_of_paired_block_medians")},
        "ratio": ratio["broker"],
        "overhead_ms": overhead,
        "overhead_ratio": ratio,
    }
    if remote is not None:
        ob, om = overhead["broker"], overhead["mcp-remote"]
        below = {k: ob[k] < om[k] for k in ob}
        res["broker_below_mcp_remote"] = {**below, "all": all(below.values())}
        res["mcp_remote_process"] = remote_proc
    n_calls = args.calls * len(targets)
    cpu_ms: dict[str, float | None] = {}
    for k in procs:
        b0, b1 = cpu_before[k], cpu_after[k]
        served = args.calls if k in ("broker", "mcp-remote") else n_calls  # the calls it took part in
        cpu_ms[k] = None if b0 is None or b1 is None else round((b1 - b0) * 1000 / served, 3)
    res["cpu_ms_per_call"] = cpu_ms
    res["calls_wall_s"] = round(calls_wall_s, 2)
    res["proc_net_tcp_rows"] = {"before": tcp_rows_before, "after_calls": tcp_rows_after}
    res["session_open_and_measure_s"] = round(t_close - t_open, 2)
    res["session_close_s"] = round(close_s, 3)
    res["samples_ms"] = {k: [round(v, 4) for v in vs] for k, vs in samples.items()}
    return res


def upstream_traffic(state: dict[str, Any], direct_token_value: str) -> dict[str, Any]:
    """What the upstream saw on /mcp, by whose token (the tokens themselves are never printed).

    The upstream's state port names each token by a hash of its Authorization header. mcp-remote
    sends the bench's own token too; its requests are told apart by their user-agent (node's fetch
    sends `node`, undici's `undici`), httpx2's is python-httpx2/...
    """
    mine = auth_digest(f"Bearer {direct_token_value}")
    by: Counter[str] = Counter()
    methods: Counter[str] = Counter()
    for r in state["mcp_requests"]:
        if not r["auth_sha256"]:
            who = "no token"
        elif r["auth_sha256"] == mine:
            via_node = r["user_agent"] in ("node", "undici")
            who = "bench's token via mcp-remote" if via_node else "bench's own token"
        else:
            who = "broker's token"
        by[who] += r["count"]
        methods[f"{who}: {r['method']}"] += r["count"]
    calls = request_counts(state)
    return {
        "requests_by_token": dict(by),
        "requests_by_token_and_method": dict(sorted(methods.items())),
        "token_grants": dict(state["grants"]),
        "register_calls": calls.get(("POST", "/register"), 0),
        "well_known_requests": {
            f"{m} {path}": n for (m, path), n in sorted(calls.items()) if "/.well-known/" in path
        },
    }


def request_counts(state: dict[str, Any]) -> dict[tuple[str, str], int]:
    return {(m, path): n for m, path, n in state["calls"]}


def oauth_calls(state: dict[str, Any]) -> dict[str, int]:
    calls = request_counts(state)
    return {f"{m} {path}": calls.get((m, path), 0) for m, path in OAUTH_PATHS}


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--calls", type=int, default=200, help="timed calls per target and mode (default 200)")
    p.add_argument("--block", type=int, default=1, help="calls per target per rotating block (default 1)")
    p.add_argument("--call-timeout", type=float, default=30.0, help="seconds before a call counts as hung")
    bl.add_output_args(p)
    p.add_argument(
        "--upstream-nagle",
        action="store_true",
        help="leave Nagle on at the test upstream, as tests/mcp_upstream.py once had it (~40 ms stalls): "
        "asyncio's event loop instead of uvloop, a listener without IPPROTO_TCP and TCP_NODELAY",
    )
    p.add_argument(
        "--no-mcp-remote",
        action="store_true",
        help="measure direct and broker only: no npm install, no mcp-remote target",
    )
    p.add_argument(
        "--mcp-remote-logs",
        action="store_true",
        help="run mcp-remote without --silent (its default: a stderr line per message, to a log file)",
    )
    a = p.parse_args()
    if a.calls < 2 or a.block < 1:
        p.error("--calls must be at least 2 and --block at least 1")
    return a


def print_report(results: list[dict[str, Any]], extra: dict[str, Any], args: argparse.Namespace) -> None:
    r = extra.get("mcp_remote")
    names = "direct/broker" + ("/mcp-remote" if r else "")
    print()
    print(
        f"agentcard-broker MCP bench: {args.calls} sequential tools/call create_card per target and mode, "
        f"blocks of {args.block} rotating {names} ({os.cpu_count()} CPUs, python "
        f"{platform.python_version()}, mcp {extra['versions']['mcp']})"
    )
    if r:
        print(
            f"mcp-remote {r['version']} on node {r['node']}: mcp-remote URL {' '.join(r['args'][1:])}"
            f"  (env {MCP_REMOTE_TOKEN_ENV}=<direct's token>)"
        )
    up = extra["upstream"]["process"]
    print(
        f"upstream: its own process (bench/mcp_upstream_proc.py, pid {up['pid']}), event loop "
        f"{up['event_loop']}, TCP_NODELAY {extra['upstream_nodelay']}"
    )
    print()
    ms = ">7.2f"
    table = bl.Table(
        ("mode", "<6"),
        ("target", "<10"),
        ("p50 ms", ms),
        ("p90 ms", ms),
        ("p99 ms", ms),
        ("mean ms", ms),
        ("min ms", ms),
        ("max ms", ms),
    )
    table.print_head()
    for res in results:
        for target in res["targets"]:
            s = res[target]
            table.print_row(res["mode"], target, s["p50"], s["p90"], s["p99"], s["mean"], s["min"], s["max"])
        if res.get("mcp_remote_skipped"):
            print(f"{table.cells(res['mode'], 'mcp-remote')} | left out: {res['mcp_remote_skipped']}")
    print()
    print("per-call overhead over direct (target - direct), ms")
    print(
        f"  {'mode':<6} {'target':<10} {'p50':>7} {'p90':>7} {'p99':>7} {'mean':>7}  {'x p50':>6} "
        f"{'x mean':>6}  per-round block medians, median difference"
    )
    for res in results:
        for target, o in res["overhead_ms"].items():
            x = res["overhead_ratio"][target]
            print(
                f"  {res['mode']:<6} {target:<10} {o['p50']:>+7.2f} {o['p90']:>+7.2f} {o['p99']:>+7.2f} "
                f"{o['mean']:>+7.2f}  {x['p50']:>6.2f} {x['mean']:>6.2f}  "
                f"{o['median_of_paired_block_medians']:>+7.2f}"
            )
    if r:
        print()
        print("target: the broker's overhead below mcp-remote's")
        for res in results:
            below = res.get("broker_below_mcp_remote")
            if below is None:
                print(f"  {res['mode']:<6} not measured (mcp-remote left out of this mode)")
                continue
            stats_ = [k for k in below if k != "all"]
            yes = [k.replace("median_of_paired_block_medians", "paired") for k in stats_ if below[k]]
            no = [k.replace("median_of_paired_block_medians", "paired") for k in stats_ if not below[k]]
            verdict = "MET" if below["all"] else "NOT MET"
            print(
                f"  {res['mode']:<6} {verdict}: below on {', '.join(yes) or 'none'}"
                + (f"; not below on {', '.join(no)}" if no else "")
            )
    print()
    print(
        "CPU per call, ms (user+system from /proc, clock ticks of 10 ms: broker and mcp-remote over the "
        "calls they served, client and upstream over all calls of the mode)"
    )
    for res in results:
        cpu = res["cpu_ms_per_call"]
        print(
            f"  {res['mode']:<6} "
            + "  ".join(f"{k} {'?' if v is None else f'{v:.2f}'}" for k, v in cpu.items())
            + f"  ({res['calls_wall_s']:.1f}s of calls on {os.cpu_count()} CPUs)"
        )
    print()
    for res in results:
        pv = res["protocol_version"]
        print(
            f"  {res['mode']:<6} protocol {' / '.join(f'{k} {v}' for k, v in pv.items())}; "
            f"closing the sessions took {res['session_close_s']:.3f}s; /proc/net/tcp rows "
            f"{res['proc_net_tcp_rows']['before']} -> {res['proc_net_tcp_rows']['after_calls']}"
        )
    print()
    u = extra["upstream"]
    print(f"upstream /mcp requests by token: {u['requests_by_token']}")
    print(f"upstream /token grants: {u['token_grants']} (refresh_token must be absent or 0)")
    busy = (
        f"{up['cpu_s_during_modes']:.2f}s CPU in {up['wall_s_during_modes']:.2f}s of the modes"
        if up["cpu_s_during_modes"] is not None
        else "CPU time unknown"
    )
    print(
        f"upstream pid {up['pid']}: {busy}; before {up['usage_before']}  after {up['usage_after']}  "
        f"(VmRSS/VmHWM KiB, open fds, threads); exit code on SIGTERM: {up['exit_code']}"
    )
    b = extra["broker"]
    print(
        f"broker pid {b['pid']}: before {b['usage_before']}  after {b['usage_after']}  "
        f"(VmRSS/VmHWM KiB, open fds, threads)"
    )
    print(f"broker TCP sockets before: {b['tcp_before']}")
    print(f"broker TCP sockets after:  {b['tcp_after']}")
    print(f"broker route state after: {b['route_state_after']}; exit code on SIGTERM: {b['exit_code']}")
    bl.print_log_problems(b["log_problems"], [json.dumps(doc)[:400] for doc in b["log_problems"][:20]])
    if r:
        print()
        print(f"upstream /.well-known requests (mcp-remote reads them at start): {u['well_known_requests']}")
        print(
            f"upstream OAuth requests while measuring (mcp-remote must do no OAuth of its own): "
            f"{r['oauth_calls_while_measuring']}"
        )
        for res in results:
            mp = res.get("mcp_remote_process")
            if mp:
                print(
                    f"mcp-remote ({res['mode']}) pid {mp['pid']}: after warm-up "
                    f"{mp['usage_after_warmup']}  after the calls {mp['usage_after_calls']}  exited after "
                    f"session close: {mp['exited_after_close']}"
                )
        print(f"files mcp-remote left in its throwaway HOME: {r['home_files']}")
        lines = r["stderr_lines"]
        print(f"mcp-remote stderr lines per session: { {k: len(v) for k, v in lines.items()} }")
        if not r["silent"]:
            return
        for name, ls in lines.items():
            for line in ls[:10]:
                print(f"  {name}: {line[:300]}")


async def amain(args: argparse.Namespace) -> int:
    broker: asyncio.subprocess.Process | None = None
    remote: McpRemote | None = None
    extra: dict[str, Any] = {
        "versions": {
            "mcp": importlib.metadata.version("mcp"),
            "httpx2": importlib.metadata.version("httpx2"),
            "python": platform.python_version(),
        }
    }

    def remote_log_tails() -> None:
        if remote is not None:
            for name, ls in remote.log_lines().items():
                print(f"mcp-remote {name} tail:\n" + "\n".join(ls[-20:]), file=sys.stderr)

    async with bl.BenchRun("agentcard-bench-mcp-", args.keep, log_lines=LOG_LINES) as run:
        run.callback(lambda: stop_broker(broker))
        run.on_failure(remote_log_tails)
        tmp, broker_log = run.tmp, run.broker_log
        if not args.no_mcp_remote:
            print(f"npm install mcp-remote@{MCP_REMOTE_VERSION} ...", file=sys.stderr)
            remote = await install_mcp_remote(tmp, silent=not args.mcp_remote_logs)
            extra["versions"]["mcp-remote"] = remote.version
            extra["versions"]["node"] = remote.node
        print("starting the MCP upstream (its own process) ...", file=sys.stderr)
        up = await start_upstream(run, args.upstream_nagle)
        extra["upstream_nodelay"] = "on at its listener" if up.listener_nodelay else "off at its listener"
        if args.upstream_nagle:
            extra["upstream_nodelay"] += " (--upstream-nagle)"
        try:
            port = bl.free_port()
            env = bl.broker_env(tmp)
            cfg = mcp_broker_config(tmp, port, up)
            print("login via `agentcard-broker login mcp --no-browser` ...", file=sys.stderr)
            login_out = await login(cfg, env)
            broker = await start_broker(cfg, env, port, broker_log)
            status = await asyncio.to_thread(bl.broker_status, port)
            route = status["routes"][0]
            if route.get("state") != "ready":
                raise RuntimeError(f"broker route not ready after login: {route}")
            token = await direct_token(up)
            broker_url = f"http://{bl.HOST}:{port}/mcp"
            await asyncio.sleep(0.3)
            up_port = up.port
            usage_before = bl.proc_usage(broker.pid)
            sockets_before = tcp_sockets(broker.pid, port, up_port)
            oauth_before = oauth_calls(await up.state())
            up_usage_before, up_cpu_before = bl.proc_usage(up.proc.pid), bl.cpu_seconds(up.proc.pid)
            t_modes = time.perf_counter()

            results = []
            for seq, mode in enumerate(MODES, start=1):
                mode_remote, pv, skipped = remote, None, None
                if remote is not None:
                    print(f"mode {mode}: trying an mcp-remote session ...", file=sys.stderr)
                    pv, skipped = await mcp_remote_preflight(
                        remote, up.mcp_url, mode, token, args.call_timeout,
                        seq * 1_000_000 + PREFLIGHT_BASE,
                    )  # fmt: skip
                    if skipped is not None:
                        print(f"  mcp-remote fails in mode {mode}, left out: {skipped}", file=sys.stderr)
                        mode_remote = None
                print(f"mode {mode}: warm-up, then {args.calls} calls per target ...", file=sys.stderr)
                res = await run_mode(mode, up, broker_url, token, mode_remote, args, seq, broker.pid)
                if skipped is not None:
                    res["mcp_remote_skipped"] = skipped
                elif remote is not None:
                    res["mcp_remote_preflight_protocol"] = pv
                results.append(res)
                p50s = ", ".join(f"{t} p50 {res[t]['p50']:.2f} ms" for t in res["targets"])
                print(f"  {p50s}", file=sys.stderr)
                if broker.returncode is not None:
                    raise RuntimeError(f"broker died during mode {mode}:\n{bl.tail(broker_log, LOG_LINES)}")
                up.check_alive(f"during mode {mode}")
            up_cpu_after, modes_s = bl.cpu_seconds(up.proc.pid), time.perf_counter() - t_modes
            await asyncio.sleep(1.0)  # let closed sessions and connections settle
            usage_after = bl.proc_usage(broker.pid)
            sockets_after = tcp_sockets(broker.pid, port, up_port)
            route_after = (await asyncio.to_thread(bl.broker_status, port))["routes"][0].get("state")
            up_usage_after = bl.proc_usage(up.proc.pid)
            up_state = await up.state()
            extra["upstream"] = upstream_traffic(up_state, token)
            oauth_after = oauth_calls(up_state)
        finally:
            exit_code = await stop_broker(broker)
            up_exit_code = await stop_upstream(up)
        up_cpu = None if up_cpu_before is None or up_cpu_after is None else up_cpu_after - up_cpu_before
        extra["upstream"]["process"] = {
            "pid": up.proc.pid,
            "event_loop": up.loop,
            "listener_nodelay": up.listener_nodelay,
            "usage_before": up_usage_before,
            "usage_after": up_usage_after,
            "cpu_s_during_modes": None if up_cpu is None else round(up_cpu, 2),
            "wall_s_during_modes": round(modes_s, 2),
            "exit_code": up_exit_code,
        }
        extra["broker"] = {
            "pid": broker.pid,
            "usage_before": usage_before,
            "usage_after": usage_after,
            "tcp_before": sockets_before,
            "tcp_after": sockets_after,
            "route_state_after": route_after,
            "exit_code": exit_code,
            "log_problems": bl.broker_log_problems(broker_log),
        }
        if remote is not None:
            extra["mcp_remote"] = {
                "version": remote.version,
                "node": remote.node,
                "command": str(remote.bin.relative_to(tmp)),
                "args": remote.args("URL"),
                "silent": remote.silent,
                "token_env": MCP_REMOTE_TOKEN_ENV,
                "oauth_calls_while_measuring": {k: oauth_after[k] - oauth_before[k] for k in oauth_after},
                "home_files": remote.home_files(),
                "stderr_lines": remote.log_lines(),
            }
        extra["login_output_lines"] = len(login_out.splitlines())
        print_report(results, extra, args)
        doc = {
            "config": {
                "calls": args.calls,
                "block": args.block,
                "warmup_calls": WARMUP_CALLS,
                "access_ttl_s": ACCESS_TTL,
                "upstream_nodelay": extra["upstream_nodelay"],
                "upstream_event_loop": extra["upstream"]["process"]["event_loop"],
                "cpus": os.cpu_count(),
                **extra["versions"],
            },
            "results": results,
            "upstream": extra["upstream"],
            "broker": extra["broker"],
        }
        if remote is not None:
            doc["mcp_remote"] = extra["mcp_remote"]
        bl.write_json(args.json, doc)
    return run.exit_code


def main() -> int:
    return bl.run_async(amain(parse_args()))


if __name__ == "__main__":
    sys.exit(main())
