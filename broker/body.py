"""The agent's request body as the walk sees it: read at most once, bounded, counted.

Owns: the request body limit (`limits.max_body_bytes`), reading the body whole for whoever
needs it first (a policy that checks it, a credential that may retry after a refresh, an error
answered with the JSON-RPC id), streaming it to the upstream otherwise, and counting what came
in. Must never: read a body nobody asked for, hold more than the limit, or hand the upstream a
body a policy did not see whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from broker.errors import BrokerError
from broker.http.server import Request

ERROR_PEEK_BYTES = 1024 * 1024  # an error answer reads a small JSON-RPC body for its id, up to this


class BodyTooLarge(Exception):
    """Raised from `chunks()` inside the upstream client's send; `RequestBody.too_large()` says why."""


class RequestBody:
    """One request's body. `held` is the whole body once something read it; `size` counts bytes
    read so far, whole or streamed."""

    __slots__ = ("_limit", "_request", "_route", "declared_too_large", "exists", "held", "size", "started")

    def __init__(self, request: Request, limit: int, route: str | None) -> None:
        self._request = request
        self._limit = limit
        self._route = route
        # plain attributes, not properties: read several times a request, and CPython 3.11 looks
        # a property up the slow way every time
        self.exists: bool = request.body_exists
        length = request.content_length
        self.declared_too_large = length is not None and length > limit
        self.held: bytes | None = None
        self.size = 0
        self.started = False  # reading began (whole or streamed): it cannot be read again

    @property
    def exceeded(self) -> bool:
        """More than the limit arrived (the upstream client may report it as its own failure)."""
        return self.size > self._limit

    def too_large(self) -> BrokerError:
        return BrokerError(
            "request_too_large", f"request body is over limits.max_body_bytes ({self._limit})", self._route
        )

    async def read(self) -> bytes:
        """The whole body (the same bytes to every caller). Raises BrokerError request_too_large."""
        if self.held is not None:
            return self.held
        if self.declared_too_large:
            raise self.too_large()
        parts: list[bytes] = []
        try:
            async for chunk in self.chunks():
                parts.append(chunk)
        except BodyTooLarge:
            raise self.too_large() from None
        self.held = b"".join(parts)
        return self.held

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, counted against the limit (BodyTooLarge past it)."""
        self.started = True
        async for chunk in self._request.content.iter_any():
            self.size += len(chunk)
            if self.size > self._limit:
                raise BodyTooLarge
            yield chunk

    async def for_error(self) -> bytes | None:
        """The body to read a JSON-RPC id from when answering an error: what is held, else a
        small unread JSON body (bounded in size, and by timeouts.idle); never one already
        streamed, too large, stalled or malformed."""
        if self.held is not None or self.started:
            return self.held
        request = self._request
        length = request.content_length
        if (
            request.method != "POST"
            or request.content_type != "application/json"
            or not request.body_exists
            or (length is not None and length > min(self._limit, ERROR_PEEK_BYTES))
        ):
            return None
        parts: list[bytes] = []
        size = 0
        self.started = True
        with contextlib.suppress(ConnectionError, BrokerError):  # gone, stalled or malformed
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > ERROR_PEEK_BYTES:
                    return None
                parts.append(chunk)
            self.held = b"".join(parts)
        return self.held
