"""`WWW-Authenticate` read as RFC 9110 §11.6.1 challenges, and RFC 6750 §3's step-up in them.

Owns: the challenge grammar (`#challenge`, `challenge = auth-scheme [ 1*SP ( token68 /
#auth-param ) ]`, `auth-param = token BWS "=" BWS ( token / quoted-string )`, several challenges
in one header or over several headers), and `insufficient_scope`: the scopes a Bearer challenge
with `error="insufficient_scope"` asks for. Must never: raise on what an upstream sends (a
malformed header yields the challenges read before the fault), loop or grow without bound on a
hostile header, or accept a scope token RFC 6749 §3.3 does not allow.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_HEADER_CHARS = 8192  # a longer header is read up to here
MAX_CHALLENGES = 16
MAX_PARAMS = 32
MAX_SCOPES = 64

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*[ \t]*(?:,|$)")
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")  # RFC 6749 §3.3 scope-token
_WS = " \t"


@dataclass
class Challenge:
    scheme: str  # lower case
    params: dict[str, str] = field(default_factory=dict)  # names lower case; the first of a name kept
    token68: str | None = None


def _skip(s: str, i: int, chars: str) -> int:
    while i < len(s) and s[i] in chars:
        i += 1
    return i


def _quoted(s: str, i: int) -> tuple[str, int] | None:
    """The quoted-string starting at s[i] == '"' (backslash escapes), and the index after it."""
    out: list[str] = []
    i += 1
    while i < len(s):
        c = s[i]
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            i += 1
            if i >= len(s):
                return None
            c = s[i]
        if c in "\r\n\x00":
            return None
        out.append(c)
        i += 1
    return None  # unterminated


def parse_challenges(value: str) -> list[Challenge]:
    """The challenges of one WWW-Authenticate value, up to the first fault."""
    s = value[:MAX_HEADER_CHARS]
    out: list[Challenge] = []
    current: Challenge | None = None
    i = 0
    while True:
        i = _skip(s, i, _WS + ",")
        if i >= len(s):
            return out
        m = _TOKEN.match(s, i)
        if m is None:
            return out  # a fault: what was read before it stands
        name, i = m.group(), m.end()
        j = _skip(s, i, _WS)
        if current is not None and j < len(s) and s[j] == "=":  # an auth-param of the challenge
            k = _skip(s, j + 1, _WS)
            if k < len(s) and s[k] == '"':
                q = _quoted(s, k)
                if q is None:
                    return out
                param, i = q
            else:
                v = _TOKEN.match(s, k)
                if v is None:
                    return out
                param, i = v.group(), v.end()
            if len(current.params) < MAX_PARAMS:
                current.params.setdefault(name.lower(), param)
            i = _skip(s, i, _WS)
            if i < len(s) and s[i] != ",":
                return out
            continue
        if len(out) >= MAX_CHALLENGES:
            return out
        current = Challenge(name.lower())
        out.append(current)
        if j > i and j < len(s):  # after the scheme and its space: a token68, perhaps
            t = _TOKEN68.match(s, j)
            if t is not None:
                current.token68 = t.group().rstrip(_WS + ",")
                i = t.end()
                current = None  # a token68 challenge has no auth-params
                continue
        i = j


def challenges(values: Iterable[str]) -> list[Challenge]:
    """The challenges of every WWW-Authenticate header of an answer, in order."""
    out: list[Challenge] = []
    for value in values:
        out.extend(parse_challenges(value)[: MAX_CHALLENGES - len(out)])
    return out


def insufficient_scope(values: Iterable[str]) -> frozenset[str] | None:
    """RFC 6750 §3.1: the scopes a Bearer challenge with error="insufficient_scope" asks for
    (empty when it names none); None when no such challenge is there."""
    for c in challenges(values):
        if c.scheme == "bearer" and c.params.get("error") == "insufficient_scope":
            scopes = c.params.get("scope", "").split(" ")
            return frozenset([t for t in scopes if _SCOPE_TOKEN.fullmatch(t)][:MAX_SCOPES])
    return None
