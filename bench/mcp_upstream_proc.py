"""The MCP upstream of bench/mcp.py in a process of its own: started by it, not a benchmark itself.

    python bench/mcp_upstream_proc.py [--access-ttl 3600] [--nagle]

The server of tests/mcp_upstream.py, assembled as its run_mcp_upstream does it: the MCP SDK's
MCPServer with its card tools behind the SDK's own OAuth 2.1 authorization server (broker.tools.sandbox's
provider: dynamic registration, PKCE S256, auto-approved /authorize), wrapped in the tests' Recorder,
served by uvicorn on a 127.0.0.1 port of its own choosing, on uvloop when it is installed.

A second 127.0.0.1 port answers GET / with what the Recorder saw, as JSON, so the bench can check the
upstream's traffic without sharing its memory and without adding to the counts on the measured port:
requests by (method, path), /token calls by grant type, and the /mcp requests by method, user-agent
product and a SHA-256 of their Authorization header (never the header itself).

Once both ports serve it prints one JSON line on stdout (base URL, state URL, pid, event loop, whether
the listener has TCP_NODELAY) and then serves until SIGTERM or SIGINT. bench/mcp.py sets
PR_SET_PDEATHSIG, so it also dies with the bench.

`--nagle` rebuilds the old arrangement of the tests' upstream, Nagle left on for the upstream's
connections: a listener made without IPPROTO_TCP and without TCP_NODELAY, on asyncio's own event
loop (uvloop turns Nagle off on every TCP connection; asyncio only on sockets whose proto is
IPPROTO_TCP).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# run as a script, this directory comes first on the import path, and its mcp.py (the benchmark) would
# shadow the MCP SDK: drop it, and add the repository root for `tests.mcp_upstream` and `broker`.
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != HERE]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from starlette.responses import JSONResponse  # noqa: E402
from starlette.types import Receive, Scope, Send  # noqa: E402

from broker.tools.sandbox import SandboxAuthServer, auth_settings, loopback_socket, serve_asgi  # noqa: E402
from tests.mcp_upstream import Recorder, build_server  # noqa: E402

SUBJECT = "alice@example.test"  # as tests/mcp_upstream.py's run_mcp_upstream


def auth_digest(value: str) -> str:
    """How the state port names an Authorization header: "" when absent, else its SHA-256 in hex."""
    return hashlib.sha256(value.encode()).hexdigest() if value else ""


def nagle_socket() -> socket.socket:
    """127.0.0.1, proto 0 and no TCP_NODELAY: what tests/mcp_upstream.py once handed to uvicorn."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class StateApp:
    """GET / (any path): the Recorder's counts as JSON."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def state(self) -> dict[str, Any]:
        r = self.recorder
        mcp: Counter[tuple[str, str, str]] = Counter()
        for h in r.mcp_headers:
            ua = h.get("user-agent", "").split("/")[0].lower()
            mcp[(h["method"], ua, auth_digest(h.get("authorization", "")))] += 1
        return {
            "calls": [[m, path, n] for (m, path), n in sorted(r.calls.items())],
            "grants": dict(r.grants),
            "mcp_requests": [
                {"method": m, "user_agent": ua, "auth_sha256": digest, "count": n}
                for (m, ua, digest), n in sorted(mcp.items())
            ],
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        if scope["method"] != "GET":
            await JSONResponse({"error": "GET only"}, status_code=405)(scope, receive, send)
            return
        await JSONResponse(self.state())(scope, receive, send)


async def serve(access_ttl: int, nagle: bool, loop_name: str) -> None:
    sock = nagle_socket() if nagle else loopback_socket()
    nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    provider = SandboxAuthServer(access_ttl=access_ttl, expected_resource=f"{base}/mcp", subject=SUBJECT)
    server = build_server(auth=auth_settings(base), auth_server_provider=provider)
    recorder = Recorder(server.streamable_http_app())
    state_sock = loopback_socket()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve_asgi(recorder, sock), serve_asgi(StateApp(recorder), state_sock):
        ready = {
            "base": base,
            "state": f"http://127.0.0.1:{state_sock.getsockname()[1]}/",
            "pid": os.getpid(),
            "loop": loop_name,
            "listener_nodelay": nodelay,
        }
        print(json.dumps(ready), flush=True)
        await stop.wait()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--access-ttl", type=int, default=3600, help="access token lifetime, seconds")
    p.add_argument("--nagle", action="store_true", help="leave Nagle on (asyncio's loop, proto 0 listener)")
    args = p.parse_args()
    uvloop: Any = None
    if not args.nagle:
        with contextlib.suppress(ImportError):
            import uvloop
    if uvloop is not None:
        uvloop.run(serve(args.access_ttl, args.nagle, f"uvloop {uvloop.__version__}"))
    else:
        asyncio.run(serve(args.access_ttl, args.nagle, "asyncio"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
