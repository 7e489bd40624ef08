"""Held requests waiting for a person: `Approval` (one request, bound to what it does) and the
daemon's `ApprovalBook` (SPEC "Approvals, the dashboard, and card data").

An approval is for exactly one request: it is bound to the route, the platform client and end
user (per-user routes), the method, the path with its query, the tools it calls, and a SHA-256
of its body (`call_digest`), and it ends at `expires_at`. The book keeps the pending ones and
the last decisions in memory, one book per daemon on the Runtime (`rt.approvals`), surviving
reloads. Whoever shows them (the CLI through `/_broker/approvals`, the dashboard's event stream)
reads `Approval.document()`; whoever decides calls `ApprovalBook.decide`.

Owns: approval ids, the digest that binds a decision to one call, the pending and recent
approvals, their expiry, the passkey rule (approving a `require_passkey` approval needs the
dashboard's passkey; denying never does), and the change events (`subscribe`). Must never:
forward or refuse a request itself (the hold hook does, `policy/hold.py`), decide anything on
its own but an expiry or an agent leaving, let one approval be decided twice, or grow without
bound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from broker.errors import BrokerError

State = Literal["pending", "approved", "denied", "expired"]
MAX_PENDING = 1_000  # held requests at once; beyond this new holds are refused
MAX_RECENT = 200  # decided approvals kept for `recent()`
MAX_ARGUMENTS = 4096  # characters of arguments shown to a person
EVENT_QUEUE = 256  # events a subscriber may lag behind before the oldest are dropped
END_USER = "end user"  # `decided_by` of a per-user route's end user, through their link
PASSKEY_NEEDED = "this approval needs a passkey: approve it in the dashboard (agentcard-broker dashboard)"


class ApprovalError(Exception):
    """A decision that cannot be made (unknown, already decided, expired, needs a passkey). The
    text is safe to show anyone."""


def new_id(long: bool = False) -> str:
    """A random id in base32 (A-Z, 2-7): 8 characters to type on the command line (40 bits; the
    book refuses a duplicate), or 26 (130 bits) for an end user's link, where the id is the
    capability."""
    raw = base64.b32encode(os.urandom(16 if long else 5)).decode("ascii").rstrip("=")
    return raw


def _framed(part: bytes | None) -> bytes:
    if part is None:
        return b"\xff" * 8  # never a length: None differs from ""
    return len(part).to_bytes(8, "big") + part


def call_digest(route: str, client: str | None, user: str | None, method: str, path: str, body: bytes) -> str:
    """SHA-256 (hex) of one call: each part length-prefixed, so no two calls share an input.

    A JSON-RPC body is taken without its messages' `id`s (an MCP client numbers each attempt
    anew: the same call asked again must find its approval) and with every other byte of meaning
    kept: key order, duplicate keys, number spellings. Any other body is taken as it is."""
    rpc = rpc_canonical(body)
    parts = (route, client, user, method, path)
    h = hashlib.sha256(b"agentcard-broker approval v1")
    for p in parts:
        h.update(_framed(p.encode("utf-8") if p is not None else None))
    h.update(b"R" if rpc is not None else b"B")
    h.update(_framed(rpc if rpc is not None else body))
    return h.hexdigest()


class _Pairs(list[tuple[str, Any]]):
    """A JSON object as its pairs, in order, duplicates kept."""


class _Literal(str):
    """A JSON number (or NaN/Infinity) as it was spelled."""

    __slots__ = ()


def _encode(value: Any) -> str:
    if isinstance(value, _Pairs):
        return "{" + ",".join(json.dumps(k) + ":" + _encode(v) for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    if isinstance(value, _Literal):
        return str(value)
    return json.dumps(value)


def rpc_canonical(body: bytes) -> bytes | None:
    """A JSON-RPC request or batch without its messages' ids, else None (not JSON-RPC)."""
    if not body or body.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        doc = json.loads(body, object_pairs_hook=_Pairs, parse_float=_Literal, parse_int=_Literal,
                         parse_constant=_Literal)  # fmt: skip
    except (ValueError, RecursionError):
        return None
    messages = doc if isinstance(doc, list) and not isinstance(doc, _Pairs) else [doc]
    if not messages or not all(isinstance(m, _Pairs) and any(k == "jsonrpc" for k, _ in m) for m in messages):
        return None
    stripped = [_Pairs((k, v) for k, v in m if k != "id") for m in messages]
    try:
        text = _encode(stripped if messages is doc else stripped[0])
    except RecursionError:
        return None
    return text.encode("utf-8")


def shown_arguments(doc: Any) -> str:
    """What a person reads: pretty JSON (a body that is not JSON as its text), at most
    MAX_ARGUMENTS characters."""
    if isinstance(doc, str):
        text = doc
    else:
        try:
            text = json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=False)
        except (ValueError, TypeError, RecursionError):
            text = repr(doc)
    if len(text) > MAX_ARGUMENTS:
        text = text[: MAX_ARGUMENTS - 40] + f"\n… ({len(text) - MAX_ARGUMENTS + 40} more characters)"
    return text


@dataclass(eq=False)
class Approval:
    """One held request and its decision."""

    id: str
    route: str
    client: str | None  # per-user routes: the platform client; None on single-user routes
    user: str | None  # per-user routes: the end user's id; None on single-user routes
    method: str
    path: str  # as forwarded, with its query
    tools: tuple[str, ...]  # tools/call names in the body (a batch may call several)
    amount_cents: float | None  # the amount it spends, summed over `amount_fields`
    arguments: str  # what a person sees: the tools/call params or the JSON body, held secrets masked
    digest: str  # call_digest(): the call this approval is for, and no other
    reasons: tuple[str, ...]  # why it is held, in plain words
    created_at: float  # epoch seconds
    expires_at: float
    require_passkey: bool = False
    state: State = "pending"
    decided_by: str | None = None  # "cli", "dashboard", "dashboard+passkey", "end user"
    decided_at: float | None = None
    _event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def per_user(self) -> bool:
        return self.user is not None

    def document(self) -> dict[str, Any]:
        """JSON-safe: what the CLI, the dashboard and an end user's page show."""
        return {
            "id": self.id,
            "route": self.route,
            "client": self.client,
            "user": self.user,
            "method": self.method,
            "path": self.path,
            "tools": list(self.tools),
            "amount_cents": self.amount_cents,
            "arguments": self.arguments,
            "digest": self.digest,
            "reasons": list(self.reasons),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "require_passkey": self.require_passkey,
            "state": self.state,
            "decided_by": self.decided_by,
            "decided_at": self.decided_at,
        }


class ApprovalBook:
    """The daemon's held requests: pending ones by id, and the last decisions."""

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._pending: dict[str, Approval] = {}
        self._recent: deque[Approval] = deque(maxlen=MAX_RECENT)
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.closed = False  # the daemon is stopping

    # ------------------------------------------------------------ holding

    def hold(
        self,
        *,
        route: str,
        method: str,
        path: str,
        digest: str,
        wait_s: float,
        client: str | None = None,
        user: str | None = None,
        tools: tuple[str, ...] = (),
        amount_cents: float | None = None,
        arguments: str = "",
        reasons: tuple[str, ...] = (),
        require_passkey: bool = False,
    ) -> Approval:
        """A new pending approval, expiring after `wait_s`. Raises BrokerError(approval_timeout)
        when MAX_PENDING requests wait already."""
        if self.closed:
            raise BrokerError("approval_timeout", "the broker is stopping: ask again when it is back", route)
        if len(self._pending) >= self.max_pending:
            raise BrokerError(
                "approval_timeout",
                f"too many requests wait for approval ({self.max_pending}); decide those first "
                "(agentcard-broker approvals), then try again",
                route,
            )
        approval_id = new_id(long=user is not None)
        while approval_id in self._pending or self.get(approval_id) is not None:
            approval_id = new_id(long=user is not None)
        now = time.time()
        approval = Approval(
            id=approval_id,
            route=route,
            client=client,
            user=user,
            method=method,
            path=path,
            tools=tools,
            amount_cents=amount_cents,
            arguments=arguments,
            digest=digest,
            reasons=reasons,
            created_at=now,
            expires_at=now + wait_s,
            require_passkey=require_passkey,
        )
        loop = asyncio.get_running_loop()
        approval._timer = loop.call_later(wait_s, self._finish, approval, "expired", None)
        self._pending[approval_id] = approval
        self._publish(approval)
        return approval

    async def wait(self, approval: Approval) -> State:
        """Until the approval is decided or expires: its final state. A cancelled wait (the
        request is gone) withdraws it: nobody can approve a request that will not be sent."""
        try:
            await approval._event.wait()
        except asyncio.CancelledError:
            self.withdraw(approval)
            raise
        return approval.state

    def close(self) -> None:
        """The daemon stops: every pending approval ends undecided (its request is not sent),
        and no new one is held."""
        self.closed = True
        for approval in list(self._pending.values()):
            self._finish(approval, "expired", None)

    def withdraw(self, approval: Approval) -> None:
        """The agent left: the hold ends as expired, undecided."""
        if approval.state == "pending":
            self._finish(approval, "expired", None)

    # ------------------------------------------------------------ deciding

    def decide(self, approval_id: str, approve: bool, by: str, passkey: bool = False) -> Approval:
        """Approve or deny a pending approval. Raises ApprovalError (unknown, already decided,
        expired, a passkey needed) with a text safe to show. On a per-user route only the end
        user decides, through their link (`by=END_USER`)."""
        approval = self._pending.get(approval_id)
        if approval is None:
            done = self._find_recent(approval_id)
            if done is None:
                raise ApprovalError(f"no approval {approval_id!r} is waiting (unknown, or long gone)")
            if done.state == "expired":
                raise ApprovalError(f"approval {approval_id} expired: the request was not sent")
            raise ApprovalError(f"approval {approval_id} was already {done.state} ({done.decided_by})")
        if time.time() >= approval.expires_at:
            self._finish(approval, "expired", None)
            raise ApprovalError(f"approval {approval_id} expired: the request was not sent")
        if approval.per_user and by != END_USER:
            raise ApprovalError(
                f"approval {approval_id} is for {approval.client} user {approval.user}: on a per-user "
                "route the end user decides, through the link they were sent"
            )
        if approve and approval.require_passkey and not passkey and by != END_USER:
            raise ApprovalError(PASSKEY_NEEDED)
        self._finish(approval, "approved" if approve else "denied", by)
        return approval

    def _finish(self, approval: Approval, state: State, by: str | None) -> None:
        if approval.state != "pending":
            return
        approval.state = state
        approval.decided_by = by
        approval.decided_at = time.time()
        if approval._timer is not None:
            approval._timer.cancel()
            approval._timer = None
        self._pending.pop(approval.id, None)
        self._recent.append(approval)
        approval._event.set()
        self._publish(approval)

    # ------------------------------------------------------------ reading

    def get(self, approval_id: str) -> Approval | None:
        return self._pending.get(approval_id) or self._find_recent(approval_id)

    def _find_recent(self, approval_id: str) -> Approval | None:
        return next((a for a in reversed(self._recent) if a.id == approval_id), None)

    def pending(self) -> list[Approval]:
        """Waiting approvals, oldest first."""
        return list(self._pending.values())

    def recent(self, n: int = 50) -> list[Approval]:
        """The last `n` decided (or expired) approvals, newest first."""
        return list(reversed(self._recent))[: max(0, n)]

    # ------------------------------------------------------------ events

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue of `{"type": "approval", "approval": document}`, one per change (held,
        decided, expired). A subscriber that lags EVENT_QUEUE events behind loses the oldest."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=EVENT_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    def _publish(self, approval: Approval) -> None:
        if not self._subscribers:
            return
        event = {"type": "approval", "approval": approval.document()}
        for queue in self._subscribers:
            if queue.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(event)
