"""The forwarding client: HTTP/1.1 to upstreams over a pool of keep-alive connections.

Owns: one pool of idle connections per origin (scheme, host, port), writing a request (its
body buffered or streamed with flow control), the deadline for an answer's head, and taking a
connection out of the pool only while it is fresh. Reading the answer is connection.py's, the
answer itself upstream_answer.py's. Why not aiohttp's client: on the forwarding path it cost
about 150 µs of CPU per request on the 2-core bench VM, three quarters of the broker's whole
cost; this does the same job in a fraction. Must never: reuse a connection whose framing is in
doubt, follow a redirect, or send a request whose head a field could split.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

from yarl import URL

from broker.http.connection import UpstreamConnection
from broker.http.upstream_answer import (
    BadAnswer,
    BodyBroken,
    ConnectFailed,
    Disconnected,
    Response,
    TimedOut,
    UpstreamError,
)

__all__ = [  # the upstream side as the rest of the broker imports it
    "BadAnswer", "BodyBroken", "ConnectFailed", "Disconnected", "Pool", "Response", "TimedOut",
    "UpstreamError",
]  # fmt: skip

WRITE_STEP = 64 * 1024  # a buffered body up to this goes out in the same write as the head


class Pool:
    """Keep-alive connections by origin; none is shared by two requests at once."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, keepalive: float = 30.0) -> None:
        self.keepalive = keepalive
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[UpstreamConnection]] = {}
        self._all: set[UpstreamConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._deadlines: dict[asyncio.Task[Any], float] = {}  # tasks waiting for an answer's head
        self._expired: set[asyncio.Task[Any]] = set()  # cancelled by their deadline
        self._ticker: asyncio.TimerHandle | None = None
        self._ticker_at = 0.0
        self.opened = 0  # connections made, for tests and the benchmarks
        # the loop, asked once: every asyncio.get_running_loop() and current_task() without a
        # loop is a getpid() system call on CPython 3.11 (its fork check), 2.8% of the daemon's
        # CPU in a py-spy profile under load
        self.loop: asyncio.AbstractEventLoop | None = None

    def get_loop(self) -> asyncio.AbstractEventLoop:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        return loop

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # the system's trust store (SSL_CERT_FILE/SSL_CERT_DIR honoured), hostname checked
            self._ssl = ssl.create_default_context()
        return self._ssl

    def put(self, conn: UpstreamConnection) -> None:
        conn.reused = True
        loop = self.get_loop()
        conn.idle_since = loop.time()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._sweeper is None:  # one timer for the pool, not one per request
            self._sweeper = loop.call_later(self.keepalive / 2, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than `keepalive`; come back while any are left."""
        self._sweeper = None
        too_old = self.get_loop().time() - self.keepalive
        for idle in list(self._idle.values()):
            for conn in [c for c in idle if c.idle_since <= too_old]:
                conn.abort()  # forget() takes it off the list
        if any(self._idle.values()):
            self._sweeper = self.get_loop().call_later(self.keepalive / 2, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def _connect(self, key: tuple[str, str, int], connect_timeout: float) -> UpstreamConnection:
        scheme, host, port = key
        loop = self.get_loop()
        tls = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self, key),
                    host,
                    port,
                    ssl=tls,
                    server_hostname=host if tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connecting took over {connect_timeout:g}s") from None
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS failed: {exc.reason or type(exc).__name__}") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {exc.strerror or type(exc).__name__}") from None
        self.opened += 1
        self._all.add(conn)
        return conn

    async def request(
        self,
        method: str,
        url: URL,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
        *,
        length: int | None = None,
        connect_timeout: float = 10.0,
        head_timeout: float | None = None,
    ) -> Response:
        """Send one request and return once the answer's head arrived.

        `body`: bytes, or an iterator streamed with `length` as its Content-Length (chunked
        when None), or None for no body. `headers` must carry no framing or Host field.
        `head_timeout`: seconds from the last byte of the request sent until the head must have
        arrived (and the longest an upload may wait on an upstream not taking it); past it,
        TimedOut and the connection is closed.
        """
        scheme = url.scheme
        host = url.raw_host or ""
        port = url.port or (443 if scheme == "https" else 80)
        default = port == (443 if scheme == "https" else 80)
        host_field = (f"[{host}]" if ":" in host else host) + ("" if default else f":{port}")
        parts = [f"{method} {url.raw_path_qs} HTTP/1.1\r\nHost: {host_field}\r\n"]
        parts += [f"{name}: {value}\r\n" for name, value in headers]
        streamed = body is not None and not isinstance(body, bytes)
        if isinstance(body, bytes):
            if body or method not in ("GET", "HEAD", "OPTIONS", "DELETE", "TRACE"):
                parts.append(f"Content-Length: {len(body)}\r\n")
        elif streamed:
            parts.append(
                "Transfer-Encoding: chunked\r\n" if length is None else f"Content-Length: {length}\r\n"
            )
        elif method in ("POST", "PUT", "PATCH"):
            parts.append("Content-Length: 0\r\n")
        parts.append("\r\n")
        head = "".join(parts)
        lines = len(parts) + 1  # the first part holds two lines
        if head.count("\n") != lines or head.count("\r") != lines:
            raise UpstreamError("a header carried a line break")  # nothing sent, nothing opened
        raw = head.encode("latin-1")

        loop = self.get_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        conn: UpstreamConnection | None = None
        waiter: asyncio.Future[Response] | None = None
        try:
            key = (scheme, host, port)
            idle = self._idle.get(key)
            while idle:  # the most recently used connection first: the least likely to be stale
                conn = idle.pop()
                if not conn.closed:
                    if loop.time() - conn.idle_since < self.keepalive:
                        break
                    conn.abort()  # idle too long: the upstream may be closing it right now
                conn = None
            if conn is None:
                conn = await self._connect(key, connect_timeout)
            waiter = conn.begin(method == "HEAD")
            transport = conn.transport
            assert transport is not None
            if isinstance(body, bytes) and body:
                transport.write(raw + body if len(body) <= WRITE_STEP else raw)
                if len(body) > WRITE_STEP:
                    transport.write(body)
            else:
                transport.write(raw)
            if streamed:
                assert body is not None and not isinstance(body, bytes)
                conn.writing = True
                await self._stream_body(
                    conn, body, chunked=length is None, length=length, waiter=waiter, stall=head_timeout
                )
                if not waiter.done():
                    conn.writing = False  # all of it went out before any answer: reusable
            if head_timeout is not None and not waiter.done():
                # counted from the last byte sent: a slow, healthy upload is no slow upstream
                self._watch(task, loop.time() + head_timeout)
            return await waiter
        except BaseException as exc:
            if conn is not None:
                conn.abort()
            if waiter is not None:
                if not waiter.done():
                    waiter.cancel()
                elif not waiter.cancelled():
                    waiter.exception()  # retrieved: the caller sees the error it is given here
            if isinstance(exc, asyncio.CancelledError) and task in self._expired:
                self._expired.discard(task)
                if task.uncancel() == 0:  # the cancel was the deadline's, and only its
                    raise TimedOut(f"no answer within {head_timeout:g}s") from None
            raise
        finally:
            if head_timeout is not None:
                self._deadlines.pop(task, None)

    def _watch(self, task: asyncio.Task[Any], deadline: float) -> None:
        """Cancel `task` at `deadline` unless it is off the list by then: one timer for the pool."""
        self._deadlines[task] = deadline
        if self._ticker is None or deadline < self._ticker_at:
            if self._ticker is not None:
                self._ticker.cancel()
            self._ticker_at = deadline
            self._ticker = self.get_loop().call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        now = self.get_loop().time()
        earliest: float | None = None
        for task, deadline in list(self._deadlines.items()):
            if deadline <= now:
                del self._deadlines[task]
                self._expired.add(task)
                task.cancel()
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._ticker_at = earliest
            self._ticker = self.get_loop().call_at(earliest, self._tick)

    async def _stream_body(
        self,
        conn: UpstreamConnection,
        body: AsyncIterator[bytes],
        *,
        chunked: bool,
        length: int | None,
        waiter: asyncio.Future[Response],
        stall: float | None,
    ) -> None:
        assert conn.transport is not None
        sent = 0
        async for chunk in body:
            if waiter.done():
                return  # the upstream answered before taking it all (e.g. 413): stop sending
            if not chunk:
                continue
            sent += len(chunk)
            if length is not None and sent > length:
                raise UpstreamError("the agent sent more than its Content-Length")
            conn.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            try:
                if conn._drain is not None:
                    try:
                        async with asyncio.timeout(stall):
                            await conn.drain()
                    except TimeoutError:
                        raise TimedOut(f"the upstream took no request bytes for {stall:g}s") from None
            except Disconnected:
                if waiter.done():
                    return  # it answered, then closed: the answer is what counts
                raise
            if waiter.done():
                return
            if conn.closed:
                raise Disconnected("the upstream closed the connection during the upload", False)
        if length is not None and sent != length:
            raise UpstreamError("the agent's body ended before its Content-Length")
        if chunked:
            conn.transport.write(b"0\r\n\r\n")

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def close(self) -> None:
        for timer in (self._sweeper, self._ticker):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._ticker = None
        for conn in list(self._all):
            conn.abort()
        self._idle.clear()
