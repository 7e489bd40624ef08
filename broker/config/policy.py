"""A route's `policy:` block (SPEC "Spend guard", "Approvals, the dashboard, and card data"):
path rules, tool rules, amounts, budget and rate windows, holds for approval, card data.

Owns: what each policy key may hold, durations (`30s`, `24h`) and "METHOD /glob" rules. Must
never: read a file or echo a value beyond what the rule needs to be understood.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from broker.config.checker import Checker, child_place
from broker.config.model import (
    CARD_DATA,
    DEFAULT_AMOUNT_FIELDS,
    ApprovePolicy,
    PathRule,
    Policy,
    Window,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "*"}


def parse_duration(value: Any, place: str, c: Checker) -> float | None:
    m = _DURATION.match(value.strip()) if isinstance(value, str) else None
    if m is None or float(m.group(1)) <= 0:
        c.err(place, "must be a duration like 30s, 1m, 24h or 7d")
        return None
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def parse_path_rule(value: Any, place: str, c: Checker) -> PathRule | None:
    if not isinstance(value, str) or " " not in value.strip():
        c.err(place, 'must be "METHOD /path/glob", e.g. "GET /api/v1/cards/*"')
        return None
    method, _, path = value.strip().partition(" ")
    method, path = method.upper(), path.strip()
    if method not in _METHODS or not path.startswith("/"):
        c.err(place, 'must be "METHOD /path/glob" with an HTTP method (or *) and a path starting with /')
        return None
    segs = tuple(s for s in path.split("/") if s)
    if any(s in (".", "..") for s in segs):
        c.err(place, "must not contain . or .. segments")
        return None
    return PathRule(method, segs, value.strip())


def _rules(m: dict[str, Any], key: str, place: str, c: Checker) -> tuple[PathRule, ...]:
    """A list of "METHOD /glob" rules under `key`: allow, deny, approve.requests."""
    raw = m.get(key, [])
    if not isinstance(raw, list):
        c.err(child_place(place, key), 'must be a list of "METHOD /glob" rules')
        return ()
    return tuple(r for i, v in enumerate(raw) if (r := parse_path_rule(v, f"{place}.{key}[{i}]", c)))


def _window(value: Any, place: str, key: str, c: Checker) -> Window | None:
    m = c.mapping(value, place, {key, "per"})
    if not m:
        c.err(place, f"must be a mapping {{{key}: N, per: DURATION}}")
        return None
    amount = c.integer(m, key, place, -1, 1, 2**53)
    per = parse_duration(m.get("per"), child_place(place, "per"), c)
    if amount < 1 or per is None:
        return None
    return Window(amount, per, str(m.get("per")))


def parse_policy(value: Any, place: str, c: Checker) -> Policy | None:
    keys = {
        "allow",
        "deny",
        "tools",
        "max_amount_cents",
        "amount_fields",
        "budget",
        "rate",
        "require_test_mode",
        "approve",
        "card_data",
    }
    m = c.mapping(value, place, keys)
    if m is None:
        return None

    tools_allow: frozenset[str] | None = None
    tools_deny: frozenset[str] = frozenset()
    if "tools" in m:
        t = c.mapping(m["tools"], child_place(place, "tools"), {"allow", "deny"}) or {}
        if "allow" in t:
            tools_allow = frozenset(c.strings(t, "allow", child_place(place, "tools"), ()))
        tools_deny = frozenset(c.strings(t, "deny", child_place(place, "tools"), ()))
    max_amount = None
    if "max_amount_cents" in m:
        max_amount = c.integer(m, "max_amount_cents", place, 0, 0, 2**53)
    return Policy(
        allow=_rules(m, "allow", place, c) if "allow" in m else None,
        deny=_rules(m, "deny", place, c),
        tools_allow=tools_allow,
        tools_deny=tools_deny,
        max_amount_cents=max_amount,
        amount_fields=c.strings(m, "amount_fields", place, DEFAULT_AMOUNT_FIELDS) or DEFAULT_AMOUNT_FIELDS,
        budget=_window(m["budget"], child_place(place, "budget"), "amount_cents", c)
        if "budget" in m
        else None,
        rate=_window(m["rate"], child_place(place, "rate"), "requests", c) if "rate" in m else None,
        require_test_mode=c.boolean(m, "require_test_mode", place, False),
        approve=_approve(m["approve"], child_place(place, "approve"), c) if "approve" in m else None,
        card_data=_card_data(m, place, c),
    )


def _approve(value: Any, place: str, c: Checker) -> ApprovePolicy | None:
    keys = {"above_cents", "tools", "requests", "wait", "require_passkey"}
    m = c.mapping(value, place, keys)
    if m is None:
        return None
    above = c.integer(m, "above_cents", place, 0, 0, 2**53) if "above_cents" in m else None
    requests = _rules(m, "requests", place, c)
    tools = frozenset(c.strings(m, "tools", place, ()))
    wait_text = str(m.get("wait", "120s"))
    wait = parse_duration(m.get("wait", "120s"), child_place(place, "wait"), c)
    if wait is not None and wait > 3600:
        c.err(child_place(place, "wait"), "must be at most 1h (a held request keeps its agent waiting)")
    if above is None and not tools and not requests:
        c.err(place, "holds nothing: give `above_cents`, `tools` or `requests`")
    return ApprovePolicy(
        above_cents=above,
        tools=tools,
        requests=requests,
        wait_s=wait or 120.0,
        wait_text=wait_text,
        require_passkey=c.boolean(m, "require_passkey", place, False),
    )


def _card_data(m: dict[str, Any], place: str, c: Checker) -> Literal["allow", "redact", "approve"]:
    value = m.get("card_data", "allow")
    if value == "redact":
        return "redact"
    if value == "approve":
        return "approve"
    if value != "allow":
        c.err(child_place(place, "card_data"), f"must be one of: {', '.join(CARD_DATA)}")
    return "allow"
