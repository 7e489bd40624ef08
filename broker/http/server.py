"""The agents' side of the broker: an HTTP/1.1 server on asyncio's Protocol API, its framing
parsed by llhttp (through httptools, as uvicorn's `httptools_impl` does).

Owns: reading agents' requests (llhttp's strict parse, the refusals of framing.py applied in its
callbacks, heads and trailers bounded as their bytes arrive), request bodies handed to their
readers with reading paused while too much is held, keep-alive and pipelined requests answered
one at a time, answering what cannot be read and closing, closing idle connections (a half-sent
head gets 408 first), shutting down with in-flight requests given time to finish. The requests
and answers themselves are agent_messages.py's. Must never: guess a request's framing, leave an
unread body on a connection that is reused, or put anything but the handler's answer on the wire.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, cast

import httptools
import structlog

from broker.errors import BrokerError
from broker.http.agent_messages import (
    AgentGone,
    Body,
    HeadersWithBody,
    Request,
    Response,
    StreamResponse,
    failed_answer,
    refusal,
)
from broker.http.framing import (
    CHUNK_LINE_MAX,
    BadRequest,
    check_method,
    check_target,
    is_http09_request,
    only_chunked,
    refused_request,
)

if TYPE_CHECKING:
    from broker.http.listener import AgentServer

__all__ = [  # the agents' side as the rest of the broker imports it
    "AgentConnection", "AgentGone", "Body", "Handler",
    "HeadersWithBody", "Request", "Response", "StreamResponse",
]  # fmt: skip

log = structlog.get_logger("broker")

Handler = Callable[[Request], Awaitable[StreamResponse]]
_HEAD, _BODY, _DONE = 0, 1, 2  # where llhttp is in the message it reads


class AgentConnection(asyncio.Protocol):
    """One agent connection: llhttp reads its requests, each is answered in turn, keeps alive.

    llhttp calls the `on_*` methods below while `data_received` feeds it; a request that arrives
    while another is answered (pipelining) waits in `_waiting`, with reading paused.
    """

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.facts: object = None  # what on_connect found out about this connection
        self.date = server.date
        self.transport: asyncio.Transport | None = None
        self.closing = False  # set at shutdown or after a framing error: close after the current answer
        self.idle_since = 0.0
        self.fresh = True  # no request started on it yet: at shutdown its first one is still served
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
                self.facts = self.server.on_connect(self.transport)
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
            self._framing_error(refused_request(exc, data if phase == _DONE else b""))
            return
        if self._phase == _HEAD and phase != _BODY:
            self._head_fed += len(data)  # llhttp holds a header being read: bound it as it grows
            if self._head_fed > self.server.max_head():
                self._framing_error(BadRequest("the request head is too large", 431, "request_too_large"))
            elif phase == _DONE and is_http09_request(data):
                # llhttp would wait for a blank line after an HTTP/0.9 `GET /`: answer it now
                self._framing_error(BadRequest("HTTP/0.9 is not served: send HTTP/1.1"))
        elif self._phase == _BODY:
            self._framing += len(data)
            if self._framing > (self._chunks + 1) * CHUNK_LINE_MAX + self.server.max_head():
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
        if size > self.server.max_fields():  # limits.max_header_bytes, exactly: checked nowhere else
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
            if not only_chunked(headers.getall("Transfer-Encoding")) or req.version < (1, 1):
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
        if req is not None:
            req.continue_if_asked()

    @property
    def idle(self) -> bool:
        return self._request is None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- requests
    def _start(self, req: Request) -> None:
        self.fresh = False
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
                resp = failed_answer()
                req.keep_alive = False
            if not resp.prepared:
                try:
                    await resp.prepare(req)
                except ValueError:  # a header that cannot be written whole: nothing went out
                    log.exception("broker.request_failed", method=req.method)
                    resp = failed_answer()
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
        """Idle past listener.KEEPALIVE_S: a half-read head is answered 408 first."""
        if self._phase == _HEAD and self._request is None:
            self._reject(BadRequest("the request head was not sent in time", 408, "request_timeout"))
        self.close()

    def _reject(self, exc: BadRequest) -> None:
        """Answer a request that cannot be read, then close: nothing after it can be trusted."""
        self.closing = True
        self._broken = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(refusal(exc, self.date.value()))
        self.close()
