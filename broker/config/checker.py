"""Typed reads of plain YAML values that turn every problem into an issue at its place.

Owns: `Checker` (is this a mapping with only these keys, a boolean, a whole number in range, a
list of strings...), how a place is named (`routes[1].auth`) and how a value's kind is said in
a message ("got a string"). Must never: know a config rule (checks.py does), stop at the first
problem, or put a value itself in a message (it could be a secret).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from broker.config.issues import ConfigIssue


class Checker:
    """Reads typed values out of plain YAML values; each problem becomes a `ConfigIssue` at its
    place, with the line of that place (or of its nearest parent, for a missing key)."""

    def __init__(self, lines: dict[str, int], issues: list[ConfigIssue]) -> None:
        self.lines = lines
        self.issues = issues

    def err(self, place: str, message: str) -> None:
        line = self.lines.get(place)
        if line is None:  # a missing key: point at its parent
            parent = place
            while parent and parent not in self.lines:
                shorter = re.sub(r"(\.[^.\[\]]*|\[\d+\])$", "", parent)
                parent = "" if shorter == parent else shorter  # a top-level key: the file itself
            line = self.lines.get(parent)
        self.issues.append(ConfigIssue(place, message, line))

    def mapping(self, value: Any, place: str, allowed: Iterable[str]) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(place, f"must be a mapping, got {kind_of(value)}")
            return None
        self.only_keys(value, place, allowed)
        return value

    def only_keys(self, m: dict[str, Any], place: str, allowed: Iterable[str]) -> None:
        allowed_set = set(allowed)
        listed = ", ".join(sorted(allowed_set))
        for key in m:
            if key not in allowed_set:
                self.err(child_place(place, key), f"unknown key (allowed here: {listed})")

    def boolean(self, m: dict[str, Any], key: str, place: str, default: bool) -> bool:
        v = m.get(key, default)
        if not isinstance(v, bool):
            self.err(child_place(place, key), f"must be true or false, got {kind_of(v)}")
            return default
        return v

    def string(self, m: dict[str, Any], key: str, place: str) -> str | None:
        v = m.get(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            self.err(child_place(place, key), f"must be a non-empty string, got {kind_of(v)}")
            return None
        return v

    def number(self, m: dict[str, Any], key: str, place: str, default: float, minimum: float) -> float:
        v = m.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.err(child_place(place, key), f"must be a number, got {kind_of(v)}")
            return default
        if v < minimum:
            self.err(child_place(place, key), f"must be at least {minimum}")
            return default
        return float(v)

    def integer(self, m: dict[str, Any], key: str, place: str, default: int, lo: int, hi: int) -> int:
        v = m.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(child_place(place, key), f"must be a whole number, got {kind_of(v)}")
            return default
        if not lo <= v <= hi:
            self.err(child_place(place, key), f"must be between {lo} and {hi}")
            return default
        return v

    def strings(self, m: dict[str, Any], key: str, place: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = m.get(key)
        if v is None:
            return default
        if not isinstance(v, list):
            self.err(child_place(place, key), f"must be a list, got {kind_of(v)}")
            return default
        out = []
        for i, item in enumerate(v):
            if not isinstance(item, str) or not item:
                self.err(
                    f"{child_place(place, key)}[{i}]", f"must be a non-empty string, got {kind_of(item)}"
                )
            else:
                out.append(item)
        return tuple(out)


def child_place(place: str, key: str) -> str:
    return f"{place}.{key}" if place else key


def kind_of(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__
