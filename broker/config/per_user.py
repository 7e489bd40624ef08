"""The keys of SPEC.md "Per-user routes": `public_url`, `store`, `clients`, and the user fields of
an `oauth` auth block.

Owns: what each of those keys may hold (an https origin for `public_url`, `store` through
`store_settings`, platform client names, user header names the broker does
not itself reason about), and that a per-user route has the `public_url` and `clients` it needs.
Must never: read files, touch the store or the secret store, or echo a value in an issue beyond
what the rule needs to be understood (a URL's parts could carry a pasted secret).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from broker.config.checker import Checker, child_place, kind_of
from broker.config.model import OAuthAuth, PlatformClient, RedisSettings, Route
from broker.config.store_settings import parse_store

PER_USER_KEYS = frozenset({"per_user", "user_header", "user_label_header"})
CLIENT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
# RFC 9110 §5.1: a field name is a token
FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Fields the broker consumes, drops, frames or decides on: a user id carried in one of them
# would be read by two parties that disagree on what it means.
RESERVED_FIELDS = frozenset({
    "authorization", "cookie", "host", "content-length", "transfer-encoding", "connection",
    "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "close", "expect",
    "accept", "accept-encoding", "content-type", "content-encoding", "origin", "referer",
    "forwarded", "x-real-ip", "x-http-method-override", "x-http-method", "x-method-override",
    "set-cookie", "set-cookie2", "www-authenticate",
})  # fmt: skip
RESERVED_FIELD_PREFIXES = ("x-forwarded-", "proxy-", "sec-", "x-broker-", "mcp-")
_DEFAULT_PORTS = {"https": 443, "http": 80}
_AUTHORITY = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::(?P<port>[0-9]{1,5}))?"
)


class PlatformSettings(NamedTuple):
    public_url: str | None
    store: Literal["sqlite", "redis"]
    redis: RedisSettings | None
    clients: tuple[PlatformClient, ...]


def parse_user_fields(m: dict[str, Any], place: str, c: Checker, auth: OAuthAuth) -> OAuthAuth:
    """`auth` with the per-user fields of its block `m` (an `oauth` block) filled in."""
    per_user = c.boolean(m, "per_user", place, False)
    user_header = _field_name(m, "user_header", place, c) or OAuthAuth().user_header
    label_header = _field_name(m, "user_label_header", place, c)
    if not per_user:
        for key in ("user_header", "user_label_header"):
            if key in m:
                c.err(
                    child_place(place, key),
                    "only applies to a per-user route; add `per_user: true` to this auth block "
                    f"or remove `{key}`",
                )
    return dataclasses.replace(
        auth, per_user=per_user, user_header=user_header, user_label_header=label_header
    )


def without_user_fields(m: dict[str, Any], place: str, kind: str, c: Checker) -> dict[str, Any]:
    """Refuse the per-user keys on an auth block that is not `oauth`, with a message that says
    so (rather than a bare "unknown key"); return the rest, for the unknown-key check."""
    for key in sorted(PER_USER_KEYS & m.keys()):
        c.err(
            child_place(place, key),
            f"per-user routes need `type: oauth` (each end user authorizes AgentCard); "
            f"`{key}` is not allowed with `type: {kind}`",
        )
    return {k: v for k, v in m.items() if k not in PER_USER_KEYS}


def _field_name(m: dict[str, Any], key: str, place: str, c: Checker) -> str | None:
    value = c.string(m, key, place)
    if value is None:
        return None
    lower = value.lower()
    if not FIELD_NAME.fullmatch(value):
        c.err(child_place(place, key), "must be an HTTP header name (letters, digits and - _ . etc.)")
        return None
    if lower in RESERVED_FIELDS or lower.startswith(RESERVED_FIELD_PREFIXES):
        c.err(
            child_place(place, key),
            f"{value} is a header the broker itself reads, drops or sets; choose the platform's "
            "own user header (e.g. X-User-ID, X-OpenWebUI-User-Id)",
        )
        return None
    return value


def parse_platform(
    top: dict[str, Any], routes: list[Route], insecure_ok: bool, c: Checker
) -> PlatformSettings:
    """The top-level per-user keys, and what a per-user route needs of them."""
    public_url = parse_public_url(top.get("public_url"), insecure_ok, c) if "public_url" in top else None
    store, redis = parse_store(top.get("store", "sqlite"), c)
    clients = parse_clients(top.get("clients"), c)
    per_user = [r for r in routes if isinstance(r.auth, OAuthAuth) and r.auth.per_user]
    if per_user:
        place = child_place(per_user[0].place, "auth.per_user")
        if public_url is None and "public_url" not in top:
            c.err(
                place,
                "a per-user route needs `public_url`, where end users' browsers reach the broker "
                "for the connect page: add e.g. `public_url: https://broker.example.com` at the top level",
            )
        if not clients and not _has_issue_under(c, "clients"):
            c.err(
                place,
                "a per-user route needs at least one platform client: add e.g. "
                "`clients: [{name: librechat}]` at the top level, then run "
                "`agentcard-broker clients add librechat` for its token",
            )
    return PlatformSettings(public_url, store, redis, clients)


def _has_issue_under(c: Checker, place: str) -> bool:
    return any(i.place == place or i.place.startswith((place + ".", place + "[")) for i in c.issues)


def parse_public_url(value: Any, insecure_ok: bool, c: Checker) -> str | None:
    """An origin (scheme://host[:port]), kept without a trailing slash and with a default port
    dropped, so it is exactly the Host a browser sends."""
    place = "public_url"
    if not isinstance(value, str) or not value:
        c.err(place, f"must be an https:// URL like https://broker.example.com, got {kind_of(value)}")
        return None
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        c.err(place, "must not contain spaces or control characters")
        return None
    parts = urlsplit(value)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not value.lower().startswith(scheme + "://"):
        c.err(place, "must be an absolute https:// URL like https://broker.example.com")
        return None
    if scheme == "http" and not insecure_ok:
        c.err(
            place,
            "must be https:// (put TLS in front of the broker with a reverse proxy; "
            "allow_insecure_upstream: true allows http:// for local tests only)",
        )
        return None
    if "@" in parts.netloc:
        c.err(place, "must not carry a user name or password")
        return None
    if "?" in value or "#" in value:
        c.err(place, "must not have a query string or fragment")
        return None
    if parts.path not in ("", "/"):
        c.err(
            place,
            "must be the broker's origin with no path (the broker serves /_broker/connect and "
            "/_broker/callback at its root)",
        )
        return None
    authority = _AUTHORITY.fullmatch(parts.netloc)
    if authority is None or not 0 < int(authority["port"] or 443) <= 65535:
        c.err(place, "must name a host (a DNS name or an IP address) and, if any, a port from 1 to 65535")
        return None
    host = authority["host"].lower()
    port = authority["port"]
    if port is not None and int(port) != _DEFAULT_PORTS[scheme]:
        host = f"{host}:{int(port)}"
    return f"{scheme}://{host}"


def parse_clients(value: Any, c: Checker) -> tuple[PlatformClient, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        c.err("clients", f"must be a list of `{{name: NAME}}` entries, got {kind_of(value)}")
        return ()
    clients: list[PlatformClient] = []
    for i, raw in enumerate(value):
        place = f"clients[{i}]"
        if not isinstance(raw, dict):
            c.err(place, f"must be a mapping `{{name: NAME}}`, got {kind_of(raw)}")
            continue
        c.only_keys(raw, place, {"name"})
        name = raw.get("name")
        if name is None:
            c.err(child_place(place, "name"), "is required")
        elif not isinstance(name, str) or not CLIENT_NAME.fullmatch(name):
            c.err(
                child_place(place, "name"),
                "must be 1-64 of a-z, 0-9, _ or -, starting with a letter or digit",
            )
        elif PlatformClient(name) in clients:
            c.err(child_place(place, "name"), f"duplicate client name {name!r}")
        else:
            clients.append(PlatformClient(name))
    return tuple(clients)
