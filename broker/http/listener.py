"""The agents' listeners: every connection the daemon accepts, the handler they call, closing
idle ones, and shutting down.

Owns: listening on TCP and unix sockets, the one sweep timer that closes idle connections, the
per-server Date header, the request-head limits as the config sets them, and draining at
shutdown. The connections themselves are server.py's. Must never: know about routes or
AgentCard; the handler decides everything about a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable
from typing import Any

from broker.http.agent_messages import DateHeader
from broker.http.framing import REQUEST_LINE_MAX
from broker.http.server import AgentConnection, Handler

FIRST_REQUEST_S = 1.0  # at shutdown, a connection with no request yet has this long to send one
KEEPALIVE_S = 75.0  # an idle connection, or one whose request head never completes, is closed after this
SWEEP_S = 5.0  # how often idle connections are looked for
BACKLOG = 1024


class AgentServer:
    """Every listener's connections, the handler they call, and shutting them down."""

    def __init__(
        self,
        handler: Handler,
        max_header_bytes: Callable[[], int],
        on_connect: Callable[[asyncio.Transport], object] | None = None,
        body_idle: Callable[[], float] = lambda: 300.0,
    ) -> None:
        self.handler = handler
        self.body_idle = body_idle  # seconds a body the broker reads may stall (timeouts.idle)
        self.on_connect = on_connect
        self._max_header_bytes = max_header_bytes
        self.connections: set[AgentConnection] = set()
        self.date = DateHeader()
        self.listeners: list[asyncio.Server] = []
        self.loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep()

    def max_fields(self) -> int:
        """The bytes of header (or trailer) fields allowed, each counted as name + value + 4."""
        return self._max_header_bytes()

    def max_head(self) -> int:
        """The raw bytes of a head still being read: the fields and the request line."""
        return self._max_header_bytes() + REQUEST_LINE_MAX

    def protocol(self) -> AgentConnection:
        return AgentConnection(self)

    def _sweep(self) -> None:
        """Close connections idle (no request being answered) for KEEPALIVE_S: one timer for all."""
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.idle and now - conn.idle_since > KEEPALIVE_S:
                conn.expire()
        self._sweeper = self.loop.call_later(SWEEP_S, self._sweep)

    async def listen_tcp(self, host: str, port: int) -> asyncio.Server:
        server = await self.loop.create_server(self.protocol, host, port, reuse_address=True, backlog=BACKLOG)
        self.listeners.append(server)
        return server

    async def listen_unix(self, path: str) -> asyncio.Server:
        server = await self.loop.create_unix_server(self.protocol, path, backlog=BACKLOG)
        self.listeners.append(server)
        return server

    async def stop_listening(self, server: asyncio.Server) -> None:
        server.close()
        with contextlib.suppress(ValueError):
            self.listeners.remove(server)

    def addresses(self) -> list[Any]:
        return [sock.getsockname() for server in self.listeners for sock in server.sockets]

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish for up to `grace` s, close the rest.

        A client that connected just before (its connection still in the kernel's backlog, or
        accepted with its request not yet sent) has sent, or is sending, a request it expects to
        be read: closing on it would make a reverse proxy answer 502 rather than send a POST
        again. Those are accepted and their first request served (FIRST_REQUEST_S at most to
        arrive); connections idle after an answer are closed at once, as a client expects of
        keep-alive."""
        queued: list[socket.socket] = []
        for server in self.listeners:
            queued += self._take_backlog(server)
            server.close()
        self.listeners.clear()
        await asyncio.gather(*(self._serve_adopted(conn) for conn in queued))
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = self.loop
        deadline = loop.time() + grace
        first_by = loop.time() + min(FIRST_REQUEST_S, grace)
        for conn in list(self.connections):
            conn.closing = True  # each closes after its current answer
            if conn.idle and not conn.fresh:
                conn.close()
        while True:
            now = loop.time()
            for conn in self.connections:
                conn.closing = True  # the adopted ones too, once they are set up
            if now >= first_by:
                for conn in list(self.connections):
                    if conn.idle and conn.fresh:
                        conn.close()  # its request never came
            busy = {c._task for c in self.connections if c._task is not None and not c._task.done()}
            waiting = now < first_by and any(c.idle and c.fresh for c in self.connections)
            if (not busy and not waiting) or now >= deadline:
                break
            if busy:
                await asyncio.wait(busy, timeout=min(0.05, deadline - now))
            else:
                await asyncio.sleep(0.01)
        left = {c._task for c in self.connections if c._task is not None and not c._task.done()}
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)

    def _take_backlog(self, server: asyncio.Server) -> list[socket.socket]:
        """Accept what the kernel already accepted for this listener, before it closes (closing a
        listening socket resets the connections still in its backlog)."""
        taken: list[socket.socket] = []
        for listening in server.sockets:
            try:
                dup = socket.socket(fileno=os.dup(listening.fileno()))
            except OSError:
                continue
            with dup:
                dup.setblocking(False)
                for _ in range(BACKLOG):
                    try:
                        conn, _ = dup.accept()
                    except OSError:  # BlockingIOError: none left
                        break
                    conn.setblocking(False)
                    taken.append(conn)
        return taken

    async def _serve_adopted(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.protocol, conn)
        except OSError:
            conn.close()
