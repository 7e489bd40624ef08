"""Route policy: the limits a user sets that an agent cannot talk its way past.

Owns: REST allow/deny by method and path glob (on the normalized path forwarded), MCP tool
allow/deny for `tools/call` (single and batch) and filtering of `tools/list` answers (JSON and
SSE), amount caps, a rolling budget kept across restarts (crash-safe writes), per-route rate
limits, and `require_test_mode`. A body a rule must read is read once, bounded, and forwarded
byte for byte; one that cannot be parsed is refused, never forwarded unchecked. Must never:
let a concurrent burst spend past the budget, or crash on any body an agent sends.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from broker import jsonrpc
from broker.config import PathRule, Policy
from broker.errors import BrokerError
from broker.http.server import Request

MAX_FILTERED_RESPONSE = 16 * 1024 * 1024
_UNCHECKABLE = re.compile(r"%(2f|5c|25)", re.IGNORECASE)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _deny(route: str, rule: str, why: str) -> BrokerError:
    return BrokerError("policy_denied", f"refused by route {route!r} policy ({rule}): {why}", route)


# ---------------------------------------------------------------- path rules


def _match(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, path[i:]) for i in range(len(path) + 1))
    if not path:
        return False
    return fnmatch.fnmatchcase(path[0], head.lower()) and _match(rest, path[1:])


def rule_matches(rule: PathRule, method: str, path_segments: tuple[str, ...]) -> bool:
    return rule.method in ("*", method) and _match(rule.segments, path_segments)


def path_segments(raw_path: str) -> tuple[str, ...]:
    """The segments rules are matched against: decoded, in lower case, empty ones (a trailing
    slash) left out. Upstream frameworks differ in all three (Express matches without regard to
    case and to a trailing slash), so a rule matches every spelling any of them would serve."""
    return tuple(unquote(s).lower() for s in raw_path.split("/") if s)


def unmatchable(raw_path: str) -> str | None:
    """Why a path cannot be checked against path rules, or None.

    `;params` (Tomcat and Spring cut them off a segment, Express keeps them), `\\`, `%2F` and
    `%5C` (read as separators by some servers and proxies) and `%25` (a second decoding turns
    `det%2561ils` into `details`) each give a path that one upstream reads as another.
    """
    if ";" in raw_path:
        return "path parameters (;) cannot be checked against path rules"
    if "\\" in raw_path or _UNCHECKABLE.search(raw_path):
        return "an encoded /, \\ or % in the path cannot be checked against path rules"
    return None


# ---------------------------------------------------------------- the budget ledger


class BudgetLedger:
    """Amounts let through per route, with timestamps, in one JSON file (atomic replace).

    Amounts are cents: kept (and written) as integers when whole, so `status` shows 3000, not
    3000.0; a file written with floats (3000.0) is read the same.

    Memory is the truth the next request checks against: a reservation counts the moment it is
    made, so a concurrent burst never spends past the budget. The file is written by one writer
    thread, never on the event loop (an fsync can take milliseconds, or seconds on a busy
    disk, and every agent would wait on it). Each write is a whole snapshot to a temp file,
    fsynced, renamed over the old one (a crash leaves the old file or the new one, never half
    of one). A reservation waits, off the loop, until a write that holds it is on disk before
    its request may be forwarded; changes that arrive meanwhile share the next write. A refund
    does not wait (losing one in a crash only over-counts). `close()` writes what is pending.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits on it for changes
        self._entries: dict[str, list[list[float]]] = {}
        self._version = 0  # counts changes in memory
        self._saved = 0  # the last version on disk
        self._waiters: list[tuple[int, Any, Any]] = []  # (version, loop, future) until it is on disk
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._error: OSError | None = None  # the last write's failure, None once one succeeds
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(raw, dict):
                self._entries = {
                    str(k): [
                        [float(e[0]), self.cents(float(e[1]))]
                        for e in v
                        if isinstance(e, list) and len(e) == 2
                    ]
                    for k, v in raw.items()
                    if isinstance(v, list)
                }
        except (OSError, ValueError, TypeError):
            self._entries = {}

    @staticmethod
    def cents(amount: float) -> float:
        """`amount` as an int when it is whole (3000.0 -> 3000): cents are shown as integers."""
        return int(amount) if isinstance(amount, float) and amount.is_integer() else amount

    def used(self, route: str, window_s: float, now: float) -> float:
        with self._lock:
            return self.cents(sum(a for t, a in self._entries.get(route, []) if t > now - window_s))

    async def reserve(
        self, route: str, amount: float, limit: float, window_s: float, now: float
    ) -> float | None:
        """Record `amount` if it fits under `limit` in the window. Returns the amount used before,
        once the reservation is on disk; None (nothing recorded) when it does not fit.

        Raises OSError when the file cannot be written; the reservation is then given back."""
        with self._lock:  # check and record with no await in between: the next request sees it
            entries = [e for e in self._entries.get(route, []) if e[0] > now - window_s]
            used = self.cents(sum(a for _, a in entries))
            if used + amount > limit:
                return None
            entries.append([now, self.cents(amount)])
            self._entries[route] = entries
            version = self._changed()
        try:
            await self._on_disk(version)
        except BaseException:  # not written, or the request was cancelled: it is not forwarded
            self.refund(route, now, amount)
            raise
        return used

    def refund(self, route: str, when: float, amount: float) -> None:
        with self._lock:
            entries = self._entries.get(route, [])
            for i, (t, a) in enumerate(entries):
                if t == when and a == amount:
                    del entries[i]
                    self._changed()
                    return

    def close(self) -> OSError | None:
        """Write what is pending and stop the writer thread (blocking: call it off the loop).
        Returns the error when the state could not be written. The ledger stays usable."""
        with self._lock:
            writer = self._writer
            self._stopping = True
            self._wake.notify_all()
        if writer is not None:
            writer.join()
        with self._lock:
            self._stopping = False
            return self._error if self._saved != self._version else None

    def _changed(self) -> int:
        """After a change in memory (lock held): wake the writer. Returns the change's version."""
        self._version += 1
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="budget-ledger", daemon=True)
            self._writer.start()
        self._wake.notify_all()
        return self._version

    async def _on_disk(self, version: int) -> None:
        """Wait until a write holding `version` has reached the disk."""
        import asyncio

        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._lock:
            if self._saved >= version:
                return
            self._waiters.append((version, loop, done))
        await done

    def _write_loop(self) -> None:
        tried = self._saved  # the last version written, or tried and failed
        while True:
            with self._lock:
                while self._version == tried and not self._stopping:
                    self._wake.wait()
                if self._version == tried:  # stopping, and nothing new to write
                    self._writer = None
                    return
                version = self._version
                snapshot = {route: list(entries) for route, entries in self._entries.items()}
            tried = version
            error: OSError | None = None
            try:
                self._write(snapshot)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any failure
                error = exc if isinstance(exc, OSError) else OSError(f"{type(exc).__name__}: {exc}")
            settled: list[tuple[int, Any, Any]] = []
            waiting: list[tuple[int, Any, Any]] = []
            with self._lock:
                self._error = error
                if error is None:
                    self._saved = version
                for w in self._waiters:  # a failure fails every waiter: nothing they hold is on disk
                    (settled if error is not None or w[0] <= version else waiting).append(w)
                self._waiters = waiting
            for _, loop, done in settled:
                try:
                    loop.call_soon_threadsafe(self._settle, done, error)
                except RuntimeError:  # its loop is closed: nobody waits any more
                    continue

    @staticmethod
    def _settle(done: Any, error: OSError | None) -> None:
        if done.done():  # the waiting request was cancelled
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(OSError(error.errno, f"the budget ledger cannot be written: {error}"))

    def _write(self, entries: dict[str, list[list[float]]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".budgets-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entries, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # a crash leaves the old file or the new one, never half
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        try:  # the rename itself on disk too
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass  # some file systems cannot fsync a directory; the file itself is on disk
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------- reading bodies


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            n = float(value)
        elif isinstance(value, str):
            n = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):  # "lots", or an integer too large for a float
        return None
    return n if math.isfinite(n) else None


def find_amounts(doc: Any, fields: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """(field, raw value) for amount fields at the top level or one object down.

    Names match without regard to case: some upstreams (Go's encoding/json) read them so.
    """
    wanted = {f.lower() for f in fields}
    if not isinstance(doc, dict):
        return
    for key, value in doc.items():
        if str(key).lower() in wanted:
            yield key, value
        elif isinstance(value, dict):
            for k2, v2 in value.items():
                if str(k2).lower() in wanted:
                    yield f"{key}.{k2}", v2


@dataclass
class Gate:
    """What a policy decided for one request: the body it read, the budget it reserved."""

    body: bytes | None = None
    response_filter: Callable[[bytes, str], bytes] | None = None
    reserved: tuple[float, float] | None = None  # (when, amount) against the budget


@dataclass
class RoutePolicy:
    route: str
    policy: Policy
    ledger: BudgetLedger
    _recent: deque[float] = field(default_factory=deque)

    # -- rate

    def _rate(self, now: float) -> None:
        rate = self.policy.rate
        if rate is None:
            return
        while self._recent and self._recent[0] <= now - rate.seconds:
            self._recent.popleft()
        if len(self._recent) >= rate.amount:
            wait = max(1, math.ceil(self._recent[0] + rate.seconds - now))
            raise BrokerError(
                "rate_limited",
                f"route {self.route!r} allows {rate.amount} requests per {rate.text}; try again in {wait}s",
                self.route,
                retry_after=wait,
            )
        self._recent.append(now)

    # -- REST rules

    def _paths(self, method: str, segments: tuple[str, ...], shown: str) -> None:
        p = self.policy
        for rule in p.deny:
            if rule_matches(rule, method, segments):
                raise _deny(self.route, f'deny "{rule.text}"', f"{method} {shown}")
        if p.allow is not None and not any(rule_matches(r, method, segments) for r in p.allow):
            raise _deny(self.route, "allow", f"{method} {shown} matches no allow rule")

    # -- body rules

    def _amounts(self, doc: Any, rule_prefix: str = "") -> float:
        p = self.policy
        total = 0.0
        for name, raw in find_amounts(doc, p.amount_fields):
            if raw is None:
                continue
            n = _number(raw)
            if n is None:
                raise _deny(self.route, "amount_fields", f"{rule_prefix}{name} is not a number")
            if n < 0:
                raise _deny(self.route, "amount_fields", f"{rule_prefix}{name} is negative")
            if p.max_amount_cents is not None and n > p.max_amount_cents:
                raise _deny(
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
                raise _deny(self.route, "body", "a JSON-RPC batch entry is not an object")
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
                raise _deny(self.route, "tools", "tools/call without a tool name")
            if not self._tool_allowed(name):
                raise _deny(self.route, "tools", f"tool {name!r} is not allowed")
            args = params.get("arguments")
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise _deny(self.route, "tools", f"tool {name!r} arguments are not an object")
            if self.policy.require_test_mode and (args.get("sandbox") is False or mode == "live"):
                raise _deny(self.route, "require_test_mode", f"tool {name!r} would act outside the sandbox")
            total += self._amounts(args, rule_prefix=f"{name}.")
        return total, list_ids

    def inspect(self, doc: Any, mode: str | None) -> tuple[float, set[Any]]:
        """Check a parsed body: (the amount it spends, ids of tools/list requests in it).

        Raises BrokerError(policy_denied) and nothing else, whatever the document.
        """
        if isinstance(doc, list) or (isinstance(doc, dict) and "jsonrpc" in doc):
            return self._jsonrpc(doc if isinstance(doc, list) else [doc], mode)
        return self._amounts(doc), set()

    # -- the gate

    async def admit(
        self,
        request: Request,
        forwarded_path: str,
        mode: str | None,
        max_body: int,
        keep_body: Callable[[bytes], None],
        has_mode: bool = True,
    ) -> Gate:
        """Let the request through (with what was read), or raise the refusal.

        `keep_body` receives the body as soon as it is read, so a refusal can still answer a
        JSON-RPC request with its own id.
        """
        now = time.time()
        self._rate(now)
        p = self.policy
        if p.allow is not None or p.deny:
            why = unmatchable(forwarded_path)
            if why is not None:
                raise _deny(self.route, "allow/deny", why)
        self._paths(request.method, path_segments(forwarded_path), forwarded_path)
        if p.require_test_mode and (mode == "live" or (has_mode and mode is None)):
            why = (
                "the route's credential is live (real money)"
                if mode == "live"
                else "cannot tell test from live"
            )
            raise _deny(self.route, "require_test_mode", why)
        if p.max_amount_cents is not None or p.budget is not None:
            wanted = {f.lower() for f in p.amount_fields}
            if any(k.lower() in wanted for k in request.query):
                raise _deny(self.route, "amount_fields", "an amount in the query string")
        gate = Gate()
        if not p.reads_body or not request.body_exists:
            return gate
        ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if not (
            ctype == "application/json" or (ctype.startswith("application/") and ctype.endswith("+json"))
        ):
            raise _deny(self.route, "body", "rules on this route read the body: send it as application/json")
        if encoding not in ("", "identity"):
            raise _deny(
                self.route, "body", "rules on this route read the body: send it without Content-Encoding"
            )
        body = await _read_bounded(request, max_body, self.route)
        gate.body = body
        keep_body(body)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise _deny(
                self.route, "body", "the body must be JSON for this route's rules and is not"
            ) from None
        total, list_ids = self.inspect(doc, mode)
        if list_ids and (p.tools_allow is not None or p.tools_deny):
            gate.response_filter = lambda raw, ctype: filter_tools_list(
                raw, ctype, list_ids, self._tool_allowed
            )
        if p.budget is not None and total > 0:
            used = await self.ledger.reserve(self.route, total, p.budget.amount, p.budget.seconds, now)
            if used is None:
                used_now = self.ledger.used(self.route, p.budget.seconds, now)
                raise _deny(
                    self.route,
                    "budget",
                    f"{BudgetLedger.cents(used_now)} of {p.budget.amount} used in the last {p.budget.text}; "
                    f"this request needs {BudgetLedger.cents(total)}",
                )
            gate.reserved = (now, total)
        return gate

    def settle(self, gate: Gate, upstream_status: int | None, maybe_sent: bool) -> None:
        """A request the upstream refused, or never saw, gives its reservation back.

        One that may have reached it without an answer (a timeout) keeps it: the card may exist.
        """
        refused = upstream_status is not None and upstream_status >= 400
        if gate.reserved is not None and (refused or not maybe_sent):
            self.ledger.refund(self.route, *gate.reserved)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        p = self.policy
        now = time.time()
        if p.budget is not None:
            used = self.ledger.used(self.route, p.budget.seconds, now)  # an int when whole
            out["budget"] = {
                "amount_cents": p.budget.amount,
                "per": p.budget.text,
                "used": used,
                "left": BudgetLedger.cents(max(0, p.budget.amount - used)),
            }
        if p.rate is not None:
            out["rate"] = {"requests": p.rate.amount, "per": p.rate.text}
        return out


async def _read_bounded(request: Request, limit: int, route: str) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise BrokerError("request_too_large", f"request body is over limits.max_body_bytes ({limit})", route)
    parts: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise BrokerError(
                "request_too_large", f"request body is over limits.max_body_bytes ({limit})", route
            )
        parts.append(chunk)
    return b"".join(parts)


# ---------------------------------------------------------------- tools/list filtering


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


class PolicySet:
    """Per-route policies; rate-limit state survives a reload while the route's policy is unchanged."""

    def __init__(self, ledger: BudgetLedger) -> None:
        self.ledger = ledger
        self.by_route: dict[str, RoutePolicy] = {}

    def update(self, routes: Any) -> None:
        fresh: dict[str, RoutePolicy] = {}
        for r in routes:
            if r.policy is None:
                continue
            old = self.by_route.get(r.name)
            fresh[r.name] = (
                old
                if old is not None and old.policy == r.policy
                else RoutePolicy(r.name, r.policy, self.ledger)
            )
        self.by_route = fresh
