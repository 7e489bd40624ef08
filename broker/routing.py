"""Which route a request belongs to, and the exact upstream URL it is forwarded to.

Owns: path normalization (RFC 3986 unreserved decoding), dot-segment refusal, the broker's own
paths (`/_broker/`, and OAuth discovery refused), longest-prefix matching on whole segments,
and building the forwarded URL with the query untouched. Must never: let a request choose its
destination; only the config does.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from yarl import URL

from broker.config import Route
from broker.errors import BrokerError

MAX_DECODES = 8
TARGET_CACHE = 1024
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_EMPTY_SEGMENTS = re.compile(r"/{2,}")
OAUTH_DISCOVERY = re.compile(
    r"/\.well-known/(oauth-protected-resource|oauth-authorization-server|openid-configuration)", re.IGNORECASE
)
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _normalize_pct(m: re.Match[str]) -> str:
    byte = int(m.group(1), 16)
    return chr(byte) if byte in _UNRESERVED else "%" + m.group(1).upper()


@functools.lru_cache(maxsize=4096)  # agents ask for the same few paths over and over
def normalize_path(raw: str) -> str:
    """The one canonical path that routing, policies and the upstream all see: RFC 3986 §6.2.2
    (percent-encoded unreserved characters decoded, the rest in upper case) and empty segments
    collapsed.

    Raises BrokerError(bad_request) for any path that contains a dot-segment, in any encoding
    an upstream might decode (`..`, `%2e%2e`, `..%2f`, `%252e%252e`, backslashes).
    """
    path = _PCT.sub(_normalize_pct, raw) if "%" in raw else raw
    if "//" in path:
        path = _EMPTY_SEGMENTS.sub("/", path)  # `/api//cards` is `/api/cards` to most upstreams
    probe = path
    for _ in range(MAX_DECODES):  # however many times an upstream might decode it
        decoded = unquote(probe)
        for seg in re.split(r"[/\\]", decoded):
            if seg in (".", ".."):
                raise BrokerError("bad_request", "dot-segments (. and ..) are not allowed in the path")
        if decoded == probe:
            break
        probe = decoded
    else:
        raise BrokerError("bad_request", "the path is percent-encoded too many times over")
    if "\x00" in probe:
        raise BrokerError("bad_request", "NUL is not allowed in the path")
    return path


@dataclass(frozen=True, slots=True)
class Target:
    route: Route
    url: URL  # the upstream URL, already encoded as it will be sent
    rest: str  # the path after the route's prefix (normalized)


_MISS: Any = object()


class RouteTable:
    """Routes ordered for longest-prefix matching on whole path segments."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._bases = {r.name: URL(r.upstream) for r in routes}
        self._targets: dict[str, Target | None] = {}  # by raw path and query: the same few, mostly

    def match(self, path: str) -> Route | None:
        for r in self._routes:
            p = r.prefix
            if p == "/" or path == p or path.startswith(p + "/"):
                return r
        return None

    def target(self, raw_path_and_query: str) -> Target | None:
        """Where a request goes; None for the broker's own endpoints (`/_broker/...`). Raises
        BrokerError for a path no route takes, a bad path, or OAuth discovery."""
        found: Target | None = self._targets.get(raw_path_and_query, _MISS)
        if found is _MISS:
            found = self._target(raw_path_and_query)
            if len(self._targets) >= TARGET_CACHE:
                self._targets.clear()
            self._targets[raw_path_and_query] = found
        return found

    def _target(self, raw_path_and_query: str) -> Target | None:
        raw_path, sep, query = raw_path_and_query.partition("?")
        path = normalize_path(raw_path)  # `%2Ewell-known`, `%5Fbroker` are the same paths
        if OAUTH_DISCOVERY.search(path):
            # the broker does OAuth for its agents; an agent that found metadata here would
            # start its own login against AgentCard
            raise BrokerError("not_found", "agents need no OAuth here: the broker holds the credential")
        if path == "/_broker" or path.startswith("/_broker/"):
            return None
        route = self.match(path)
        if route is None:
            raise BrokerError("no_route", "no route matches this path; see the routes in config.yaml")
        rest = path if route.prefix == "/" else path[len(route.prefix) :]
        base = self._bases[route.name]
        base_path = base.raw_path
        joined = base_path.rstrip("/") + rest if rest else base_path or "/"
        url = URL.build(
            scheme=base.scheme,
            authority=base.raw_authority,
            path=joined,
            query_string=query if sep else "",
            encoded=True,
        )
        return Target(route, url, rest)

    def broker_path_for(self, route: Route, upstream_url: URL) -> str | None:
        """The broker path that forwards to `upstream_url`, or None when it is outside the route."""
        base = self._bases[route.name]
        if (upstream_url.scheme, upstream_url.raw_authority) != (base.scheme, base.raw_authority):
            return None
        bpath = base.raw_path.rstrip("/")
        upath = upstream_url.raw_path
        if bpath and not (upath == bpath or upath.startswith(bpath + "/")):
            return None
        rest = upath[len(bpath) :]
        prefix = "" if route.prefix == "/" else route.prefix
        out = (prefix + rest) or "/"
        if upstream_url.raw_query_string:
            out += "?" + upstream_url.raw_query_string
        return out
