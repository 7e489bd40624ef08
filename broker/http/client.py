"""The forwarding client: HTTP/1.1 to upstreams over a pool of keep-alive connections.

Owns: one pool of idle connections per origin (scheme, host, port), writing a request (its
body buffered or streamed with flow control), reading the answer's head and body framing
(Content-Length, chunked, or until close; RFC 9112 §6.3), gzip/deflate decoding with bounded
output, and putting a connection back only when its answer was read to the end. Why not
aiohttp's client: on the forwarding path it cost about 150 µs of CPU per request on the 2-core
bench VM, three quarters of the broker's whole cost; this does the same job in a fraction.
Must never: reuse a connection whose framing is in doubt, follow a redirect, read an answer
into memory whole, or let bytes after a finished answer pass as the next one's.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from broker.http import framing

MAX_HEAD = 128 * 1024  # status line and headers of one answer
READ_HIGH = 256 * 1024  # body bytes held for a slow agent before the upstream is paused
DECODE_STEP = 64 * 1024  # decoded bytes produced per step: a small gzip cannot balloon in memory
WRITE_STEP = 64 * 1024
DRAIN_S = 1.0  # how long the end of an answer nobody reads is waited for, to keep its connection
DRAIN_BYTES = 256 * 1024  # and how much of it
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
NO_BODY_STATUS = framing.NO_BODY_STATUS


class UpstreamError(Exception):
    """The exchange with the upstream failed. `sent`: the request may have reached it."""

    sent = True


class ConnectFailed(UpstreamError):
    """No connection: nothing reached the upstream."""

    sent = False


class Disconnected(UpstreamError):
    """The connection ended before an answer began. `reused`: it was an idle pooled one."""

    def __init__(self, message: str, reused: bool) -> None:
        super().__init__(message)
        self.reused = reused


class BadAnswer(UpstreamError):
    """The upstream's bytes are not HTTP/1.1 this client accepts."""


class BodyBroken(UpstreamError):
    """The answer's body ended early or was malformed after its head went out."""


class TimedOut(UpstreamError):
    """No answer head within the request's timeout."""


def _bad(msg: str) -> BadAnswer:
    return BadAnswer(msg)


def _decoder(encoding: str, first: bytes) -> Any:
    """A zlib decompressobj for a gzip or deflate body beginning with `first`."""
    if encoding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # "deflate" is zlib-wrapped by the RFC, raw in the wild: the first byte tells
    return zlib.decompressobj(zlib.MAX_WBITS if (first[0] & 0x0F) == 8 else -zlib.MAX_WBITS)


class Response:
    """One upstream answer: status and headers at once, the body as it arrives."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_decoder",
        "_drain_timer",
        "_eof",
        "_exc",
        "_held",
        "_loop",
        "_tail",
        "_waiter",
        "headers",
        "keep_alive",
        "status",
    )  # fmt: skip

    def __init__(self, status: int, headers: CIMultiDictProxy[str], keep_alive: bool, conn: _Conn) -> None:
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        self._conn: _Conn | None = conn
        self._loop = conn.loop
        self._chunks: collections.deque[bytes] = collections.deque()
        self._held = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_timer: asyncio.TimerHandle | None = None  # set while the rest is thrown away
        self._decoder: Any = None  # zlib decompressobj, made on the first body bytes
        self._tail = b""  # compressed bytes the decoder has not taken yet
        encoding = headers.get("Content-Encoding", "").strip().lower()
        self._decoder = encoding if encoding in ("gzip", "deflate") else None

    # -- fed by the connection
    def _feed(self, data: bytes) -> None:
        self._held += len(data)
        if self._drain_timer is not None:  # nobody reads it any more: count it, keep nothing
            if self._held > DRAIN_BYTES:
                self.close()
            return
        self._chunks.append(data)
        if self._held > READ_HIGH and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self, exc: BaseException | None = None) -> None:
        if self._eof:
            return
        self._eof = True
        self._exc = exc
        self._conn = None  # done with it: back in the pool, or closed
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def failed(self) -> bool:
        """The answer is known to be broken already (a malformed chunk right after the head)."""
        return self._eof and self._exc is not None

    # -- read by the proxy
    async def iter_any(self) -> AsyncIterator[bytes]:
        """The body's bytes, decoded, as they come; BodyBroken if it ends early or is malformed."""
        while True:
            raw = await self._next_raw()
            if raw is None:
                break
            out = self._decode(raw) if self._decoder is not None else raw
            if out:
                yield out
            while self._tail:  # what a step left: at most DECODE_STEP more each time
                out = self._decode(b"")
                if out:
                    yield out
        if self._decoder is not None and not isinstance(self._decoder, str):
            tail = self._decoder.flush()
            if not self._decoder.eof:
                raise BodyBroken(f"the {self.headers.get('Content-Encoding')} body ended early")
            if tail:
                yield tail

    async def _next_raw(self) -> bytes | None:
        while not self._chunks:
            if self._drain_timer is not None:  # released while read: whoever reads has left
                raise BodyBroken("the answer was released")
            if self._eof:
                if self._exc is not None:
                    raise self._exc
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft()
        self._held -= len(data)
        if self._held <= READ_HIGH // 4 and self._conn is not None:
            self._conn.resume()
        return data

    def whole(self, limit: int) -> bytes | None:
        """The whole decoded body, if all of it has arrived and decodes to at most `limit` bytes.

        None otherwise, with nothing consumed: the body is then read with iter_any().
        """
        if not self._eof or self._exc is not None or self._tail or not isinstance(self._decoder, str | None):
            return None
        chunks = self._chunks
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self._decoder is None or not raw:
            if len(raw) > limit:
                return None
            out = raw
        else:
            d = _decoder(self._decoder, raw)
            try:
                out = d.decompress(raw, limit + 1)
            except zlib.error:
                return None  # iter_any() says so
            if len(out) > limit or d.unconsumed_tail or not d.eof:
                return None
        chunks.clear()
        self._held = 0
        return out

    def _decode(self, data: bytes) -> bytes:
        d = self._decoder
        if isinstance(d, str):
            if not data:
                return b""
            d = self._decoder = _decoder(d, data)
        try:
            out: bytes = d.decompress(self._tail + data, DECODE_STEP)
        except zlib.error:
            self.close()
            raise BodyBroken(f"the {self.headers.get('Content-Encoding')} body does not decode") from None
        self._tail = d.unconsumed_tail
        return out

    def release(self) -> None:
        """Done with the answer. If its body was not read to the end, what is left is read and
        thrown away for a moment (up to DRAIN_BYTES within DRAIN_S) so that the connection can
        serve the next request; an answer that goes on longer closes it.

        Why: an MCP client in the 2025-11-25 style hangs up as soon as its answer's event
        arrives, a moment before the upstream ends that SSE stream; closing then cost every
        next call a new upstream connection.
        """
        if self._eof or self._drain_timer is not None:
            return
        conn = self._conn
        if conn is None or not self.keep_alive:
            self.close()
            return
        self._chunks.clear()
        self._tail = b""
        self._held = 0
        self._drain_timer = self._loop.call_later(DRAIN_S, self.close)
        conn.resume()
        self._wake()  # a reader still waiting (a stream whose agent left) stops now

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        if not self._eof:
            self._finish(BodyBroken("the answer was closed"))


class _Stop(Exception):
    """Raised in an llhttp callback to stop reading: what follows is not ours to read."""


class _Conn(asyncio.Protocol):
    """One connection to an upstream: a request at a time, its answer read by llhttp as bytes
    arrive (the `on_*` methods are llhttp's callbacks), with the broker's own checks on top."""

    def __init__(self, pool: Pool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.loop = pool._loop()
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.writing = False  # a streamed upload is under way: an answer now spoils the framing
        self.idle_since = 0.0  # loop time it went back into the pool
        self._parser = httptools.HttpResponseParser(self)
        # RFC 9112 §7.1.1 allows blanks (BWS) between a chunk size and its extensions
        self._parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self._head: asyncio.Future[Response] | None = None
        self._head_request = False  # the request was HEAD: no body follows any answer
        self._resp: Response | None = None  # the answer whose body is being read
        self._pairs: list[tuple[str, str]] = []
        self._in_head = False
        self._head_size = 0  # bytes of the fields llhttp handed over, head or trailers: exact
        self._head_fed = 0  # bytes fed while the head is incomplete: bounds a field llhttp still holds
        self._framing = 0  # bytes fed while reading a body that were not body: chunk lines, trailers
        self._chunks = 0
        self._interim = False  # the message being read is a 1xx, skipped
        self._close_delimited = False
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a request is one write

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(Disconnected("the upstream closed the connection", self.reused))
        if self._head is not None and not self._head.done():
            self._head.set_exception(
                Disconnected("the upstream closed the connection before answering", self.reused)
            )
        resp, self._resp = self._resp, None
        if resp is not None:
            if self._close_delimited:
                resp._finish()  # the close is the end of this body
            else:
                resp._finish(BodyBroken("the upstream closed the connection mid-answer"))

    def pause_writing(self) -> None:
        if self._drain is None or self._drain.done():
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        in_body = self._resp is not None
        if not in_body and not self._in_head and data[:1] in (b"\r", b"\n"):
            # llhttp skips blank lines before a status line; the broker takes none
            self._fail(_bad("the upstream's answer does not begin with its status line"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(_bad("the upstream switched protocols, which the broker never asked for"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Stop):
                self.abort()  # the answer is whole; what came after it is nobody's
            elif isinstance(cause, UpstreamError):
                self._fail(cause)
            elif self._resp is not None or in_body:
                self._fail(BodyBroken(f"the upstream's answer body is malformed: {exc}"))
            else:
                self._fail(_bad(f"the upstream's answer is malformed: {exc}"))
            return
        if self._in_head:
            self._head_fed += len(data)  # llhttp holds a field being read: bound it as it grows
            if self._head_fed > MAX_HEAD:
                self._fail(_bad("the upstream's answer head is too large"))
        elif self._resp is not None:
            self._framing += len(data)
            if self._framing > (self._chunks + 1) * MAX_CHUNK_LINE + MAX_HEAD:
                self._fail(BodyBroken("the upstream's chunk extensions or trailers are too large"))

    def eof_received(self) -> bool | None:
        return None  # a half-close ends the connection

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        if self._head is None or self._head.done():
            raise _Stop  # bytes nobody asked for: the connection is not used again
        self._in_head = True
        self._pairs = []
        self._head_size = self._head_fed = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_size = self._head_size + len(name) + len(value) + 4
        if size > MAX_HEAD:
            raise _bad("the upstream's answer head is too large")
        if self._in_head:
            self._pairs.append((name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")))
        # else: a trailer field, read and bounded, never passed on

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        status = parser.get_status_code()
        if parser.get_http_version() not in ("1.1", "1.0") or status < 100:
            raise _bad("the upstream's status line is not HTTP/1.x")
        if status < 200:
            if status == 101:
                raise _bad("the upstream switched protocols, which the broker never asked for")
            self._interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        headers = CIMultiDictProxy(CIMultiDict(self._pairs))
        if "Transfer-Encoding" in headers:
            te = headers.getall("Transfer-Encoding")
            if len(te) != 1 or te[0].lower() != "chunked":
                raise _bad("the upstream used a transfer coding other than exactly `chunked`")
        if "Content-Encoding" in headers:
            ce = headers.getall("Content-Encoding")
            if len(ce) != 1 or ce[0].lower() not in ("gzip", "deflate", "identity"):
                # bytes the broker cannot decode cannot be scrubbed: they never reach the agent
                raise _bad("the upstream used several, empty or unknown Content-Encoding values")
        if "Content-Length" in headers and len(headers["Content-Length"]) > 15:
            raise _bad("the upstream's Content-Length is out of range")
        # HTTP/1.0 connections are not kept, whatever they say: few servers of 1.0 mean it
        keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        no_body = self._head_request or status in NO_BODY_STATUS
        self._close_delimited = not no_body and not (
            "Transfer-Encoding" in headers or "Content-Length" in headers
        )
        if self._close_delimited:
            keep_alive = False
        if self._head_request:
            keep_alive = False  # llhttp would wait for the body a HEAD answer only describes
        resp = Response(status, headers, keep_alive, self)
        head_future, self._head = self._head, None
        self._framing = 0
        self._chunks = 0
        self._resp = resp
        if head_future is not None and not head_future.done():
            head_future.set_result(resp)
        if self.writing and self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # an upload waiting on a full socket: the answer came first
        if self._head_request:
            self._complete(resp)
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        resp = self._resp
        if resp is not None:
            resp._feed(body)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp = self._resp
        if resp is not None:
            self._complete(resp)

    # -- used by the pool and the response
    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool.forget(self)

    async def drain(self) -> None:
        if self._drain is not None:
            await self._drain

    def begin(self, head_request: bool) -> asyncio.Future[Response]:
        """Expect an answer to a request about to be written."""
        self._head = self.loop.create_future()
        self._head_request = head_request
        return self._head

    def _fail(self, exc: UpstreamError) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        resp, self._resp = self._resp, None
        if resp is not None:
            resp._finish(BodyBroken(str(exc)) if not isinstance(exc, BodyBroken) else exc)
        self.abort()

    def _complete(self, resp: Response) -> None:
        """The answer was read to its end: hand the connection back (or close it)."""
        self._resp = None
        resp._finish()
        # an answer before the whole request went out: not reusable
        if resp.keep_alive and not self.closed and not self.writing:
            self.resume()
            self.pool.put(self)
        else:
            self.abort()


class Pool:
    """Keep-alive connections by origin; none is shared by two requests at once."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, keepalive: float = 30.0) -> None:
        self.keepalive = keepalive
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._all: set[_Conn] = set()
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

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        return loop

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # the system's trust store (SSL_CERT_FILE/SSL_CERT_DIR honoured), hostname checked
            self._ssl = ssl.create_default_context()
        return self._ssl

    def put(self, conn: _Conn) -> None:
        conn.reused = True
        loop = self._loop()
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
        too_old = self._loop().time() - self.keepalive
        for idle in list(self._idle.values()):
            for conn in [c for c in idle if c.idle_since <= too_old]:
                conn.abort()  # forget() takes it off the list
        if any(self._idle.values()):
            self._sweeper = self._loop().call_later(self.keepalive / 2, self._sweep)

    def forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    async def _connect(self, key: tuple[str, str, int], connect_timeout: float) -> _Conn:
        scheme, host, port = key
        loop = self._loop()
        tls = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, key),
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

        loop = self._loop()
        task = asyncio.current_task(loop)
        assert task is not None
        conn: _Conn | None = None
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
            self._ticker = self._loop().call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._ticker = None
        now = self._loop().time()
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
            self._ticker = self._loop().call_at(earliest, self._tick)

    async def _stream_body(
        self,
        conn: _Conn,
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
