"""The walk of one request, and the one place hooks are registered.

    agent -> guard -> route -> identity -> request hooks -> forward (credential, upstream)
    agent <- answer (scrubbed, rewritten, transformed) <- ... ; then settle + done hooks

Each step hands the next a small immutable value (`Call`, `Verdict`, `Forwarded`, `Outcome`);
nothing writes into a bag a later step reads. The whole request sees the one snapshot that was
in force when it arrived.

Owns: the order of the steps, answering refusals (a request the guard refused is answered
without reading a byte of its body; later errors are answered in the agent's terms, JSON-RPC
with its id when it sent one), the request id, and calling every hook. Must never: know what a
hook does, or let a request pick its destination.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker import jsonrpc, proxy
from broker.admin import api as admin
from broker.body import RequestBody
from broker.errors import BrokerError, error_response
from broker.hooks import Call, DoneHook, Outcome, RequestHook, Verdict

if TYPE_CHECKING:
    from broker.http.server import Request, StreamResponse
    from broker.runtime import Runtime

_new = tuple.__new__
DETAILED = frozenset({"policy_denied", "rate_limited"})  # the audit line says which rule refused
_NOBODY = (None, None)
NOT_FORWARDED = proxy.Forwarded(None, None, None, False, None, 0)


@dataclass(frozen=True, slots=True)
class Hooks:
    """Every hook in force: request hooks by route, and done hooks for every answered request."""

    by_route: Mapping[str, tuple[RequestHook, ...]]
    done: tuple[DoneHook, ...]


def register_hooks(routes: Mapping[str, tuple[RequestHook, ...]], done: tuple[DoneHook, ...]) -> Hooks:
    """The hook registry: a feature joins the walk here and nowhere else. Request hooks run in
    the order given (a route's policy today); done hooks after every answer (metrics, audit)."""
    return Hooks(by_route=dict(routes), done=done)


class Pipeline:
    """Serves each request the engine hands over, against the runtime's current snapshot."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # a random prefix per process and a counter: unique across restarts, and no getrandom
        # system call per request (it was 2.5% of the daemon's CPU at 200 requests/s)
        prefix = os.urandom(4).hex()
        self._ids = (f"{prefix}{n:08x}" for n in itertools.count(1))

    async def handle(self, request: Request) -> StreamResponse:
        started = time.perf_counter()
        rt = self.rt
        snap = rt.snapshot  # one read: the request walks one config from start to end
        rid = next(self._ids)
        call: Call | None = None
        body: RequestBody | None = None
        verdicts: tuple[Verdict, ...] = ()
        fwd: proxy.Forwarded | None = None
        err: BrokerError | None = None
        status, audited = 500, True
        rt.in_flight += 1
        try:
            try:
                err = snap.guard(request)  # Host, Origin, peer: refused unread
                target = snap.table.target(request.raw_path) if err is None else None
                if err is None and target is None:
                    audited = False  # the broker's own endpoints
                    return await admin.handle(request, rt)
                if target is not None:
                    route = target.route.name
                    # before identity: its refusals are answered in JSON-RPC too (the id is read
                    # from the body only then, bounded)
                    body = RequestBody(request, snap.config.limits.max_body_bytes, route)
                    own = None
                    if route in snap.per_user:  # identity: the platform client, then its end user
                        user, credential = await snap.end_user(request, target.route)
                        call = _new(Call, (rid, route, request, target, credential, user))
                        own = credential.answer_mask  # that user's tokens, masked in their answers
                    else:
                        call = _new(Call, (rid, route, request, target, snap.credentials[route], None))
                    for hook in snap.hooks.by_route[route]:
                        verdict = await hook.request(call, body)
                        if verdict is not None:
                            verdicts += (verdict,)
                    if verdicts:
                        rewrites = tuple(v.rewrite for v in verdicts if v.rewrite is not None)
                        answers = tuple(v.answer for v in verdicts if v.answer is not None)
                    else:
                        rewrites = answers = ()
                    if own is not None:
                        mask = own()  # read as forwarding starts: a refresh just before counts
                        answers = (mask, *answers) if mask is not None else answers
                    fwd = await proxy.forward(call, body, rewrites, answers, snap.outbound, rt.pool)
                    err = fwd.refusal
            except BrokerError as exc:
                err = exc
            if fwd is not None and fwd.response is not None:
                resp = fwd.response
            else:
                assert err is not None
                err = self._answerable(err, call)
                resp = await _error_response(request, err, body)
                if not resp.prepared:
                    resp.headers["X-Broker-Request-Id"] = rid
            status = resp.status
            return resp
        finally:
            rt.in_flight -= 1
            if audited:
                self._done(snap.hooks, request, rid, call, body, fwd, err, status, verdicts, started)

    def _answerable(self, err: BrokerError, call: Call | None) -> BrokerError:
        # a message can quote an upstream's words (a token endpoint's error): mask held secrets
        route = err.route or (call.route if call is not None else None)
        message = self.rt.secrets.redact(err.message)
        return BrokerError(err.code, message, route, err.retry_after, err.http_status, err.connect_url)

    @staticmethod
    def _done(
        hooks: Hooks,
        request: Request,
        rid: str,
        call: Call | None,
        body: RequestBody | None,
        fwd: proxy.Forwarded | None,
        err: BrokerError | None,
        status: int,
        verdicts: tuple[Verdict, ...],
        started: float,
    ) -> None:
        _, _, up_status, maybe_sent, error, bytes_out = fwd or NOT_FORWARDED
        who = call[5] if call is not None else None
        client, user = who if who is not None else _NOBODY
        outcome = _new(  # tuple.__new__ straight: this runs for every request
            Outcome,
            (
                rid,
                call[1] if call is not None else None,  # its route
                request.method,
                request.raw_path,
                status,
                time.perf_counter() - started,
                up_status,
                maybe_sent,
                error or (err.code if err is not None else None),
                err.message if err is not None and err.code in DETAILED else None,
                body.size if body is not None else 0,
                bytes_out,
                client,
                user,
            ),
        )
        for verdict in verdicts:
            if verdict.settle is not None:
                verdict.settle(outcome)
        for hook in hooks.done:
            hook.done(outcome)


async def _error_response(request: Request, err: BrokerError, body: RequestBody | None) -> StreamResponse:
    """The error in the agent's terms: a JSON-RPC error with its request's id when it sent one.
    The body is looked at only past the guard (`body` is None before), bounded, and never one
    already streamed upstream."""
    raw = await body.for_error() if body is not None else None
    is_rpc, rpc_id = jsonrpc.request_id(raw)
    return error_response(err, jsonrpc_id=rpc_id, jsonrpc=is_rpc)
