"""Forwarding one request to its upstream and streaming the answer back.

Owns: header hygiene both ways (agent credentials, cookies and hop-by-hop headers out; the
route's credential in, added last), streaming bodies both ways with bounded memory, the
request body limit, timeouts (connect, first byte, idle), redirects passed back (never
followed) with Location rewritten into the broker, upstream 401 kept from the agent, and
scrubbing of held secrets from every response. Must never: follow a redirect, retry a request
that could spend money, buffer a whole body, or let a held secret through.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from broker.errors import BrokerError
from broker.http import client as upstream
from broker.http import framing
from broker.http.server import Body, HeadersWithBody, Request, StreamResponse

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from broker.auth.base import Credential
    from broker.config import Config
    from broker.routing import RouteTable, Target
    from broker.scrub import SecretSet

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones still seen in the wild.
# All lower case: a name is compared as name.lower(), whatever case the sender wrote it in.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "upgrade", "proxy-authenticate", "proxy-authorization",
    "close",  # what `Connection: close` names: a field called Close is dropped too
})  # fmt: skip
REQUEST_DROP = HOP_BY_HOP | {
    "authorization", "cookie", "host", "expect", "accept-encoding",
    "content-length",  # the upstream client frames the body it sends itself
    # the broker is the edge: an agent does not get to say who or where the request came from
    "forwarded", "x-real-ip",
    # nor to make a framework read another method than the one the rules checked
    "x-http-method-override", "x-http-method", "x-method-override",
}  # fmt: skip
RESPONSE_DROP = HOP_BY_HOP | {"set-cookie", "set-cookie2", "www-authenticate"}
DECODED_DROP = RESPONSE_DROP | {"content-encoding", "content-length"}  # the body was decoded
# The broker decodes gzip/deflate itself so it can scrub bodies; the agent gets identity.
UPSTREAM_ACCEPT_ENCODING = "gzip, deflate"
DECODED = ("gzip", "deflate")  # exactly the encodings asked for above, which the client decodes
SAFE_TO_RETRY = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FILTERED = 16 * 1024 * 1024  # an answer a policy rewrites is read whole, up to this
REPLAY_LIMIT = 1024 * 1024  # bodies up to this are held so a 401 can be retried after a refresh
WHOLE_LIMIT = 256 * 1024  # an answer already received whole, up to this decoded, goes out in one write
NO_BODY_STATUS = framing.NO_BODY_STATUS


@dataclass(slots=True)
class Exchange:
    """What happened to one forwarded request, for the audit line and metrics."""

    request_id: str = ""
    detail: str | None = None
    upstream_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    error: str | None = None
    body_too_large: bool = field(default=False)
    body: bytes | None = None  # the request body, when it was read whole (policy, retry)
    maybe_sent: bool = False  # the upstream may have seen the request (so it may have acted on it)

    def hold(self, body: bytes) -> None:
        self.body, self.bytes_in = body, len(body)


_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "Keep-Alive", "Close", "keep-alive, close"})


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str] | frozenset[str]:
    """The field names a Connection header lists, lower case (RFC 9110 §7.6.1)."""
    values = headers.getall("Connection", [])
    if len(values) == 1 and values[0] in _PLAIN_CONNECTION:
        return frozenset()  # the usual `keep-alive` or `close`: names nothing not already dropped
    return set(framing.tokens(values))


def upstream_headers(agent: CIMultiDictProxy[str], credential: dict[str, str]) -> CIMultiDict[str]:
    """Agent headers minus credentials/hop-by-hop, then the route's credential added last."""
    drop = REQUEST_DROP | _connection_tokens(agent) if "Connection" in agent else REQUEST_DROP
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in agent.items():
        lower = name.lower()
        if lower not in drop and not lower.startswith("x-forwarded-"):
            out.add(name, value)
    out["Accept-Encoding"] = UPSTREAM_ACCEPT_ENCODING
    out.update(credential)  # after filtering: `Connection: Authorization` cannot remove it
    return out


def response_headers(up: upstream.Response, secrets: SecretSet, location: str | None) -> CIMultiDict[str]:
    # the client refused any other coding (bytes it cannot decode cannot be scrubbed); a decoded
    # body's length and encoding no longer describe it
    encoding = up.headers.get("Content-Encoding", "identity").lower()
    drop = DECODED_DROP if encoding in DECODED else RESPONSE_DROP
    if "Connection" in up.headers:
        drop = drop | _connection_tokens(up.headers)
    kept = []
    for name, value in up.headers.items():
        lower = name.lower()
        if lower in drop or lower.startswith("access-control-"):
            continue
        kept.append((name, location if lower == "location" and location is not None else value))
    if secrets.may_hold("\n".join([v for _, v in kept])):  # one look at all values, usually enough
        kept = [(name, secrets.redact(value)) for name, value in kept]
    return CIMultiDict(kept)


async def _limited_body(content: Body, limit: int, ex: Exchange) -> AsyncIterator[bytes]:
    async for chunk in content.iter_any():
        ex.bytes_in += len(chunk)
        if ex.bytes_in > limit:
            ex.body_too_large = True
            raise _BodyTooLarge
        yield chunk


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int, route: str) -> BrokerError:
    return BrokerError("request_too_large", f"request body is over limits.max_body_bytes ({limit})", route)


def _rewrite_location(up: upstream.Response, target: Target, table: RouteTable, host: str) -> str | None:
    loc = up.headers.get("Location")
    if not loc:
        return None
    try:
        absolute = target.url.join(URL(loc, encoded=True))
    except ValueError:
        return None
    path = table.broker_path_for(target.route, absolute)
    return f"http://{host}{path}" if path is not None else None


async def _send(
    request: Request,
    target: Target,
    headers: CIMultiDict[str],
    body: bytes | None,
    *,
    pool: upstream.Pool,
    config: Config,
    ex: Exchange,
) -> upstream.Response:
    """One upstream request. `body` is the buffered body, or None to stream the agent's."""
    route = target.route.name
    limit = config.limits.max_body_bytes
    timeouts = config.timeouts
    streamed = body is None and request.body_exists
    # a pooled keep-alive connection the upstream had closed: requests that cannot spend try twice
    attempts = 2 if request.method in SAFE_TO_RETRY and not request.body_exists else 1
    for attempt in range(attempts):
        ex.maybe_sent = True
        try:
            return await pool.request(
                request.method,
                target.url,
                headers.items(),
                _limited_body(request.content, limit, ex) if streamed else body,
                length=request.content_length if streamed else None,
                connect_timeout=timeouts.connect,
                head_timeout=timeouts.first_byte,
            )
        except _BodyTooLarge:
            raise _too_large(limit, route) from None
        except upstream.TimedOut:
            ex.error = "upstream_timeout"
            raise BrokerError(
                "upstream_timeout", f"the upstream did not answer within {timeouts.first_byte:g}s", route
            ) from None
        except upstream.UpstreamError as exc:
            if ex.body_too_large:
                raise _too_large(limit, route) from None
            if not exc.sent:
                ex.maybe_sent = False  # no connection: nothing reached the upstream
            if isinstance(exc, upstream.BadAnswer):
                ex.error = "upstream_error"
                raise BrokerError(
                    "upstream_error",
                    f"the upstream's answer is malformed or ambiguously framed: {exc}",
                    route,
                ) from None
            # most often a pooled keep-alive connection the upstream had just closed
            if isinstance(exc, upstream.Disconnected) and exc.reused and attempt + 1 < attempts:
                continue
            ex.error = "upstream_unreachable"
            raise BrokerError(
                "upstream_unreachable", f"cannot reach the upstream: {type(exc).__name__}", route
            ) from None
    raise AssertionError("unreachable")


async def _read_body(request: Request, limit: int, ex: Exchange) -> bytes:
    parts = [chunk async for chunk in _limited_body(request.content, limit, ex)]
    return b"".join(parts)


async def forward(
    request: Request,
    target: Target,
    credential: Credential,
    *,
    pool: upstream.Pool,
    config: Config,
    table: RouteTable,
    secrets: SecretSet,
    ex: Exchange,
    body: bytes | None = None,
    response_filter: Callable[[bytes, str], bytes] | None = None,
) -> StreamResponse:
    """Send `request` to `target` with `credential`, stream the answer back to the agent.

    `body`: the request body when a policy already read it (forwarded byte for byte).
    `response_filter`: rewrites a (small) successful answer whole, e.g. a filtered tools/list.
    """
    route = target.route.name
    limit = config.limits.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit, route)

    auth = credential.ready_authorization() or await credential.authorization()
    headers = upstream_headers(request.headers, auth)
    if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
        # only now, with the request accepted, ask the agent for its body (curl waits 1 s otherwise)
        request.send_continue()
    # A credential that can be refreshed gets "401 -> refresh once -> retry once", which needs
    # the body twice: small bodies (JSON-RPC calls) are held; large ones stream without a retry.
    replayable = body is not None or (
        credential.can_refresh
        and (not request.body_exists or (length is not None and length <= REPLAY_LIMIT))
    )
    if body is not None:
        ex.body, ex.bytes_in = body, len(body)
    elif replayable and request.body_exists:
        try:
            body = ex.body = await _read_body(request, limit, ex)
        except _BodyTooLarge:
            raise _too_large(limit, route) from None
    up = await _send(request, target, headers, body, pool=pool, config=config, ex=ex)
    if up.status == 401 and replayable:
        up.release()
        if await credential.retry_after_rejection(auth):
            headers = upstream_headers(request.headers, await credential.authorization())
            up = await _send(request, target, headers, body, pool=pool, config=config, ex=ex)

    try:
        ex.upstream_status = up.status
        if up.failed:  # broken right after its head, before anything went to the agent
            ex.error = "upstream_error"
            raise BrokerError(
                "upstream_error", "the upstream's answer is malformed or ambiguously framed", route
            )
        credential.on_upstream_status(up.status)
        if up.status == 401:
            # an agent seeing 401/WWW-Authenticate would start its own OAuth against AgentCard
            code = "needs_login" if credential.state == "needs_login" else "credential_rejected"
            raise BrokerError(code, f"AgentCard refused the broker's credential; {credential.reason}", route)
        host = request.headers.get("Host", "127.0.0.1")
        location = _rewrite_location(up, target, table, host)
        headers_out = response_headers(up, secrets, location)
        headers_out["X-Broker-Request-Id"] = ex.request_id
        if response_filter is not None and up.status == 200:
            return await _filtered(
                request, up, headers_out, response_filter, secrets, ex, config.timeouts.idle
            )
        if request.method != "HEAD" and up.status not in NO_BODY_STATUS:
            whole = up.whole(WHOLE_LIMIT)
            if whole is not None:  # the usual small JSON answer, already here: one write, no timer
                return await _send_whole(request, up.status, headers_out, whole, secrets, ex)
        # A body of known length goes out with the headers in one write; an open-ended stream
        # (SSE) gets its headers at once so the agent sees the answer start.
        cls = HeadersWithBody if "Content-Length" in headers_out else StreamResponse
        resp = cls(up.status, headers_out)  # the standard reason phrase: the upstream's could carry anything
        try:
            await resp.prepare(request)
        except ConnectionError:  # the agent left before the answer: not an error of ours
            ex.error = "agent_disconnected"
            up.release()
            return resp
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        # an agent that leaves mid-stream frees the upstream answer at once (drained briefly,
        # then closed), rather than when the upstream next sends something
        request.on_gone = up.release
        try:
            await _stream(request, up, resp, secrets, config.timeouts.idle, ex)
        finally:
            request.on_gone = None
        return resp
    finally:
        up.release()


async def _send_whole(
    request: Request,
    status: int,
    headers: CIMultiDict[str],
    body: bytes,
    secrets: SecretSet,
    ex: Exchange,
) -> StreamResponse:
    out = secrets.scrub_whole(body)
    headers["Content-Length"] = str(len(out))  # a decoded body's length, or the same one
    resp = HeadersWithBody(status, headers)
    try:
        await resp.prepare(request)
        await resp.write_eof(out)
    except ConnectionError:
        ex.error = "agent_disconnected"
        return resp
    ex.bytes_out = len(out)
    return resp


async def _filtered(
    request: Request,
    up: upstream.Response,
    resp_headers: CIMultiDict[str],
    response_filter: Callable[[bytes, str], bytes],
    secrets: SecretSet,
    ex: Exchange,
    idle: float,
) -> StreamResponse:
    parts: list[bytes] = []
    size = 0
    async with asyncio.timeout(idle) as deadline:  # the whole answer is needed to filter it
        async for chunk in up.iter_any():
            size += len(chunk)
            if size > MAX_FILTERED:
                raise BrokerError(
                    "upstream_unreachable", "the upstream's answer is too large to filter", None
                )
            parts.append(chunk)
            deadline.reschedule(asyncio.get_running_loop().time() + idle)
    body = response_filter(b"".join(parts), up.headers.get("Content-Type", ""))
    return await _send_whole(request, up.status, resp_headers, body, secrets, ex)


async def _stream(
    request: Request,
    up: upstream.Response,
    resp: StreamResponse,
    secrets: SecretSet,
    idle: float,
    ex: Exchange,
) -> None:
    scrubber = secrets.scrubber()
    loop = request.loop
    task = asyncio.current_task(loop)
    assert task is not None
    # The idle deadline, checked lazily: each chunk only notes the time, and one timer, re-armed
    # when it finds the stream still moving, cuts it after `idle` seconds without a byte.
    last = loop.time()
    expired = False
    timer: asyncio.TimerHandle

    def check() -> None:
        nonlocal timer, expired
        due = last + idle
        if loop.time() >= due:
            expired = True
            task.cancel()
        else:
            timer = loop.call_at(due, check)

    timer = loop.call_at(last + idle, check)
    try:
        async for chunk in up.iter_any():
            out = scrubber.feed(chunk)
            if out:
                await resp.write(out)
                ex.bytes_out += len(out)
            last = loop.time()
        tail = scrubber.flush()
        if tail:
            await resp.write(tail)
            ex.bytes_out += len(tail)
        timer.cancel()
        await resp.write_eof()
        if request.gone and ex.error is None:
            ex.error = "agent_disconnected"  # left after the last bytes went out, before the end
    except asyncio.CancelledError:
        if not expired or task.uncancel() > 0:
            raise  # a cancel of our own caller's, not the idle deadline's
        ex.error = "stream_idle_timeout"
        up.close()
        _abort(request)
    except upstream.UpstreamError:
        if request.gone:  # the agent left and the answer was released: it drains, maybe to be reused
            ex.error = "agent_disconnected"
        else:
            ex.error = "upstream_stream_broken"
            up.close()
            _abort(request)
    except ConnectionError:
        ex.error = "agent_disconnected"
        up.release()  # the rest of the answer is drained briefly: its connection may serve again
    finally:
        timer.cancel()


def _abort(request: Request) -> None:
    """Cut the agent's connection so a truncated body cannot pass for a whole one."""
    if request.transport is not None:
        request.transport.close()
