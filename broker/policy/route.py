"""A route's policy as a request hook: the limits a user sets that an agent cannot talk its way past.

Owns: REST allow/deny by method and path glob (on the normalized path forwarded), MCP tool
allow/deny for `tools/call` (single and batch) and filtering of `tools/list` answers (JSON and
SSE), amount caps, the route's rolling budget (reserved before forwarding, refunded when the
upstream refused or never saw the request), its rate limit, `require_test_mode`, and asking for
`card_data: redact`'s masker on every answer of the route (`policy.card_data`). A body a
rule must read is read once, bounded, and forwarded byte for byte; one that cannot be parsed is
refused, never forwarded unchecked. Must never: let a concurrent burst spend past the budget, or
crash on any body an agent sends.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from broker import jsonrpc
from broker.body import RequestBody
from broker.config import Policy
from broker.errors import BrokerError
from broker.hooks import AnswerFactory, Call, Outcome, UserKey, Verdict
from broker.policy.budget import BudgetLedger
from broker.policy.card_data import CardMasker
from broker.policy.rules import deny, find_amounts, number, path_segments, rule_matches, unmatchable
from broker.store import SharedCounters, StoreError

USER_WINDOWS_SWEEP = 10_000  # per-user rate windows kept before the quiet ones are forgotten


@dataclass
class RoutePolicy:
    route: str
    policy: Policy
    ledger: BudgetLedger
    # `store: redis://`: budgets and rates counted in the store every replica shares
    shared: SharedCounters | None = None
    _recent: deque[float] = field(default_factory=deque)
    # on a per-user route the rate counts per end user, keyed by (platform client, user id)
    _by_user: dict[UserKey, deque[float]] = field(default_factory=dict)
    _refunds: set[asyncio.Task[None]] = field(default_factory=set)
    # `card_data: redact`: every answer of the route passes through a fresh CardMasker
    _answer: AnswerFactory | None = field(init=False, default=None)
    _plain: Verdict | None = field(init=False, default=None)  # the verdict of a call with no other

    def __post_init__(self) -> None:
        if self.policy.card_data == "redact":
            self._answer = CardMasker
            self._plain = Verdict(answer=CardMasker)

    def _account(self, user: UserKey | None) -> str:
        # on a per-user route each end user has the budget (and the rate) to themselves
        return self.route if user is None else "\x1f".join((self.route, *user))

    def _store_error(self, exc: StoreError) -> BrokerError:
        return BrokerError("store_unavailable", f"the shared store cannot be used: {exc}", self.route)

    # -- rate

    def _limited(self, wait: float) -> BrokerError:
        rate = self.policy.rate
        assert rate is not None
        seconds = max(1, math.ceil(wait))
        return BrokerError(
            "rate_limited",
            f"route {self.route!r} allows {rate.amount} requests per {rate.text}; try again in {seconds}s",
            self.route,
            retry_after=seconds,
        )

    async def _shared_rate(self, shared: SharedCounters, user: UserKey | None) -> None:
        rate = self.policy.rate
        assert rate is not None
        try:
            wait = await shared.hit_rate(self._account(user), rate.amount, rate.seconds)
        except StoreError as exc:
            raise self._store_error(exc) from None
        if wait > 0:
            raise self._limited(wait)

    def _rate(self, now: float, user: UserKey | None) -> None:
        rate = self.policy.rate
        if rate is None:
            return
        recent = self._recent if user is None else self._user_window(user, now - rate.seconds)
        while recent and recent[0] <= now - rate.seconds:
            recent.popleft()
        if len(recent) >= rate.amount:
            raise self._limited(recent[0] + rate.seconds - now)
        recent.append(now)

    def _user_window(self, user: UserKey, since: float) -> deque[float]:
        window = self._by_user.get(user)
        if window is None:
            if len(self._by_user) >= USER_WINDOWS_SWEEP:  # forget users quiet for a whole window
                self._by_user = {k: w for k, w in self._by_user.items() if w and w[-1] > since}
            window = self._by_user[user] = deque()
        return window

    # -- REST rules

    def _paths(self, method: str, segments: tuple[str, ...], shown: str) -> None:
        p = self.policy
        for rule in p.deny:
            if rule_matches(rule, method, segments):
                raise deny(self.route, f'deny "{rule.text}"', f"{method} {shown}")
        if p.allow is not None and not any(rule_matches(r, method, segments) for r in p.allow):
            raise deny(self.route, "allow", f"{method} {shown} matches no allow rule")

    # -- body rules

    def _amounts(self, doc: Any, rule_prefix: str = "") -> float:
        p = self.policy
        total = 0.0
        for name, raw in find_amounts(doc, p.amount_fields):
            if raw is None:
                continue
            n = number(raw)
            if n is None:
                raise deny(self.route, "amount_fields", f"{rule_prefix}{name} is not a number")
            if n < 0:
                raise deny(self.route, "amount_fields", f"{rule_prefix}{name} is negative")
            if p.max_amount_cents is not None and n > p.max_amount_cents:
                raise deny(
                    self.route,
                    "max_amount_cents",
                    f"{rule_prefix}{name} {BudgetLedger.cents(n)} is over the cap {p.max_amount_cents}",
                )
            total += n
        return total

    def _tool_allowed(self, name: str) -> bool:
        p = self.policy
        if name in p.tools_deny:
            return False
        return p.tools_allow is None or name in p.tools_allow

    def _jsonrpc(self, messages: list[Any], mode: str | None) -> tuple[float, set[Any]]:
        total = 0.0
        list_ids: set[Any] = set()
        for msg in messages:
            if not isinstance(msg, dict):
                raise deny(self.route, "body", "a JSON-RPC batch entry is not an object")
            method = msg.get("method")
            raw_params = msg.get("params")
            params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
            if method == "tools/list" and "id" in msg:
                key = msg["id"]
                list_ids.add(json.dumps(key, sort_keys=True))
            if method != "tools/call":
                continue
            name = params.get("name")
            if not isinstance(name, str):
                raise deny(self.route, "tools", "tools/call without a tool name")
            if not self._tool_allowed(name):
                raise deny(self.route, "tools", f"tool {name!r} is not allowed")
            args = params.get("arguments")
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise deny(self.route, "tools", f"tool {name!r} arguments are not an object")
            if self.policy.require_test_mode and (args.get("sandbox") is False or mode == "live"):
                raise deny(self.route, "require_test_mode", f"tool {name!r} would act outside the sandbox")
            total += self._amounts(args, rule_prefix=f"{name}.")
        return total, list_ids

    def inspect(self, doc: Any, mode: str | None) -> tuple[float, set[Any]]:
        """Check a parsed body: (the amount it spends, ids of tools/list requests in it).

        Raises BrokerError(policy_denied) and nothing else, whatever the document.
        """
        if isinstance(doc, list) or (isinstance(doc, dict) and "jsonrpc" in doc):
            return self._jsonrpc(doc if isinstance(doc, list) else [doc], mode)
        return self._amounts(doc), set()

    # -- the hook

    async def request(self, call: Call, body: RequestBody) -> Verdict | None:
        """Let the call through, or raise the refusal (BrokerError policy_denied / rate_limited)."""
        now = time.time()
        shared = self.shared
        if shared is None:
            self._rate(now, call.user)
        elif self.policy.rate is not None:
            await self._shared_rate(shared, call.user)
        p = self.policy
        request = call.request
        forwarded_path = call.target.url.raw_path
        if p.allow is not None or p.deny:
            why = unmatchable(forwarded_path)
            if why is not None:
                raise deny(self.route, "allow/deny", why)
        self._paths(request.method, path_segments(forwarded_path), forwarded_path)
        mode: str | None = None
        if p.require_test_mode:
            credential = call.credential
            await credential.prepare()  # only its mode (test or live) is asked here, never a token
            mode = credential.mode
            if mode == "live" or (credential.has_mode and mode is None):
                why = (
                    "the route's credential is live (real money)"
                    if mode == "live"
                    else "cannot tell test from live"
                )
                raise deny(self.route, "require_test_mode", why)
        if p.max_amount_cents is not None or p.budget is not None:
            wanted = {f.lower() for f in p.amount_fields}
            if any(k.lower() in wanted for k in request.query):
                raise deny(self.route, "amount_fields", "an amount in the query string")
        if not p.reads_body or not body.exists:
            return self._plain
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if not (
            ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))
        ):
            raise deny(self.route, "body", "rules on this route read the body: send it as application/json")
        if encoding not in ("", "identity"):
            raise deny(
                self.route, "body", "rules on this route read the body: send it without Content-Encoding"
            )
        try:
            doc = json.loads(await body.read())
        except (ValueError, RecursionError):
            raise deny(
                self.route, "body", "the body must be JSON for this route's rules and is not"
            ) from None
        total, list_ids = self.inspect(doc, mode)
        rewrite = None
        if list_ids and (p.tools_allow is not None or p.tools_deny):
            rewrite = _ToolsListFilter(list_ids, self._tool_allowed)
        if p.budget is None or total <= 0:
            return Verdict(rewrite=rewrite, answer=self._answer) if rewrite is not None else self._plain
        account = self._account(call.user)
        if shared is not None:
            return await self._shared_spend(shared, account, total, rewrite)
        used = await self.ledger.reserve(account, total, p.budget.amount, p.budget.seconds, now)
        if used is None:
            used_now = self.ledger.used(account, p.budget.seconds, now)
            raise deny(
                self.route,
                "budget",
                f"{BudgetLedger.cents(used_now)} of {p.budget.amount} used in the last {p.budget.text}; "
                f"this request needs {BudgetLedger.cents(total)}",
            )
        return Verdict(rewrite, _Reservation(self.ledger, account, now, total).settle, self._answer)

    async def _shared_spend(
        self, shared: SharedCounters, account: str, total: float, rewrite: _ToolsListFilter | None
    ) -> Verdict:
        budget = self.policy.budget
        assert budget is not None
        try:
            spend = await shared.reserve_budget(account, total, budget.amount, budget.seconds)
        except StoreError as exc:
            raise self._store_error(exc) from None
        if not spend.ok:
            raise deny(
                self.route,
                "budget",
                f"{BudgetLedger.cents(spend.used)} of {budget.amount} used in the last {budget.text}; "
                f"this request needs {BudgetLedger.cents(total)}",
            )
        give_back = _SharedReservation(shared, account, spend.entry, self._refunds)
        return Verdict(rewrite, give_back.settle, self._answer)

    async def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        p = self.policy
        now = time.time()
        if p.budget is not None:
            if self.shared is None:
                used: float | None = self.ledger.used(self.route, p.budget.seconds, now)  # int when whole
            else:
                try:
                    used = await self.shared.budget_used(self.route, p.budget.seconds)
                except StoreError:
                    used = None  # status still answers; the store's own health says why
            out["budget"] = {
                "amount_cents": p.budget.amount,
                "per": p.budget.text,
                "used": used,
                "left": None if used is None else BudgetLedger.cents(max(0, p.budget.amount - used)),
            }
        if p.rate is not None:
            out["rate"] = {"requests": p.rate.amount, "per": p.rate.text}
        return out


def _filter_message(msg: Any, ids: set[Any], allowed: Callable[[str], bool]) -> Any:
    # Every answer with a tools list is filtered, whatever its id: ids can be written many
    # ways (1, 1.0, 1e0) and an upstream may echo them in another.
    if not isinstance(msg, dict):
        return msg
    result = msg.get("result")
    if isinstance(result, dict) and isinstance(result.get("tools"), list):
        result["tools"] = [t for t in result["tools"] if isinstance(t, dict) and allowed(str(t.get("name")))]
    return msg


def filter_tools_list(raw: bytes, content_type: str, ids: set[Any], allowed: Callable[[str], bool]) -> bytes:
    """Remove tools the policy does not allow from tools/list answers, JSON or SSE."""
    return jsonrpc.rewrite(raw, content_type, lambda msg: _filter_message(msg, ids, allowed))


@dataclass(frozen=True, slots=True)
class _ToolsListFilter:
    ids: set[Any]
    allowed: Callable[[str], bool]

    def __call__(self, raw: bytes, content_type: str) -> bytes:
        return filter_tools_list(raw, content_type, self.ids, self.allowed)


@dataclass(frozen=True, slots=True)
class _Reservation:
    """A budget reservation: a request the upstream refused (4xx/5xx), or never saw, gives it
    back. One that may have reached it without an answer (a timeout) keeps it: the card may exist."""

    ledger: BudgetLedger
    route: str
    when: float
    amount: float

    def settle(self, outcome: Outcome) -> None:
        refused = outcome.upstream_status is not None and outcome.upstream_status >= 400
        if refused or not outcome.maybe_sent:
            self.ledger.refund(self.route, self.when, self.amount)


@dataclass(frozen=True, slots=True)
class _SharedReservation:
    """A reservation in the shared store, given back on the same terms as `_Reservation`. The
    refund is a store call: it runs beside the answer, never holding it up."""

    shared: SharedCounters
    account: str
    entry: str
    pending: set[asyncio.Task[None]]

    def settle(self, outcome: Outcome) -> None:
        refused = outcome.upstream_status is not None and outcome.upstream_status >= 400
        if refused or not outcome.maybe_sent:
            task = asyncio.get_running_loop().create_task(self._refund())
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _refund(self) -> None:
        try:
            await self.shared.refund_budget(self.account, self.entry)
        except StoreError:
            return  # kept counted: over-counting is the safe side of a budget
