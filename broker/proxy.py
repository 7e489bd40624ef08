"""Forwarding one request to its upstream and streaming the answer back.

Owns: header hygiene both ways (agent credentials, cookies and hop-by-hop headers out; the
route's credential in, added last), streaming bodies both ways with bounded memory, timeouts
(connect, first byte, idle), the one refresh-and-retry after an upstream 401 (kept from the
agent), redirects passed back (never followed) with Location rewritten into the broker, and
passing every answer through the answer filter (the scrubber), then the rewrites and answer
transforms hooks asked for (framing an answer a transform may resize anew). Knows nothing of
policies: it is handed a body, rewrites and transforms. Must never: follow a redirect, retry a
request that could spend money, buffer a whole body, or let a held secret through.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from broker.body import BodyTooLarge, RequestBody
from broker.errors import BrokerError
from broker.hooks import Chain
from broker.http import client as upstream
from broker.http.framing import NO_BODY_STATUS, tokens
from broker.http.server import HeadersWithBody, Request, StreamResponse

if TYPE_CHECKING:
    from broker.config import Auth, Timeouts
    from broker.hooks import AnswerFactory, AnswerTransform, Call, Rewrite
    from broker.routing import RouteTable, Target
    from broker.scrub import StreamScrubber

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
MAX_REWRITTEN = 16 * 1024 * 1024  # an answer a hook rewrites is read whole, up to this
REPLAY_LIMIT = 1024 * 1024  # bodies up to this are held so a 401 can be retried after a refresh
WHOLE_LIMIT = 256 * 1024  # an answer already received whole, up to this decoded, goes out in one write


class AnswerFilter(Protocol):
    """What every answer passes through on its way to the agent (the scrubber of held secrets)."""

    def may_hold(self, text: str) -> bool: ...
    def redact(self, text: str) -> str: ...
    def scrub_whole(self, body: bytes) -> bytes: ...
    def scrubber(self) -> StreamScrubber: ...


@dataclass(frozen=True, slots=True)
class Outbound:
    """What forwarding takes from the snapshot in force."""

    timeouts: Timeouts
    table: RouteTable  # for Location headers pointing back into the broker
    answer: AnswerFilter


class Forwarded(NamedTuple):
    """How forwarding went: the answer sent, or the refusal for the pipeline to answer."""

    response: StreamResponse | None
    refusal: BrokerError | None
    upstream_status: int | None
    maybe_sent: bool  # the upstream may have seen the request (so it may have acted on it)
    error: str | None  # what broke (an upstream or agent failure), for the audit line and metrics
    bytes_out: int


_new = tuple.__new__


class _Trip:
    """One forward's progress, private to this module; `forward` returns it as a Forwarded."""

    __slots__ = ("bytes_out", "error", "maybe_sent", "upstream_status")

    def __init__(self) -> None:
        self.upstream_status: int | None = None
        self.maybe_sent = False
        self.error: str | None = None
        self.bytes_out = 0

    def result(self, response: StreamResponse | None, refusal: BrokerError | None = None) -> Forwarded:
        # tuple.__new__ straight: a named tuple's own __new__ is one more Python call per request
        return _new(
            Forwarded, (response, refusal, self.upstream_status, self.maybe_sent, self.error, self.bytes_out)
        )


_PLAIN_CONNECTION = frozenset({"keep-alive", "close", "Keep-Alive", "Close", "keep-alive, close"})


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str] | frozenset[str]:
    """The field names a Connection header lists, lower case (RFC 9110 §7.6.1)."""
    values = headers.getall("Connection", [])
    if len(values) == 1 and values[0] in _PLAIN_CONNECTION:
        return frozenset()  # the usual `keep-alive` or `close`: names nothing not already dropped
    return set(tokens(values))


_NO_HEADERS: frozenset[str] = frozenset()


def _identity_headers(auth: Auth) -> frozenset[str]:
    names = (getattr(auth, "user_header", None), getattr(auth, "user_label_header", None))
    return frozenset(n.lower() for n in names if n)


def upstream_headers(
    agent: CIMultiDictProxy[str], credential: dict[str, str], also_drop: frozenset[str] = _NO_HEADERS
) -> CIMultiDict[str]:
    """Agent headers minus credentials/hop-by-hop, then the route's credential added last."""
    drop = REQUEST_DROP | _connection_tokens(agent) if "Connection" in agent else REQUEST_DROP
    if also_drop:
        drop = drop | also_drop
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in agent.items():
        lower = name.lower()
        if lower not in drop and not lower.startswith("x-forwarded-"):
            out.add(name, value)
    out["Accept-Encoding"] = UPSTREAM_ACCEPT_ENCODING
    out.update(credential)  # after filtering: `Connection: Authorization` cannot remove it
    return out


def response_headers(up: upstream.Response, answer: AnswerFilter, location: str | None) -> CIMultiDict[str]:
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
    if answer.may_hold("\n".join([v for _, v in kept])):  # one look at all values, usually enough
        kept = [(name, answer.redact(value)) for name, value in kept]
    return CIMultiDict(kept)


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


async def forward(
    call: Call,
    body: RequestBody,
    rewrites: tuple[Rewrite, ...],
    transforms: tuple[AnswerFactory, ...],
    out: Outbound,
    pool: upstream.Pool,
) -> Forwarded:
    """Send the call upstream with its credential and stream the answer back to the agent.

    `body`: what a hook already read of it is forwarded byte for byte; otherwise it streams.
    `rewrites`: applied, in order, to a successful answer read whole (a filtered tools/list).
    `transforms`: each makes a transform every answer body passes through, after the scrubber.
    """
    trip = _Trip()
    _, _, request, target, credential, user = call  # unpacked once: a named tuple's fields are slow on 3.11
    # a per-user route's identity headers are the broker's business, not the upstream's
    identity = _identity_headers(target.route.auth) if user is not None else _NO_HEADERS
    try:
        if body.declared_too_large:
            raise body.too_large()
        auth = credential.ready_authorization() or await credential.authorization()
        headers = upstream_headers(request.headers, auth, identity)
        if request.version >= (1, 1) and request.headers.get("Expect", "").lower() == "100-continue":
            # only now, with the request accepted, ask the agent for its body (curl waits 1 s otherwise)
            request.send_continue()
        # A credential that can be refreshed gets "401 -> refresh once -> retry once", which needs
        # the body twice: small bodies (JSON-RPC calls) are held; large ones stream without a retry.
        length = request.content_length
        replayable = body.held is not None or (
            credential.can_refresh and (not body.exists or (length is not None and length <= REPLAY_LIMIT))
        )
        if replayable and body.exists:
            await body.read()
        up = await _send(call, headers, body, out.timeouts, pool, trip)
        if up.status == 401 and replayable:
            up.release()
            if await credential.retry_after_rejection(auth):
                headers = upstream_headers(request.headers, await credential.authorization(), identity)
                up = await _send(call, headers, body, out.timeouts, pool, trip)
        if up.status == 403 and credential.can_refresh:  # RFC 6750 §3.1 step-up: a login for more scope
            from broker.auth.oauth.challenge import insufficient_scope

            wanted = insufficient_scope(up.headers.getall("WWW-Authenticate", ()))
            if wanted is not None:
                trip.upstream_status = 403
                stepped = await credential.step_up(wanted)
                if stepped is not None:
                    up.release()
                    raise stepped
        try:
            headers = _answer_head(call, up, out, trip)
            if not rewrites and request.method != "HEAD" and up.status not in NO_BODY_STATUS:
                whole = up.whole(WHOLE_LIMIT)
                if whole is not None:  # the usual small JSON answer, already here: one write, no timer
                    return trip.result(
                        await _send_whole(request, up.status, headers, whole, out.answer, trip, transforms)
                    )
            return trip.result(await _answer(request, up, headers, rewrites, transforms, out, trip))
        finally:
            up.release()
    except BrokerError as err:
        return trip.result(None, err)


async def _send(
    call: Call,
    headers: CIMultiDict[str],
    body: RequestBody,
    timeouts: Timeouts,
    pool: upstream.Pool,
    trip: _Trip,
) -> upstream.Response:
    """One upstream request, with the held body or else the agent's, streamed."""
    _, route, request, target, _, _ = call
    streamed = body.held is None and body.exists
    # a pooled keep-alive connection the upstream had closed: requests that cannot spend try twice
    attempts = 2 if request.method in SAFE_TO_RETRY and not body.exists else 1
    for attempt in range(attempts):
        trip.maybe_sent = True
        try:
            return await pool.request(
                request.method,
                target.url,
                headers.items(),
                body.chunks() if streamed else body.held,
                length=request.content_length if streamed else None,
                connect_timeout=timeouts.connect,
                head_timeout=timeouts.first_byte,
            )
        except BodyTooLarge:
            raise body.too_large() from None
        except upstream.TimedOut:
            trip.error = "upstream_timeout"
            raise BrokerError(
                "upstream_timeout", f"the upstream did not answer within {timeouts.first_byte:g}s", route
            ) from None
        except upstream.UpstreamError as exc:
            if body.exceeded:
                raise body.too_large() from None
            if not exc.sent:
                trip.maybe_sent = False  # no connection: nothing reached the upstream
            if isinstance(exc, upstream.BadAnswer):
                raise _malformed(trip, route, f": {exc}") from None
            # most often a pooled keep-alive connection the upstream had just closed
            if isinstance(exc, upstream.Disconnected) and exc.reused and attempt + 1 < attempts:
                continue
            trip.error = "upstream_unreachable"
            raise BrokerError(
                "upstream_unreachable", f"cannot reach the upstream: {type(exc).__name__}", route
            ) from None
    raise AssertionError("unreachable")


def _malformed(trip: _Trip, route: str, why: str = "") -> BrokerError:
    trip.error = "upstream_error"
    return BrokerError(
        "upstream_error", f"the upstream's answer is malformed or ambiguously framed{why}", route
    )


def _answer_head(call: Call, up: upstream.Response, out: Outbound, trip: _Trip) -> CIMultiDict[str]:
    """The upstream's answer checked and its headers made fit for the agent."""
    rid, route, request, target, credential, _ = call
    trip.upstream_status = up.status
    if up.failed:  # broken right after its head, before anything went to the agent
        raise _malformed(trip, route)
    credential.on_upstream_status(up.status)
    if up.status == 401:
        # an agent seeing 401/WWW-Authenticate would start its own OAuth against AgentCard
        code = "needs_login" if credential.state == "needs_login" else "credential_rejected"
        raise BrokerError(code, f"AgentCard refused the broker's credential; {credential.reason}", route)
    location = _rewrite_location(up, target, out.table, request.headers.get("Host", "127.0.0.1"))
    headers = response_headers(up, out.answer, location)
    headers["X-Broker-Request-Id"] = rid
    return headers


async def _answer(
    request: Request,
    up: upstream.Response,
    headers: CIMultiDict[str],
    rewrites: tuple[Rewrite, ...],
    transforms: tuple[AnswerFactory, ...],
    out: Outbound,
    trip: _Trip,
) -> StreamResponse:
    """An answer that is not already here whole: rewritten, HEAD, bodiless, or streamed."""
    if rewrites and up.status == 200:
        rewritten = await _read_whole(up, out.timeouts.idle)
        for rewrite in rewrites:
            rewritten = rewrite(rewritten, up.headers.get("Content-Type", ""))
        return await _send_whole(request, up.status, headers, rewritten, out.answer, trip, transforms)
    if transforms:  # they may change the length: the answer goes out chunked
        headers.popall("Content-Length", None)
    # A body of known length goes out with the headers in one write; an open-ended stream
    # (SSE) gets its headers at once so the agent sees the answer start.
    cls = HeadersWithBody if "Content-Length" in headers else StreamResponse
    resp = cls(up.status, headers)  # the standard reason phrase: the upstream's could carry anything
    try:
        await resp.prepare(request)
    except ConnectionError:  # the agent left before the answer: not an error of ours
        trip.error = "agent_disconnected"
        return resp
    if request.method == "HEAD" or up.status in NO_BODY_STATUS:
        await resp.write_eof()
        return resp
    # an agent that leaves mid-stream frees the upstream answer at once (drained briefly,
    # then closed), rather than when the upstream next sends something
    request.on_gone = up.release
    try:
        await _stream(request, up, resp, out.answer, out.timeouts.idle, trip, transforms)
    finally:
        request.on_gone = None
    return resp


async def _send_whole(
    request: Request,
    status: int,
    headers: CIMultiDict[str],
    body: bytes,
    answer: AnswerFilter,
    trip: _Trip,
    transforms: tuple[AnswerFactory, ...],
) -> StreamResponse:
    scrubbed = answer.scrub_whole(body)
    for make in transforms:
        transform = make()
        scrubbed = transform.feed(scrubbed) + transform.flush()
    headers["Content-Length"] = str(len(scrubbed))  # a decoded body's length, or the same one
    resp = HeadersWithBody(status, headers)
    try:
        await resp.prepare(request)
        await resp.write_eof(scrubbed)
    except ConnectionError:
        trip.error = "agent_disconnected"
        return resp
    trip.bytes_out = len(scrubbed)
    return resp


async def _read_whole(up: upstream.Response, idle: float) -> bytes:
    """An answer a hook rewrites, read whole (bounded, and by timeouts.idle between chunks)."""
    parts: list[bytes] = []
    size = 0
    async with asyncio.timeout(idle) as deadline:
        async for chunk in up.iter_any():
            size += len(chunk)
            if size > MAX_REWRITTEN:
                raise BrokerError(
                    "upstream_unreachable", "the upstream's answer is too large to filter", None
                )
            parts.append(chunk)
            deadline.reschedule(asyncio.get_running_loop().time() + idle)
    return b"".join(parts)


async def _stream(
    request: Request,
    up: upstream.Response,
    resp: StreamResponse,
    answer: AnswerFilter,
    idle: float,
    trip: _Trip,
    transforms: tuple[AnswerFactory, ...],
) -> None:
    scrubber: AnswerTransform = answer.scrubber()
    if transforms:
        scrubber = Chain(scrubber, tuple(make() for make in transforms))
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
                trip.bytes_out += len(out)
            last = loop.time()
        tail = scrubber.flush()
        if tail:
            await resp.write(tail)
            trip.bytes_out += len(tail)
        timer.cancel()
        await resp.write_eof()
        if request.gone and trip.error is None:
            trip.error = "agent_disconnected"  # left after the last bytes went out, before the end
    except asyncio.CancelledError:
        if not expired or task.uncancel() > 0:
            raise  # a cancel of our own caller's, not the idle deadline's
        trip.error = "stream_idle_timeout"
        up.close()
        _abort(request)
    except upstream.UpstreamError:
        if request.gone:  # the agent left and the answer was released: it drains, maybe to be reused
            trip.error = "agent_disconnected"
        else:
            trip.error = "upstream_stream_broken"
            up.close()
            _abort(request)
    except ConnectionError:
        trip.error = "agent_disconnected"
        up.release()  # the rest of the answer is drained briefly: its connection may serve again
    finally:
        timer.cancel()


def _abort(request: Request) -> None:
    """Cut the agent's connection so a truncated body cannot pass for a whole one."""
    if request.transport is not None:
        request.transport.close()
