"""What a route's policy matches: paths by method and glob, amounts in a JSON body.

Owns: matching REST allow/deny rules on the normalized path, refusing paths that upstreams
would read differently, and finding amount fields. Pure functions of their arguments. Must
never: raise anything but BrokerError(policy_denied) (`deny`), whatever the input.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

from broker.config import PathRule
from broker.errors import BrokerError

_UNCHECKABLE = re.compile(r"%(2f|5c|25)", re.IGNORECASE)


def deny(route: str, rule: str, why: str) -> BrokerError:
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


# ---------------------------------------------------------------- amounts


def number(value: Any) -> float | None:
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
