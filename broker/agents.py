"""The agents' side of the broker: an HTTP/1.1 server written on asyncio's Protocol API.

Owns: reading agents' requests (strict RFC 9112 parsing: one request line, field lines without
obs-fold, bare CR/LF or NUL, a head size limit), request bodies with flow control (Content-Length
or chunked; any other or ambiguous framing is refused), keep-alive and pipelined requests one at a
time, writing answers (whole in one write, or streamed: chunked for HTTP/1.1, close-delimited for
HTTP/1.0), `100 Continue` when asked, closing idle connections, and shutting down with in-flight
requests given time to finish. Must never: guess a request's framing, leave an unread body on a
connection that is reused, or put anything but the handler's answer on the wire.

aiohttp's web server did this before; at the broker's request rates its per-request machinery was
about a third of the broker's CPU, and at low rates (each request finding cold caches) every line
run per request counts. What remains here is what the broker uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from typing import Any, cast

import structlog
from multidict import CIMultiDict, CIMultiDictProxy, MultiDictProxy
from yarl import URL

from broker import http1
from broker.errors import ERROR_HEADER, BrokerError, error_body, error_response

log = structlog.get_logger("broker")

KEEPALIVE_S = 75.0  # an idle connection, or one whose request head never completes, is closed after this
SWEEP_S = 5.0  # how often idle connections are looked for
REQUEST_LINE_MAX = 8 * 1024  # allowed on top of limits.max_header_bytes for the request line
BODY_HIGH = 256 * 1024  # request body bytes held before the agent's socket is paused
BACKLOG = 1024
NO_BODY_STATUS = frozenset({204, 304})
REASONS = {s.value: s.phrase for s in http.HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_REQUEST_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([^\x00-\x20\x7f]+) HTTP/1\.([01])(?=\r\n|$)")
_CTL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # control characters a field may not hold


class BadRequest(Exception):
    """A request the broker cannot read: answered with `status` and the connection closed."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class AgentGone(ConnectionResetError):
    """The agent closed its connection."""


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


# ---------------------------------------------------------------- request bodies


class Body:
    """A request body as it arrives: `iter_any()` yields chunks, bounded by BODY_HIGH in memory."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_error",
        "_held",
        "_left",
        "_line",
        "_parts",
        "_state",
        "_waiter",
        "done",
    )

    def __init__(self, conn: AgentConnection | None, length: int, chunked: bool) -> None:
        self._conn = conn
        self._left = length  # Content-Length bytes still to come, or the current chunk's rest
        self._chunked = chunked
        self._state = 0  # chunked: 0 size line, 1 data, 2 CRLF after data, 3 trailer lines
        self._line = b""
        self._parts: deque[bytes] = deque()
        self._held = 0
        self.done = not chunked and length == 0
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> bytes:
        """Take this body's bytes from `data`; return what follows it (a pipelined request)."""
        if not self._chunked:
            n = self._left
            take, rest = (data, b"") if len(data) <= n else (data[:n], data[n:])
            self._left = n - len(take)
            self._push(take)
            if self._left == 0:
                self._finish()
            return rest
        return self._feed_chunked(data)

    def _feed_chunked(self, data: bytes) -> bytes:
        pos = 0
        end = len(data)
        while pos < end and not self.done:
            if self._state == 1:  # chunk data
                take = min(self._left, end - pos)
                self._push(data[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._state = 2
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._line += data[pos:]
                if len(self._line) > http1.MAX_CHUNK_LINE:
                    raise BadRequest("a chunk-size or trailer line is too long")
                return b""
            line = self._line + data[pos:nl]
            self._line = b""
            pos = nl + 1
            if not line.endswith(b"\r") or b"\r" in line[:-1]:
                raise BadRequest("a chunked body line does not end with CRLF")
            line = line[:-1]
            if len(line) > http1.MAX_CHUNK_LINE:
                raise BadRequest("a chunk-size or trailer line is too long")
            if self._state == 0:
                size = line.split(b";", 1)[0]
                if not size or len(size) > 16 or not set(size) <= http1.HEX:
                    raise BadRequest("a chunk size is not hexadecimal")
                self._left = int(size, 16)
                self._state = 1 if self._left else 3
            elif self._state == 2:
                if line:
                    raise BadRequest("a chunk is longer than its size says")
                self._state = 0
            elif not line:  # state 3: the empty line after the trailers ends the body
                self._finish()
        return data[pos:]

    def _push(self, data: bytes) -> None:
        if data:
            self._parts.append(data)
            self._held += len(data)
            if self._held > BODY_HIGH and self._conn is not None:
                self._conn.pause_reading()
            self._wake()

    def _finish(self) -> None:
        self.done = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if not self.done:
            self._error = exc
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def readany(self) -> bytes:
        while True:
            if self._parts:
                data = self._parts.popleft()
                self._held -= len(data)
                if self._held <= BODY_HIGH // 2 and self._conn is not None:
                    self._conn.resume_reading()
                return data
            if self.done:
                return b""
            if self._error is not None:
                raise self._error
            if self._conn is not None:
                self._conn.resume_reading()  # nothing is held: whatever paused reading, read now
                self._conn.body_wanted()
            loop = self._conn.server.loop if self._conn is not None else asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_any()])


_NO_BODY = Body(None, 0, False)


# ---------------------------------------------------------------- requests


class Request:
    """One agent request: what the broker's checks, policies and forwarding read."""

    __slots__ = (
        "_conn",
        "_continue_sent",
        "body_exists",
        "content",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "on_gone",
        "raw_headers",
        "raw_path",
        "version",
    )  # fmt: skip

    def __init__(
        self,
        conn: AgentConnection,
        method: str,
        raw_path: str,
        version: tuple[int, int],
        pairs: list[tuple[str, str]],
    ) -> None:
        self._conn = conn
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.raw_headers = pairs
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(pairs))
        self.content = _NO_BODY
        self.content_length: int | None = None
        self.body_exists = False
        self._continue_sent = False
        # called when the agent's connection is lost while this request is answered: a stream
        # waiting on a quiet upstream stops waiting
        self.on_gone: Callable[[], object] | None = None
        listed = http1.tokens(self.headers.getall("Connection")) if "Connection" in self.headers else ()
        # HTTP/1.1 stays open unless told `close`; HTTP/1.0 only when told `keep-alive`
        self.keep_alive = "close" not in listed if version == (1, 1) else "keep-alive" in listed

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._conn.transport

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The serving loop, without asyncio.get_running_loop()'s getpid() system call."""
        return self._conn.server.loop

    @property
    def gone(self) -> bool:
        """The agent's connection is lost."""
        return self._conn._lost

    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type")
        return value.split(";", 1)[0].strip().lower() if value else "application/octet-stream"

    @property
    def query(self) -> MultiDictProxy[str]:
        try:
            return URL(self.raw_path, encoded=True).query
        except ValueError:  # a policy must not see an empty query where it cannot read one
            raise BrokerError("bad_request", "the query string cannot be parsed") from None

    def send_continue(self) -> None:
        """`100 Continue`, once, to an agent that asked for it before sending its body."""
        if not self._continue_sent and not self.content.done:
            self._continue_sent = True
            self._conn.write(CONTINUE)


def parse_head(conn: AgentConnection, head: bytes) -> Request:
    """A request from its head (request line and field lines, without the final CRLF CRLF)."""
    text = head.decode("latin-1")
    m = _REQUEST_LINE.match(text)
    if m is None:
        raise BadRequest("the request line is not `METHOD target HTTP/1.x`")
    pairs = http1.field_lines(text[m.end() :], _CTL)
    if pairs is None:
        raise BadRequest(
            "a header line is malformed (obs-fold, a space before the colon, a bare CR or LF, a control"
            " character)"
        )
    req = Request(conn, m.group(1), m.group(2), (1, int(m.group(3))), pairs)
    headers = req.headers
    te = headers.getall("Transfer-Encoding", None)
    lengths = headers.getall("Content-Length", None)
    if te is not None:
        if lengths is not None:
            raise BadRequest("both Transfer-Encoding and Content-Length: the framing is ambiguous")
        codings = http1.tokens(te)
        if codings != ["chunked"] or req.version < (1, 1):
            raise BadRequest(
                "only Transfer-Encoding: chunked is accepted (HTTP/1.1)", 501 if codings else 400
            )
        req.content = Body(conn, 0, True)
        req.body_exists = True
    elif lengths is not None:
        req.content_length = http1.content_length(lengths)
        if req.content_length is None:
            raise BadRequest("the Content-Length is invalid")
        if req.content_length:
            req.content = Body(conn, req.content_length, False)
            req.body_exists = True
    return req


# ---------------------------------------------------------------- responses


class StreamResponse:
    """An answer written as it goes: head at prepare(), then write() chunks, then write_eof()."""

    _send_headers_immediately = True

    def __init__(self, status: int = 200, headers: Any = None) -> None:
        self.status = status
        # a CIMultiDict is taken as it is (the caller hands it over), anything else is copied
        self.headers: CIMultiDict[str] = (
            headers if type(headers) is CIMultiDict else CIMultiDict(headers or ())
        )
        self.prepared = False
        self._conn: AgentConnection | None = None
        self._chunked = False
        self._no_body = False
        self._pending: bytes | None = None  # the head, when it waits for the first body bytes
        self._eof = False

    async def prepare(self, request: Request) -> None:
        if self.prepared:
            return
        conn = request._conn
        self._conn = conn
        self.prepared = True
        status = self.status
        headers = self.headers
        self._no_body = request.method == "HEAD" or status in NO_BODY_STATUS or status < 200
        if status in NO_BODY_STATUS:
            headers.popall("Content-Length", None)
            headers.popall("Transfer-Encoding", None)
        elif "Content-Length" not in headers and not (
            request.method == "HEAD" and "Transfer-Encoding" in headers
        ):
            headers.popall("Transfer-Encoding", None)
            if request.version >= (1, 1):
                if not self._no_body:
                    headers["Transfer-Encoding"] = "chunked"
                    self._chunked = True
            elif not self._no_body:
                request.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        if not request.content.done:
            request.keep_alive = False  # the rest of an unread body ends the connection
        if not request.keep_alive or conn.closing:
            request.keep_alive = False
            headers["Connection"] = "close"
        elif request.version == (1, 0):
            headers["Connection"] = "keep-alive"
        if "Date" not in headers:
            headers["Date"] = http_date()
        reason = REASONS.get(status, "Unknown")
        lines = [f"HTTP/1.{request.version[1]} {status} {reason}\r\n"]  # 1.0 answered in 1.0
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        lines.append("\r\n")
        text = "".join(lines)
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):  # one check for all
            bad = next((n for n, v in headers.items() if "\r" in v + n or "\n" in v + n), "?")
            self.prepared, self._conn = False, None  # nothing went out: another answer can
            raise ValueError(f"header {bad!r} holds a line break")
        head = text.encode("latin-1", "replace")
        conn.answering = True
        if self._send_headers_immediately:
            conn.write(head)
        else:
            self._pending = head

    def _framed(self, data: bytes) -> bytes:
        if self._no_body or not data:
            return b""
        return b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data

    async def write(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None, "prepare() first"
        out = self._framed(data)
        if self._pending is not None:
            out, self._pending = self._pending + out, None
        if out:
            conn.write(out)
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof:
            return
        self._eof = True
        conn = self._conn
        assert conn is not None, "prepare() first"
        out = self._framed(data)
        if self._chunked:
            out += b"0\r\n\r\n"
        if self._pending is not None:
            out, self._pending = self._pending + out, None
        if out:
            conn.write(out)


class HeadersWithBody(StreamResponse):
    """A streamed answer whose head waits for the first body bytes (one write, not two)."""

    _send_headers_immediately = False


class Response(HeadersWithBody):
    """A whole answer: head and body in one write."""

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes = b"",
        text: str | None = None,
        content_type: str | None = None,
        charset: str | None = None,
        headers: Any = None,
    ) -> None:
        super().__init__(status, headers)
        if text is not None:
            charset = charset or "utf-8"
            body = text.encode(charset)
        if content_type is not None:
            self.headers["Content-Type"] = f"{content_type}; charset={charset}" if charset else content_type
        self.body = body
        self.headers["Content-Length"] = str(len(body))

    async def write_eof(self, data: bytes = b"") -> None:
        await super().write_eof(data or self.body)


# ---------------------------------------------------------------- connections


Handler = Callable[[Request], Awaitable[StreamResponse]]


class AgentConnection(asyncio.Protocol):
    """One agent connection: reads requests one at a time, writes each answer, keeps alive."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.closing = False  # set at shutdown: close after the current answer
        self.idle_since = 0.0
        self._buf = bytearray()
        self._request: Request | None = None  # the request being answered
        self._body: Body | None = None  # its body, while it is still arriving
        self._task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._lost = False
        self._eof = False  # the agent sent all it will send
        self.answering = False  # the current answer's head went out

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        self.idle_since = self.server.loop.time()
        self.server.connections.add(self)
        if self.server.on_connect is not None:
            # per-connection lookups (who the peer is, which listener) while the agent is still
            # writing its request, rather than after it arrived
            try:
                self.server.on_connect(self.transport)
            except Exception:
                log.warning("broker.connection_lookup_failed", exc_info=True)

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            try:
                rest = body.feed(data)
            except BadRequest as exc:
                # whoever reads the body answers 400 (a BrokerError); nothing after it is read
                body.fail(BrokerError("bad_request", f"the request body cannot be read: {exc}"))
                self._body = None
                self._buf.clear()
                self.closing = True
                if self._request is not None:
                    self._request.keep_alive = False
                self.pause_reading()
                return
            if body.done:
                self._body = None
            if rest:
                self._buf += rest
            return
        self._buf += data
        if self._request is None:
            self._next_request()
        elif len(self._buf) > self.server.max_head():
            self.pause_reading()  # pipelined requests wait their turn: not held without bound

    def eof_received(self) -> bool | None:
        self._eof = True
        if self._body is not None:
            self._body.fail(AgentGone("the agent closed its connection before the body ended"))
            return None  # the transport closes itself
        if self._request is not None and not self.answering:
            # a half-close after a whole request (`nc -N`): answer it, then close. Once an
            # answer is under way (an SSE stream), an EOF is an agent that left: close now, so
            # the stream's next write ends it
            self._request.keep_alive = False
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self.server.connections.discard(self)
        req = self._request
        if req is not None and req.on_gone is not None:
            try:
                req.on_gone()
            except Exception:  # the connection is gone either way
                log.warning("broker.on_gone_failed", exc_info=True)
        if self._body is not None:
            self._body.fail(AgentGone("the agent closed its connection before the body ended"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(AgentGone("the agent closed its connection"))
            self._drain.exception()  # retrieved here: a writer awaiting it still gets it
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- used by requests, bodies and responses
    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise AgentGone("the agent closed its connection")
        transport.write(data)

    async def drain(self) -> None:
        if self._write_paused and not self._lost:
            if self._drain is None or self._drain.done():
                self._drain = self.server.loop.create_future()
            await self._drain
        if self._lost:
            raise AgentGone("the agent closed its connection")

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()

    def body_wanted(self) -> None:
        """A reader waits for body bytes: `100 Continue` if the agent waits for that first."""
        req = self._request
        if req is not None and not req._continue_sent and req.version >= (1, 1):
            expect = req.headers.get("Expect")
            if expect is not None and expect.lower() == "100-continue":
                req.send_continue()

    @property
    def idle(self) -> bool:
        return self._request is None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- requests
    def _next_request(self) -> None:
        buf = self._buf
        while buf[:2] == b"\r\n":  # RFC 9112 §2.2: empty lines before a request line are ignored
            del buf[:2]
        if not buf:
            return
        end = buf.find(b"\r\n\r\n")
        limit = self.server.max_head()
        if end < 0:
            if len(buf) > limit:
                self._reject(BadRequest("the request head is too large", 431))
            return
        if end > limit:
            self._reject(BadRequest("the request head is too large", 431))
            return
        head = bytes(buf[:end])
        del buf[: end + 4]
        try:
            req = parse_head(self, head)
        except BadRequest as exc:
            self._reject(exc)
            return
        self._request = req
        body = req.content
        if not body.done:
            self._body = body
            if buf:
                data = bytes(buf)
                buf.clear()
                self.data_received(data)
        if self._read_paused and (self._body is None or self._body._held <= BODY_HIGH):
            self.resume_reading()
        self._task = self.server.loop.create_task(self._respond(req))

    async def _respond(self, req: Request) -> None:
        try:
            try:
                resp = await self.server.handler(req)
            except ConnectionError:  # the agent left while its request was read or forwarded
                req.keep_alive = False
                return
            except Exception:
                log.exception("broker.request_failed", method=req.method)
                resp = _failed()
                req.keep_alive = False
            if not resp.prepared:
                try:
                    await resp.prepare(req)
                except ValueError:  # a header that cannot be written whole: nothing went out
                    log.exception("broker.request_failed", method=req.method)
                    resp = _failed()
                    req.keep_alive = False
                    await resp.prepare(req)
            await resp.write_eof()
            await self.drain()  # an agent not reading its answers gets no more of them queued
        except (ConnectionError, RuntimeError, ValueError):  # gone, or an answer it cannot write
            req.keep_alive = False
        finally:
            self._request = None
            self._task = None
            self._after(req)

    def _after(self, req: Request) -> None:
        """After an answer: close, or wait for (or read) the next request."""
        self.answering = False
        if not req.content.done:
            req.keep_alive = False  # an unread body would be read as the next request
            self._body = None
        if not req.keep_alive or self.closing or self._lost or self._eof:
            self.close()
            return
        self.idle_since = self.server.loop.time()
        if self._buf:
            self._next_request()
        elif self._read_paused:
            self.resume_reading()

    def _reject(self, exc: BadRequest) -> None:
        """Answer a request that cannot be read, then close: nothing after it can be trusted."""
        code = "request_too_large" if exc.status == 431 else "bad_request"
        body = error_body(BrokerError(code, str(exc)))
        reason = REASONS.get(exc.status, "Bad Request")
        head = (
            f"HTTP/1.1 {exc.status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{ERROR_HEADER}: {code}\r\nCache-Control: no-store\r\n"
            f"Date: {http_date()}\r\nConnection: close\r\n\r\n"
        )
        self._buf.clear()
        self.closing = True
        if self._request is None and self.transport is not None and not self.transport.is_closing():
            self.transport.write(head.encode() + body)
        self.close()


def _failed() -> Response:
    """The answer to a request the handler failed on (500; SPEC has no internal-error code)."""
    err = BrokerError("bad_request", "the broker failed to answer this request", http_status=500)
    return error_response(err)


class AgentServer:
    """Every listener's connections, the handler they call, and shutting them down."""

    def __init__(
        self,
        handler: Handler,
        max_header_bytes: Callable[[], int],
        on_connect: Callable[[asyncio.Transport], object] | None = None,
    ) -> None:
        self.handler = handler
        self.on_connect = on_connect
        self._max_header_bytes = max_header_bytes
        self.connections: set[AgentConnection] = set()
        self.listeners: list[asyncio.Server] = []
        self.loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep()

    def max_head(self) -> int:
        return self._max_header_bytes() + REQUEST_LINE_MAX

    def protocol(self) -> AgentConnection:
        return AgentConnection(self)

    def _sweep(self) -> None:
        """Close connections idle (no request being answered) for KEEPALIVE_S: one timer for all."""
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.idle and now - conn.idle_since > KEEPALIVE_S:
                conn.close()
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
        """Stop accepting, let requests in flight finish for up to `grace` s, close the rest."""
        for server in self.listeners:
            server.close()
        self.listeners.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.closing = True  # each closes after its current answer
            if conn.idle:
                conn.close()
        tasks = {c._task for c in self.connections if c._task is not None}
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        left = {c._task for c in self.connections if c._task is not None and not c._task.done()}
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)
