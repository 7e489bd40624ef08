"""`agentcard-broker stdio ROUTE`: an MCP stdio server that relays to the daemon's MCP route.

Owns: reading newline-delimited JSON-RPC from stdin, POSTing each message to the route on the
running daemon's first listen address, TCP or unix socket (streamable HTTP, both protocol
styles: a 2025-11-25 session with `Mcp-Session-Id`, or the 2026-07-28 headers taken from the
message itself), writing every JSON-RPC message of the answer (JSON or SSE) to stdout, and
ending the session when stdin closes. Hosts that only start local command servers (Claude
Desktop's `mcpServers` with `command`) use the broker this way.
Must never: write anything but JSON-RPC to stdout, or hold a credential (it has none).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING, Any

import aiohttp

from broker import jsonrpc
from broker.tools import ToolError

if TYPE_CHECKING:
    from broker.config import Config

MODERN_META = "io.modelcontextprotocol/protocolVersion"
ACCEPT = "application/json, text/event-stream"
NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}


class Relay:
    def __init__(self, url: str, host_header: str, connector: aiohttp.BaseConnector | None = None) -> None:
        self.url = url
        self.host_header = host_header
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self._http = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)
        )
        self._out_lock = asyncio.Lock()

    async def close(self) -> None:
        if self.session_id:
            try:
                async with self._http.delete(self.url, headers=self._headers(None)) as r:
                    await r.read()
            except (aiohttp.ClientError, TimeoutError):
                pass
        await self._http.close()

    def _headers(self, msg: dict[str, Any] | None) -> dict[str, str]:
        h = {"Host": self.host_header, "Accept": ACCEPT, "Content-Type": "application/json"}
        params = msg.get("params") if isinstance(msg, dict) else None
        meta = params.get("_meta") if isinstance(params, dict) else None
        modern = meta.get(MODERN_META) if isinstance(meta, dict) else None
        if isinstance(modern, str) and isinstance(msg, dict):
            h["Mcp-Protocol-Version"] = modern
            method = msg.get("method")
            if isinstance(method, str):
                h["Mcp-Method"] = method
                key = NAME_PARAM.get(method)
                if key and isinstance(params, dict) and isinstance(params.get(key), str):
                    h["Mcp-Name"] = params[key]
            return h
        if self.session_id:
            h["Mcp-Session-Id"] = self.session_id
        if self.protocol_version:
            h["Mcp-Protocol-Version"] = self.protocol_version
        return h

    async def write(self, msg: Any) -> None:
        async with self._out_lock:
            sys.stdout.write(json.dumps(msg, separators=(",", ":")) + "\n")
            sys.stdout.flush()

    async def handle(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            await self.write(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}}
            )
            return
        rid = msg.get("id") if isinstance(msg, dict) else None
        is_request = isinstance(msg, dict) and "method" in msg and "id" in msg
        try:
            async with self._http.post(self.url, data=line, headers=self._headers(msg)) as r:
                if (
                    r.headers.get("Mcp-Session-Id")
                    and isinstance(msg, dict)
                    and msg.get("method") == "initialize"
                ):
                    self.session_id = r.headers["Mcp-Session-Id"]
                body = await r.read()
                ctype = r.headers.get("Content-Type", "")
                status = r.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            if is_request:
                await self._error(rid, f"cannot reach agentcard-broker at {self.url} ({type(exc).__name__}); "
                                  "start it: agentcard-broker run")  # fmt: skip
            return
        if status == 202 or not body:
            return
        messages = jsonrpc.messages(body, ctype)
        if not messages:
            if is_request:
                await self._error(rid, f"agentcard-broker answered HTTP {status} with no JSON-RPC message")
            return
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("result"), dict) and "protocolVersion" in m["result"]:
                self.protocol_version = str(m["result"]["protocolVersion"])
            await self.write(m)

    async def _error(self, rid: Any, text: str) -> None:
        await self.write({"jsonrpc": "2.0", "id": rid, "error": {"code": -32001, "message": text}})


async def run(url: str, host_header: str, unix_path: str | None = None) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    connector = aiohttp.UnixConnector(path=unix_path) if unix_path else None
    relay = Relay(url, host_header, connector)
    tasks: set[asyncio.Task[None]] = set()
    try:
        while line := await reader.readline():
            if not line.strip():
                continue
            if b'"initialize"' in line:  # the session must exist before anything else is sent
                await relay.handle(line)
                continue
            task = asyncio.create_task(relay.handle(line))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await relay.close()
    return 0


def serve(config: Config, route_name: str) -> int:
    """`agentcard-broker stdio ROUTE`: relay stdin and stdout to the route on the daemon's first
    listen address, with the Host its guard admits, until stdin closes (or ^C)."""
    route = config.route(route_name)
    if route is None:
        raise ToolError(f"no route named {route_name!r} in {config.path}")
    listen = config.listen[0]
    prefix = "" if route.prefix == "/" else route.prefix
    host = config.allowed_hosts[0] if config.allowed_hosts else "127.0.0.1"
    if listen.kind == "unix":
        url, host_header, unix_path = f"http://localhost{prefix}", host, listen.path
    else:  # str(Listen) is HOST:PORT, IPv6 in brackets
        url, host_header, unix_path = f"http://{listen}{prefix}", f"{host}:{listen.port}", None
    try:
        return asyncio.run(run(url, host_header, unix_path))
    except KeyboardInterrupt:
        return 0
