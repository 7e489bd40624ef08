"""The agents' side of the broker: an HTTP/1.1 server on asyncio's Protocol API, its framing
parsed by llhttp (through httptools, as uvicorn's `httptools_impl` does).

Owns: reading agents' requests (llhttp's strict parse, and on top of it what the broker refuses
that llhttp lets through: methods outside RFC 9110 + PATCH, targets that are not origin-form
VCHARs, a `#fragment`, `%00`, HTTP/0.9 and 2.0 request lines, transfer codings other than exactly
`chunked` or on HTTP/1.0, heads and trailers over the size limit), request bodies with flow control
and an inactivity clock, keep-alive and pipelined requests answered one at a time, writing answers
(whole in one write, or streamed: chunked for HTTP/1.1, close-delimited for HTTP/1.0) and holding
every answer to the Content-Length it declared, `100 Continue` when asked, closing idle connections
(a half-sent head gets 408 first), and shutting down with in-flight requests given time to finish.
Must never: guess a request's framing, leave an unread body on a connection that is reused, or put
anything but the handler's answer on the wire.
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

import httptools
import structlog
from multidict import CIMultiDict, CIMultiDictProxy, MultiDictProxy
from yarl import URL

from broker.errors import ERROR_HEADER, BrokerError, error_body, error_response
from broker.http import framing

log = structlog.get_logger("broker")

KEEPALIVE_S = 75.0  # an idle connection, or one whose request head never completes, is closed after this
SWEEP_S = 5.0  # how often idle connections are looked for
REQUEST_LINE_MAX = 8 * 1024  # allowed on top of limits.max_header_bytes for the request line
BODY_HIGH = 256 * 1024  # request body bytes held before the agent's socket is paused
BACKLOG = 1024
NO_BODY_STATUS = framing.NO_BODY_STATUS
REASONS = {s.value: s.phrase for s in http.HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

# RFC 9110 §9 plus PATCH (RFC 5789): the methods the broker reads at all. Of those, CONNECT (a
# tunnel) and TRACE (an echo of the request, credential included) are never forwarded.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
# origin-form of VCHARs only (RFC 9112 §3.2.1): no fragment, no raw non-ASCII, no controls
_ORIGIN_FORM = re.compile(r"/[!\"$-~]*")
_METHOD_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")


class BadRequest(Exception):
    """A request the broker cannot read: answered with `status` and the connection closed."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class AgentGone(ConnectionResetError):
    """The agent closed its connection."""


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def check_target(target: str) -> None:
    """Refuse a request target the broker will not reason about (SPEC: origin-form VCHARs)."""
    if _ORIGIN_FORM.fullmatch(target) is None:
        if not target.startswith("/"):
            raise BadRequest(
                "absolute-form and asterisk-form request targets are refused; the destination comes "
                "from the broker's config, send a plain path"
            )
        raise BadRequest("the request target must be a path of visible ASCII characters, without a #fragment")
    if "%00" in target:
        raise BadRequest("an encoded NUL (%00) is not allowed in the request target")


def check_method(method: str) -> None:
    if method not in FORWARDED_METHODS:
        if method in REFUSED_METHODS:
            raise BadRequest(f"{method} is not forwarded by the broker", 405, "method_not_allowed")
        raise BadRequest(
            "the broker forwards GET, HEAD, POST, PUT, DELETE, OPTIONS and PATCH", 501, "method_not_allowed"
        )


# ---------------------------------------------------------------- request bodies


class Body:
    """A request body as llhttp hands it over: `iter_any()` yields chunks, bounded by BODY_HIGH
    in memory, each wait for more bounded by the connection's inactivity timeout."""

    __slots__ = ("_conn", "_error", "_held", "_parts", "_waiter", "done", "received")

    def __init__(self, conn: AgentConnection | None, done: bool = False) -> None:
        self._conn = conn
        self._parts: deque[bytes] = deque()
        self._held = 0
        self.received = 0  # body bytes llhttp handed over so far
        self.done = done
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def push(self, data: bytes) -> None:
        self._parts.append(data)
        self._held += len(data)
        self.received += len(data)
        if self._held > BODY_HIGH and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def finish(self) -> None:
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
            conn = self._conn
            if conn is None:
                raise AgentGone("the body has no connection")
            conn.resume_reading()  # nothing is held: whatever paused reading, read now
            conn.body_wanted()
            loop = conn.server.loop
            waiter = self._waiter = loop.create_future()
            idle = conn.server.body_idle()
            timer = loop.call_later(idle, self._stalled, waiter, idle)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None

    def _stalled(self, waiter: asyncio.Future[None], idle: float) -> None:
        if not waiter.done() and not self.done and not self._parts:
            self._error = BrokerError(
                "request_timeout", f"the request body stalled for over timeouts.idle ({idle:g}s)"
            )
            waiter.set_result(None)
            if self._conn is not None:
                self._conn.abandon_body()

    async def iter_any(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.iter_any()])


_NO_BODY = Body(None, done=True)


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
        keep_alive: bool = True,
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
        # llhttp's reading: HTTP/1.1 stays open unless told `close`; 1.0 only when told `keep-alive`
        self.keep_alive = keep_alive

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
        self._left = -1  # body bytes the declared Content-Length still owes; -1: none declared

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
        if not self._no_body and not self._chunked:
            declared = headers.get("Content-Length")
            if declared is not None:
                self._left = int(declared) if declared.isdigit() else 0
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
        if self._chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        if self._left >= 0:
            if len(data) > self._left:
                self._cut("the answer is longer than its Content-Length")
            self._left -= len(data)
        return data

    def _cut(self, why: str) -> None:
        """End the connection: an answer that broke its own framing must not be read as whole, and
        the agent's next request must never read this one's bytes as its answer."""
        conn = self._conn
        if conn is not None:
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()
        raise AgentGone(why)

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
        elif self._left > 0:
            if self._pending is not None:  # nothing went out yet: the head is dropped with the rest
                self._pending = None
            self._cut("the answer is shorter than its Content-Length")
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
_HEAD, _BODY, _DONE = 0, 1, 2  # where llhttp is in the message it reads
_CHUNK_LINE_MAX = 4096  # a chunk-size line with its extensions


class AgentConnection(asyncio.Protocol):
    """One agent connection: llhttp reads its requests, each is answered in turn, keeps alive.

    llhttp calls the `on_*` methods below while `data_received` feeds it; a request that arrives
    while another is answered (pipelining) waits in `_waiting`, with reading paused.
    """

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.closing = False  # set at shutdown or after a framing error: close after the current answer
        self.idle_since = 0.0
        self._parser = httptools.HttpRequestParser(self)
        self._phase = _DONE
        self._url = b""
        self._pairs: list[tuple[str, str]] = []
        self._head_size = 0  # bytes of the fields llhttp handed over, head or trailers: exact
        self._head_fed = 0  # bytes fed while the head is incomplete: bounds a field llhttp still holds
        self._framing = 0  # bytes fed in the body phase that were not body: chunk lines, trailers
        self._chunks = 0
        self._reading: Request | None = None  # the request llhttp is reading
        self._request: Request | None = None  # the request being answered
        self._waiting: deque[Request] = deque()  # pipelined requests, read and not yet answered
        self._task: asyncio.Task[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._lost = False
        self._eof = False  # the agent sent all it will send
        self._broken = False  # a framing error: nothing more is read from this connection
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
        if self._broken:
            return
        phase = self._phase
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT or `Upgrade:` (refused or answered as plain HTTP): llhttp stops reading here,
            # so nothing after this request is read; the connection closes after its answer
            self._stop_reading()
            return
        except httptools.HttpParserError as exc:
            self._framing_error(_parse_error(exc, data if phase == _DONE else b""))
            return
        if self._phase == _HEAD and phase != _BODY:
            self._head_fed += len(data)  # llhttp holds a header being read: bound it as it grows
            if self._head_fed > self.server.max_head():
                self._framing_error(BadRequest("the request head is too large", 431, "request_too_large"))
            elif phase == _DONE and _simple_request(data):
                # llhttp would wait for a blank line after an HTTP/0.9 `GET /`: answer it now
                self._framing_error(BadRequest("HTTP/0.9 is not served: send HTTP/1.1"))
        elif self._phase == _BODY:
            self._framing += len(data)
            if self._framing > (self._chunks + 1) * _CHUNK_LINE_MAX + self.server.max_head():
                self._framing_error(
                    BadRequest("chunk extensions or trailers are too large", 431, "request_too_large")
                )

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        self._phase = _HEAD
        self._url = b""
        self._pairs = []
        self._head_size = self._head_fed = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_size = self._head_size + len(name) + len(value) + 4
        if size > self.server.max_head():
            raise BadRequest("the request head is too large", 431, "request_too_large")
        if self._phase == _HEAD:
            # OWS around a field value is not part of it (RFC 9110 §5.5); llhttp keeps the trailing part
            self._pairs.append((name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")))
        # else: a trailer field, read (and bounded) but never forwarded

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise BadRequest(f"HTTP/{version} is not served: send HTTP/1.1")
        method = parser.get_method().decode("ascii")
        check_method(method)
        target = self._url.decode("latin-1")
        check_target(target)
        pairs = self._pairs
        req = Request(
            self, method, target, (1, 1) if version == "1.1" else (1, 0), pairs, parser.should_keep_alive()
        )
        headers = req.headers
        if "Transfer-Encoding" in headers:
            te = headers.getall("Transfer-Encoding")
            if len(te) != 1 or te[0].lower() != "chunked" or req.version < (1, 1):
                # RFC 9112 §6.1: a coding the server does not understand is 501
                raise BadRequest(
                    "only Transfer-Encoding: chunked is accepted (HTTP/1.1)",
                    501 if req.version == (1, 1) else 400,
                )
            req.content = Body(self)
            req.body_exists = True
        elif "Content-Length" in headers:  # llhttp refused a second copy and anything but digits
            length = int(headers["Content-Length"])
            req.content_length = length
            if length:
                req.content = Body(self)
                req.body_exists = True
        if req.body_exists and parser.should_upgrade():
            # llhttp would read no body after an Upgrade: the broker switches no protocols
            raise BadRequest("a request with a body cannot ask to Upgrade: send it without Upgrade")
        self._reading = req
        self._phase = _BODY
        self._framing = 0
        self._chunks = 0
        self._head_size = 0  # from here on it counts trailer bytes
        if self._request is None:
            self._start(req)
        else:
            self._waiting.append(req)  # pipelined: answered after the one before it
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        req = self._reading
        if req is not None:
            req.content.push(body)

    def on_chunk_header(self) -> None:
        self._chunks += 1

    def on_message_complete(self) -> None:
        self._phase = _DONE
        req, self._reading = self._reading, None
        if req is not None:
            req.content.finish()

    # -- errors
    def _framing_error(self, exc: BadRequest) -> None:
        """Answer what cannot be read, then close: nothing after it on this connection can be
        trusted. A body that broke its framing is answered by whoever reads it; a head, at once
        (after the answer under way, if any)."""
        reading = self._reading  # a request whose body llhttp was reading: answered or waiting
        self._stop_reading()
        if reading is not None:
            reading.content.fail(
                BrokerError(exc.code, f"the request body cannot be read: {exc}", http_status=exc.status)
            )
        elif self._request is None:
            self._reject(exc)

    def _stop_reading(self) -> None:
        self._broken = True
        self.closing = True
        for req in (self._reading, *self._waiting):
            if req is not None:
                req.keep_alive = False
        self.pause_reading()

    def abandon_body(self) -> None:
        """A body stalled past the inactivity timeout: read nothing more, close after the answer."""
        self._stop_reading()

    def eof_received(self) -> bool | None:
        self._eof = True
        reading = self._reading
        if reading is not None and not reading.content.done:
            reading.content.fail(AgentGone("the agent closed its connection before the body ended"))
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
        reading = self._reading
        if reading is not None:
            reading.content.fail(AgentGone("the agent closed its connection before the body ended"))
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
        if self._read_paused and self.transport is not None and not self._broken and not self._waiting:
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
    def _start(self, req: Request) -> None:
        self._request = req
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
        """After an answer: close, or answer the next request (read already, or still to come)."""
        self.answering = False
        if not req.content.done:
            req.keep_alive = False  # the rest of an unread body would be read as the next request
        if not req.keep_alive or self.closing or self._lost or self._eof:
            self.close()
            return
        self.idle_since = self.server.loop.time()
        if self._waiting:
            nxt = self._waiting.popleft()
            self._start(nxt)
            if not self._waiting:
                self.resume_reading()
        elif self._read_paused:
            self.resume_reading()

    def expire(self) -> None:
        """Idle past KEEPALIVE_S: a half-read head is answered 408 first."""
        if self._phase == _HEAD and self._request is None:
            self._reject(BadRequest("the request head was not sent in time", 408, "request_timeout"))
        self.close()

    def _reject(self, exc: BadRequest) -> None:
        """Answer a request that cannot be read, then close: nothing after it can be trusted."""
        body = error_body(BrokerError(exc.code, str(exc), http_status=exc.status))
        reason = REASONS.get(exc.status, "Bad Request")
        head = (
            f"HTTP/1.1 {exc.status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{ERROR_HEADER}: {exc.code}\r\nCache-Control: no-store\r\n"
            f"Date: {http_date()}\r\nConnection: close\r\n\r\n"
        )
        self.closing = True
        self._broken = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(head.encode() + body)
        self.close()


def _simple_request(data: bytes) -> bool:
    """`data` begins with a whole request line that names no HTTP version (HTTP/0.9)."""
    line, crlf, _ = data.lstrip(b"\r\n").partition(b"\r\n")
    return bool(crlf) and not line.endswith((b" HTTP/1.1", b" HTTP/1.0"))


def _parse_error(exc: httptools.HttpParserError, start: bytes) -> BadRequest:
    """What llhttp refused, as the answer to give: a check of ours raised inside a callback
    comes back as the error's context. `start`: the bytes the message began with, if known."""
    cause = exc.__context__
    if isinstance(cause, BadRequest):
        return cause
    if isinstance(exc, httptools.HttpParserInvalidMethodError) and _METHOD_TOKEN.match(start.lstrip(b"\r\n")):
        # a well-formed token that is no method llhttp knows (or not in upper case): 501
        return BadRequest(
            "the broker forwards GET, HEAD, POST, PUT, DELETE, OPTIONS and PATCH", 501, "method_not_allowed"
        )
    if isinstance(exc, httptools.HttpParserCallbackError):
        return BadRequest("the request cannot be read")
    return BadRequest(f"the request is malformed: {exc}")


def _failed() -> Response:
    """The answer to a request the handler failed on."""
    return error_response(BrokerError("internal_error", "the broker failed to answer this request"))


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
