"""How an upstream request ends: its answer (`Response`), read by the proxy as it arrives, or
one of the errors that stand for it (`UpstreamError` and its kinds).

Owns: an answer's body as the connection hands it over, held up to READ_HIGH before the upstream
is paused, gzip/deflate decoding with bounded output (DECODE_STEP at a time), the whole body at
once when it has all arrived, and releasing an answer half read (its rest thrown away for a
moment, so that its connection can serve again). Must never: read the socket (connection.py
does), read a body into memory whole, or hand over bytes that did not decode.
"""

from __future__ import annotations

import asyncio
import collections
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDictProxy

if TYPE_CHECKING:
    from broker.http.connection import UpstreamConnection

READ_HIGH = 256 * 1024  # body bytes held for a slow agent before the upstream is paused
DECODE_STEP = 64 * 1024  # decoded bytes produced per step: a small gzip cannot balloon in memory
DRAIN_S = 1.0  # how long the end of an answer nobody reads is waited for, to keep its connection
DRAIN_BYTES = 256 * 1024  # and how much of it


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


def decompressor(encoding: str, first: bytes) -> Any:
    """A zlib decompressobj for a gzip or deflate body beginning with `first`."""
    if encoding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # "deflate" is zlib-wrapped by the RFC, raw in the wild: the first byte tells
    return zlib.decompressobj(zlib.MAX_WBITS if (first[0] & 0x0F) == 8 else -zlib.MAX_WBITS)


class Response:
    """One upstream answer: status and headers at once, the body as it arrives."""

    __slots__ = (
        "_conn",
        "_decoder",
        "_drain_timer",
        "_ended",
        "_error",
        "_held",
        "_loop",
        "_parts",
        "_tail",
        "_waiter",
        "headers",
        "keep_alive",
        "status",
    )  # fmt: skip

    def __init__(
        self, status: int, headers: CIMultiDictProxy[str], keep_alive: bool, conn: UpstreamConnection
    ) -> None:
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        self._conn: UpstreamConnection | None = conn
        self._loop = conn.loop
        self._parts: collections.deque[bytes] = collections.deque()
        self._held = 0
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_timer: asyncio.TimerHandle | None = None  # set while the rest is thrown away
        encoding = headers.get("Content-Encoding", "").strip().lower()
        # the coding's name, until the first body bytes make it a zlib decompressobj
        self._decoder: Any = encoding if encoding in ("gzip", "deflate") else None
        self._tail = b""  # compressed bytes the decoder has not taken yet

    # -- fed by the connection
    def push(self, data: bytes) -> None:
        self._held += len(data)
        if self._drain_timer is not None:  # nobody reads it any more: count it, keep nothing
            if self._held > DRAIN_BYTES:
                self.close()
            return
        self._parts.append(data)
        if self._held > READ_HIGH and self._conn is not None:
            self._conn.pause()
        self._wake()

    def finish(self, exc: BaseException | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        self._error = exc
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
        return self._ended and self._error is not None

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
        while not self._parts:
            if self._drain_timer is not None:  # released while read: whoever reads has left
                raise BodyBroken("the answer was released")
            if self._ended:
                if self._error is not None:
                    raise self._error
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._parts.popleft()
        self._held -= len(data)
        if self._held <= READ_HIGH // 4 and self._conn is not None:
            self._conn.resume()
        return data

    def whole(self, limit: int) -> bytes | None:
        """The whole decoded body, if all of it has arrived and decodes to at most `limit` bytes.

        None otherwise, with nothing consumed: the body is then read with iter_any().
        """
        if (
            not self._ended
            or self._error is not None
            or self._tail
            or not isinstance(self._decoder, str | None)
        ):
            return None
        chunks = self._parts
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self._decoder is None or not raw:
            if len(raw) > limit:
                return None
            out = raw
        else:
            d = decompressor(self._decoder, raw)
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
            d = self._decoder = decompressor(d, data)
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
        if self._ended or self._drain_timer is not None:
            return
        conn = self._conn
        if conn is None or not self.keep_alive:
            self.close()
            return
        self._parts.clear()
        self._tail = b""
        self._held = 0
        self._drain_timer = self._loop.call_later(DRAIN_S, self.close)
        conn.resume()
        self._wake()  # a reader still waiting (a stream whose agent left) stops now

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        if not self._ended:
            self.finish(BodyBroken("the answer was closed"))
