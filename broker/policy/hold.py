"""The approval hold as a request hook: calls a person must approve before they go upstream.

`policy.approve` holds a call spending over `above_cents`, calling one of `tools`, or matching
one of the REST `requests` globs; `card_data: approve` holds the calls whose answers carry card
data (MCP `get_card_details`, REST `GET …/details`). The hook runs after the route's
`RoutePolicy` (a call the policy refuses is never held).

Single-user routes: the call waits in the daemon's `ApprovalBook` (a desktop notification says
so) until a person approves it (`agentcard-broker approve ID`, the dashboard) and then goes on
byte for byte (the body is held whole in `RequestBody`), or is denied (`approval_denied`), or
nobody answers within `wait` (`approval_timeout`). An agent that leaves withdraws its hold.

Per-user routes: the end user decides, through a link like the connect page's. The call is
answered at once with `approval_required` (JSON-RPC -32042, URL elicitation) naming
`public_url/_broker/approve/ID`; the approval record waits in the state store (sealed, so any
replica serves the page). The end user's decision is kept under the call's digest; the agent's
identical call asked again takes it, once.

Owns: deciding which calls are held and why, what a person is shown of them (arguments with
held secrets masked, at most 4 KB), holding, and the store records of per-user decisions. Must
never: forward a held call before it is approved, let one approval serve two calls or a changed
call, or read a body no rule needs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from broker.body import RequestBody
from broker.config import Config, OAuthAuth
from broker.config.model import ApprovePolicy
from broker.errors import BrokerError
from broker.hooks import Call, RequestHook, Verdict
from broker.policy import notify
from broker.policy.approvals import Approval, ApprovalBook, call_digest, shown_arguments
from broker.policy.budget import BudgetLedger
from broker.policy.rules import deny, find_amounts, number, path_segments, rule_matches, unmatchable
from broker.scrub import SecretSet
from broker.store import ConnectRecord, StateStore, StoreError

if TYPE_CHECKING:
    from broker.runtime import Runtime

log = structlog.get_logger("broker")

APPROVE_PATH = "/_broker/approve/"
# state store ids (connect ids are token_urlsafe, without a colon; sign-ins use "oauth-state:")
APPROVAL_PREFIX = "approval:"  # + approval id: the pending approval an end user's link shows
APPROVED_PREFIX = "approved:"  # + call digest: the end user said yes; taken by the call, once
DENIED_PREFIX = "denied:"  # + call digest: the end user said no
CARD_DETAILS_TOOL = "get_card_details"
GONE_CHECK_S = 0.25  # how often a held call looks whether its agent is still there


@dataclass(frozen=True, slots=True)
class _Seen:
    """What the hook read of a call's body."""

    tools: tuple[str, ...] = ()
    amount: float | None = None
    shown: Any = None  # what a person is shown (None: nothing)


@dataclass(frozen=True)
class HoldPolicy:
    route: str
    approve: ApprovePolicy | None
    card_data: str
    book: ApprovalBook
    per_user: bool
    store: StateStore | None
    public_url: str
    notifier: notify.Notifier
    secrets: SecretSet
    amount_fields: tuple[str, ...]

    @property
    def settings(self) -> ApprovePolicy:
        return self.approve or ApprovePolicy()  # card_data: approve alone waits the default time

    # ------------------------------------------------------------ what is held, and why

    def _path_reasons(self, method: str, raw_path: str) -> list[str]:
        rules = self.approve.requests if self.approve is not None else ()
        card = self.card_data == "approve"
        if not rules and not card:
            return []
        why = unmatchable(raw_path)
        if why is not None:
            raise deny(self.route, "approve", why)
        segments = path_segments(raw_path)
        reasons = [r.text for r in rules if rule_matches(r, method, segments)][:1]
        if card and method == "GET" and segments and segments[-1] == "details":
            reasons.append("card data")
        return reasons

    def _read(self, doc: Any) -> _Seen:
        if isinstance(doc, list) or (isinstance(doc, dict) and "jsonrpc" in doc):
            messages = doc if isinstance(doc, list) else [doc]
            tools: list[str] = []
            params: list[Any] = []
            total: float | None = None
            for msg in messages:
                if not isinstance(msg, dict) or msg.get("method") != "tools/call":
                    continue
                p = msg.get("params")
                name = p.get("name") if isinstance(p, dict) else None
                if not isinstance(name, str):
                    continue
                tools.append(name)
                params.append(p)
                args = p.get("arguments") if isinstance(p, dict) else None
                total = self._add_amounts(total, args)
            shown: Any = params[0] if len(params) == 1 else params or doc
            return _Seen(tuple(tools), total, shown)
        return _Seen((), self._add_amounts(None, doc), doc)

    def _add_amounts(self, total: float | None, doc: Any) -> float | None:
        for _, raw in find_amounts(doc, self.amount_fields):
            n = number(raw)
            if n is not None:  # the route's policy refused the unreadable and negative ones already
                total = (total or 0.0) + max(n, 0.0)
        return total

    def _body_reasons(self, seen: _Seen) -> list[str]:
        reasons: list[str] = []
        a = self.approve
        above = a.above_cents if a is not None else None
        if above is not None and seen.amount is not None and seen.amount > above:
            reasons.append(f"amount {BudgetLedger.cents(seen.amount)} over {above}")
        if a is not None:
            reasons += [f"tool {t}" for t in dict.fromkeys(seen.tools) if t in a.tools]
        if self.card_data == "approve" and CARD_DETAILS_TOOL in seen.tools:
            reasons.append("card data")
        return reasons

    async def _seen(self, body: RequestBody, must_read: bool) -> tuple[bytes, _Seen]:
        raw = await body.read()
        try:
            doc = json.loads(raw) if raw else None
        except (ValueError, RecursionError):
            if must_read:
                raise deny(
                    self.route, "body", "the body must be JSON for this route's approvals and is not"
                ) from None
            return raw, _Seen(shown=raw.decode("utf-8", "replace") if raw else None)
        return raw, self._read(doc)

    # ------------------------------------------------------------ the hook

    async def request(self, call: Call, body: RequestBody) -> Verdict | None:
        """Let the call through (None) once a person approved it, or raise why not."""
        request = call.request
        method = request.method
        url = call.target.url
        reasons = self._path_reasons(method, url.raw_path)
        must_read = (self.approve is not None and self.approve.reads_body) or self.card_data == "approve"
        raw = b""
        seen = _Seen()
        if body.exists and (must_read or reasons):
            raw, seen = await self._seen(body, must_read)
            reasons = list(dict.fromkeys(reasons + self._body_reasons(seen)))
        if not reasons:
            return None
        if call.credential.ready_authorization() is None:
            # a call that could not be sent is not held: the user connects (or the key is set) first
            await call.credential.authorization()
        client, user = call.user if call.user is not None else (None, None)
        path = url.raw_path_qs
        digest = call_digest(self.route, client, user, method, path, raw)
        shown = "" if seen.shown is None else self.secrets.redact(shown_arguments(seen.shown))
        hold: dict[str, Any] = {
            "route": self.route,
            "method": method,
            "path": path,
            "digest": digest,
            "wait_s": self.settings.wait_s,
            "client": client,
            "user": user,
            "tools": seen.tools,
            "amount_cents": seen.amount,
            "arguments": shown,
            "reasons": tuple(reasons),
        }
        if self.per_user:
            await self._end_user_decides(digest, hold)
            return None
        approval = self.book.hold(**hold, require_passkey=self.settings.require_passkey)
        log.info("approval.held", id=approval.id, route=self.route, reasons=list(approval.reasons))
        try:
            self.notifier(notify.message(approval))
        except Exception:  # a notification is best effort
            log.warning("approval.notify_failed", exc_info=True)
        self._verdict(approval, await self._wait(call, approval))
        return None

    async def _wait(self, call: Call, approval: Approval) -> str:
        """The approval's final state. An agent that leaves meanwhile withdraws it: nobody can
        approve a call whose answer has nowhere to go (and whose agent may ask again)."""
        request = call.request
        before = request.on_gone
        request.on_gone = lambda: self.book.withdraw(approval)  # its connection was lost
        watch = asyncio.get_running_loop().create_task(self._watch(call, approval))
        try:
            return await self.book.wait(approval)
        finally:
            watch.cancel()
            request.on_gone = before

    async def _watch(self, call: Call, approval: Approval) -> None:
        # a closed connection shows first as an EOF, which tells no event: looked at while held
        while approval.state == "pending":
            if call.request.ended:
                self.book.withdraw(approval)
                return
            await asyncio.sleep(GONE_CHECK_S)

    def _verdict(self, approval: Approval, state: str) -> None:
        if state == "approved":
            log.info("approval.approved", id=approval.id, route=self.route, by=approval.decided_by)
            return None
        if state == "denied":
            raise BrokerError(
                "approval_denied", f"a person denied this request (approval {approval.id})", self.route
            )
        if self.book.closed:
            raise BrokerError(
                "approval_timeout",
                f"the broker stopped before anyone approved this request (approval {approval.id}); "
                "ask again when it is back",
                self.route,
            )
        raise BrokerError(
            "approval_timeout",
            f"nobody approved this request within {self.settings.wait_text} (approval {approval.id}); "
            "ask again when someone can approve it (agentcard-broker approvals)",
            self.route,
        )

    # ------------------------------------------------------------ per-user routes: the end user

    def _store_error(self, exc: StoreError) -> BrokerError:
        return BrokerError("store_unavailable", f"the state store cannot be used: {exc}", self.route)

    async def _end_user_decides(self, digest: str, hold: dict[str, Any]) -> None:
        """Returns when the end user approved this very call (once); raises otherwise."""
        store = self.store
        if store is None:
            raise BrokerError("store_unavailable", "the state store for approvals is not open", self.route)
        try:
            denied = await store.take_connect(DENIED_PREFIX + digest)
            approved = None if denied is not None else await store.take_connect(APPROVED_PREFIX + digest)
        except StoreError as exc:
            raise self._store_error(exc) from None
        if denied is not None:
            raise BrokerError("approval_denied", "the user denied this request", self.route)
        if approved is not None:
            log.info("approval.approved", route=self.route, by="end user")
            return
        approval = self.book.hold(**hold)
        record = ConnectRecord(self.route, hold["client"], hold["user"], "", json.dumps(approval.document()))
        try:
            await store.put_connect(APPROVAL_PREFIX + approval.id, record, self.settings.wait_s)
        except StoreError as exc:
            self.book.withdraw(approval)
            raise self._store_error(exc) from None
        url = f"{self.public_url}{APPROVE_PATH}{approval.id}"
        log.info("approval.held", id=approval.id[:8], route=self.route, reasons=list(approval.reasons))
        raise BrokerError(
            "approval_required",
            f"this request needs your approval ({'; '.join(approval.reasons)}): open {url} to approve "
            f"or deny it within {self.settings.wait_text}, then ask again",
            self.route,
            connect_url=url,
        )


async def record_decision(store: StateStore, approval_id: str, approve: bool) -> dict[str, Any] | None:
    """The end user's decision on their link: the pending record taken (once), the decision kept
    under the call's digest for the rest of its wait. The approval's document, or None when the
    link is unknown, used or expired."""
    record = await store.take_connect(APPROVAL_PREFIX + approval_id)
    if record is None:
        return None
    try:
        doc = json.loads(record.flow)
        left = float(doc["expires_at"]) - time.time()
        digest = str(doc["digest"])
    except (ValueError, TypeError, KeyError):
        return None
    if left <= 0:
        return None
    prefix = APPROVED_PREFIX if approve else DENIED_PREFIX
    decided = ConnectRecord(record.route, record.client, record.user, "", json.dumps({"id": approval_id}))
    await store.put_connect(prefix + digest, decided, left)
    return dict(doc)


async def read_pending(store: StateStore, approval_id: str) -> dict[str, Any] | None:
    """A pending approval's document for its page, left pending (taken and put back: the store
    offers only a take)."""
    record = await store.take_connect(APPROVAL_PREFIX + approval_id)
    if record is None:
        return None
    try:
        doc = json.loads(record.flow)
        left = float(doc["expires_at"]) - time.time()
    except (ValueError, TypeError, KeyError):
        return None
    if left <= 0:
        return None
    await store.put_connect(APPROVAL_PREFIX + approval_id, record, left)
    return dict(doc)


def after_policies(
    hooks: Mapping[str, tuple[RequestHook, ...]], config: Config, rt: Runtime
) -> dict[str, tuple[RequestHook, ...]]:
    """Each route's request hooks with its approval hold added last (after its policy)."""
    public_url = (config.public_url or "").rstrip("/")
    out = dict(hooks)
    for r in config.routes:
        p = r.policy
        if p is None or (p.approve is None and p.card_data != "approve"):
            continue
        per_user = isinstance(r.auth, OAuthAuth) and r.auth.per_user
        hold = HoldPolicy(
            route=r.name,
            approve=p.approve,
            card_data=p.card_data,
            book=rt.approvals,
            per_user=per_user,
            store=rt.state_store,
            public_url=public_url,
            notifier=rt.notifier,
            secrets=rt.secrets,
            amount_fields=p.amount_fields,
        )
        out[r.name] = (*out.get(r.name, ()), hold)
    return out
