"""One connection to an upstream on asyncio's Protocol API, its answers parsed by llhttp (through
httptools), as httpcore's `http11.py` is to its `connection_pool.py`.

Owns: the answer to the request just written, read as bytes arrive (llhttp's strict parse, the
refusals of framing.py applied in its callbacks, heads and trailers bounded as their bytes
arrive), skipping 1xx answers, the body fed to its `Response` with the upstream paused while too
much is held, an answer before the whole upload went out, and handing the connection back to the
pool only when its answer ended exactly. Must never: write a request (the pool does), read past
the answer asked for, or put back a connection whose framing is in doubt.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from broker.http.framing import (
    ANSWER_HEAD_MAX,
    CHUNK_LINE_MAX,
    CONTENT_LENGTH_DIGITS_MAX,
    NO_BODY_STATUS,
    decodable_coding,
    only_chunked,
)
from broker.http.upstream_answer import BadAnswer, BodyBroken, Disconnected, Response, UpstreamError

if TYPE_CHECKING:
    from broker.http.client import Pool


class StopReading(Exception):
    """Raised in an llhttp callback to stop reading: what follows is not ours to read."""


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream: a request at a time, its answer read by llhttp as bytes
    arrive (the `on_*` methods are llhttp's callbacks), with the broker's own checks on top."""

    def __init__(self, pool: Pool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.loop = pool.get_loop()
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reused = False
        self.writing = False  # a streamed upload is under way: an answer now spoils the framing
        self.idle_since = 0.0  # loop time it went back into the pool
        self._parser = httptools.HttpResponseParser(self)
        # RFC 9112 §7.1.1 allows blanks (BWS) between a chunk size and its extensions
        self._parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self._head_waiter: asyncio.Future[Response] | None = None
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
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(
                Disconnected("the upstream closed the connection before answering", self.reused)
            )
        resp, self._resp = self._resp, None
        if resp is not None:
            if self._close_delimited:
                resp.finish()  # the close is the end of this body
            else:
                resp.finish(BodyBroken("the upstream closed the connection mid-answer"))

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
            self._fail(BadAnswer("the upstream's answer does not begin with its status line"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadAnswer("the upstream switched protocols, which the broker never asked for"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, StopReading):
                self.abort()  # the answer is whole; what came after it is nobody's
            elif isinstance(cause, UpstreamError):
                self._fail(cause)
            elif self._resp is not None or in_body:
                self._fail(BodyBroken(f"the upstream's answer body is malformed: {exc}"))
            else:
                self._fail(BadAnswer(f"the upstream's answer is malformed: {exc}"))
            return
        if self._in_head:
            self._head_fed += len(data)  # llhttp holds a field being read: bound it as it grows
            if self._head_fed > ANSWER_HEAD_MAX:
                self._fail(BadAnswer("the upstream's answer head is too large"))
        elif self._resp is not None:
            self._framing += len(data)
            if self._framing > (self._chunks + 1) * CHUNK_LINE_MAX + ANSWER_HEAD_MAX:
                self._fail(BodyBroken("the upstream's chunk extensions or trailers are too large"))

    def eof_received(self) -> bool | None:
        return None  # a half-close ends the connection

    # -- llhttp callbacks
    def on_message_begin(self) -> None:
        if self._head_waiter is None or self._head_waiter.done():
            raise StopReading  # bytes nobody asked for: the connection is not used again
        self._in_head = True
        self._pairs = []
        self._head_size = self._head_fed = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        size = self._head_size = self._head_size + len(name) + len(value) + 4
        if size > ANSWER_HEAD_MAX:
            raise BadAnswer("the upstream's answer head is too large")
        if self._in_head:
            self._pairs.append((name.decode("latin-1"), value.decode("latin-1").rstrip(" \t")))
        # else: a trailer field, read and bounded, never passed on

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self._parser
        status = parser.get_status_code()
        if parser.get_http_version() not in ("1.1", "1.0") or status < 100:
            raise BadAnswer("the upstream's status line is not HTTP/1.x")
        if status < 200:
            if status == 101:
                raise BadAnswer("the upstream switched protocols, which the broker never asked for")
            self._interim = True  # 100 Continue, 103 Early Hints: the real answer follows
            return
        headers = CIMultiDictProxy(CIMultiDict(self._pairs))
        if "Transfer-Encoding" in headers and not only_chunked(headers.getall("Transfer-Encoding")):
            raise BadAnswer("the upstream used a transfer coding other than exactly `chunked`")
        if "Content-Encoding" in headers and not decodable_coding(headers.getall("Content-Encoding")):
            # bytes the broker cannot decode cannot be scrubbed: they never reach the agent
            raise BadAnswer("the upstream used several, empty or unknown Content-Encoding values")
        if "Content-Length" in headers and len(headers["Content-Length"]) > CONTENT_LENGTH_DIGITS_MAX:
            raise BadAnswer("the upstream's Content-Length is out of range")
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
        head_future, self._head_waiter = self._head_waiter, None
        self._framing = 0
        self._chunks = 0
        self._resp = resp
        if head_future is not None and not head_future.done():
            head_future.set_result(resp)
        if self.writing and self._drain is not None and not self._drain.done():
            self._drain.set_result(None)  # an upload waiting on a full socket: the answer came first
        if self._head_request:
            self._complete(resp)
            raise StopReading

    def on_body(self, body: bytes) -> None:
        self._framing -= len(body)
        resp = self._resp
        if resp is not None:
            resp.push(body)

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
        self._head_waiter = self.loop.create_future()
        self._head_request = head_request
        return self._head_waiter

    def _fail(self, exc: UpstreamError) -> None:
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_exception(exc)
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.finish(BodyBroken(str(exc)) if not isinstance(exc, BodyBroken) else exc)
        self.abort()

    def _complete(self, resp: Response) -> None:
        """The answer was read to its end: hand the connection back (or close it)."""
        self._resp = None
        resp.finish()
        # an answer before the whole request went out: not reusable
        if resp.keep_alive and not self.closed and not self.writing:
            self.resume()
            self.pool.put(self)
        else:
            self.abort()
