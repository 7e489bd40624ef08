"""The agents' side messages: a request as llhttp read it (`Request`, its `Body`) and the answers
written back (`StreamResponse`, `HeadersWithBody`, `Response`), with their Date field.

Owns: a request body handed over chunk by chunk with flow control and an inactivity clock,
`100 Continue` when asked, an answer's head (framing fields set to what its body will be,
`Connection`, `Date`, no line break in any field), its body framed (chunked for HTTP/1.1,
close-delimited for HTTP/1.0, nothing for HEAD, 1xx, 204 and 304) and held to the Content-Length
it declared. Must never: read or write the socket but through its `AgentConnection` (server.py),
or put a byte on the wire an agent could read as the start of its next answer.
"""

from __future__ import annotations

import asyncio
import http
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict, CIMultiDictProxy, MultiDictProxy
from yarl import URL

from broker.errors import ERROR_HEADER, BrokerError, error_body, error_response
from broker.http.framing import NO_BODY_STATUS, BadRequest

if TYPE_CHECKING:
    from broker.http.server import AgentConnection

BODY_HIGH = 256 * 1024  # request body bytes held before the agent's socket is paused
REASONS = {s.value: s.phrase for s in http.HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class AgentGone(ConnectionResetError):
    """The agent closed its connection."""


class DateHeader:
    """The Date field of answers (RFC 9110 §6.6.1), formatted once a second, not per answer."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = ""

    def value(self) -> str:
        now = int(time.time())
        if self._second != now:
            self._second = now
            self._value = formatdate(now, usegmt=True)
        return self._value


# ---------------------------------------------------------------- request bodies


class Body:
    """A request body as llhttp hands it over: `iter_any()` yields chunks, bounded by BODY_HIGH
    in memory, each wait for more bounded by the connection's inactivity timeout."""

    __slots__ = ("_conn", "_error", "_held", "_parts", "_waiter", "done")

    def __init__(self, conn: AgentConnection | None, done: bool = False) -> None:
        self._conn = conn
        self._parts: deque[bytes] = deque()
        self._held = 0
        self.done = done
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    def push(self, data: bytes) -> None:
        self._parts.append(data)
        self._held += len(data)
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

    async def next_chunk(self) -> bytes:
        """The next bytes of the body as llhttp handed them over; `b""` at its end."""
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
        while chunk := await self.next_chunk():
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
        "connection_facts",
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
        # what the server's on_connect returned for this connection (who the peer is, which
        # listener): asked once per connection, read by every request on it
        self.connection_facts = conn.facts
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
    def closing(self) -> bool:
        """The connection ends after this answer (the server shuts down): a stream should end."""
        return self._conn.closing

    @property
    def ended(self) -> bool:
        """The agent's connection is lost, or it sent its FIN (closed, or half-closed to wait for
        the answer: from here the two look the same)."""
        return self._conn._lost or self._conn._eof

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

    def continue_if_asked(self) -> None:
        """`100 Continue` if the agent waits for it before sending its body (HTTP/1.1 only)."""
        if not self._continue_sent and self.version >= (1, 1):
            expect = self.headers.get("Expect")
            if expect is not None and expect.lower() == "100-continue":
                self.send_continue()

    def send_continue(self) -> None:
        """`100 Continue`, once, to an agent that asked for it before sending its body."""
        if not self._continue_sent and not self.content.done:
            self._continue_sent = True
            self._conn.write(CONTINUE)


# ---------------------------------------------------------------- responses


class StreamResponse:
    """An answer written as it goes: head at prepare(), then write() chunks, then write_eof()."""

    _head_at_prepare = True  # False: the head waits for the first body bytes, one write for both

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
        self._held_head: bytes | None = None  # the head, when it waits for the first body bytes
        self._ended = False
        self._owed = -1  # body bytes the declared Content-Length still owes; -1: none declared

    async def prepare(self, request: Request) -> None:
        if self.prepared:
            return
        conn = request._conn
        self._conn = conn
        self.prepared = True
        status = self.status
        headers = self.headers
        no_body_status = status in NO_BODY_STATUS
        self._no_body = request.method == "HEAD" or no_body_status or status < 200
        if no_body_status:
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
            headers["Date"] = conn.date.value()
        if not self._no_body and not self._chunked:
            declared = headers.get("Content-Length")
            if declared is not None:
                self._owed = int(declared) if declared.isdigit() else 0
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
        if self._head_at_prepare:
            conn.write(head)
        else:
            self._held_head = head

    def _framed(self, data: bytes) -> bytes:
        if self._no_body or not data:
            return b""
        if self._chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        if self._owed >= 0:
            if len(data) > self._owed:
                self._cut("the answer is longer than its Content-Length")
            self._owed -= len(data)
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
        if self._held_head is not None:
            out, self._held_head = self._held_head + out, None
        if out:
            conn.write(out)
            await conn.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        if self._ended:
            return
        self._ended = True
        conn = self._conn
        assert conn is not None, "prepare() first"
        out = self._framed(data)
        if self._chunked:
            out += b"0\r\n\r\n"
        elif self._owed > 0:
            if self._held_head is not None:  # nothing went out yet: the head is dropped with the rest
                self._held_head = None
            self._cut("the answer is shorter than its Content-Length")
        if self._held_head is not None:
            out, self._held_head = self._held_head + out, None
        if out:
            conn.write(out)


class HeadersWithBody(StreamResponse):
    """A streamed answer whose head waits for the first body bytes (one write, not two)."""

    _head_at_prepare = False


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


def failed_answer() -> Response:
    """The answer to a request the handler failed on."""
    return error_response(BrokerError("internal_error", "the broker failed to answer this request"))


def refusal(exc: BadRequest, date: str) -> bytes:
    """The whole answer to a request that cannot be read; the connection closes after it."""
    body = error_body(BrokerError(exc.code, str(exc), http_status=exc.status))
    reason = REASONS.get(exc.status, "Bad Request")
    head = (
        f"HTTP/1.1 {exc.status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{ERROR_HEADER}: {exc.code}\r\nCache-Control: no-store\r\n"
        f"Date: {date}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body
