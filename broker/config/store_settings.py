"""The `store:` key (SPEC "Per-user routes" and "Shared state and replicas"): `sqlite`, a
`redis://` / `rediss://` URL, or the mapping form with the Redis password, TLS and master key.

Owns: what `store:` may hold: the URL's shape (scheme, host, port, database number; never a user
name or password in it), the secret references for the password and the master key, the CA
file and the key prefix. Must never: echo a URL back in an issue (a pasted password could sit in
any part of it), read files, or reach the network.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit

from broker.config.checker import Checker, child_place, kind_of
from broker.config.model import DEFAULT_REDIS_PREFIX, RedisSettings, SecretRef

STORE_KEYS = frozenset({"url", "password", "username", "ca_file", "master_key", "prefix"})
PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}")
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")
_SHAPE = "`sqlite` (the embedded default), a redis:// or rediss:// URL, or a mapping with `url:`"


def parse_store(value: Any, c: Checker) -> tuple[Literal["sqlite", "redis"], RedisSettings | None]:
    """("sqlite", None) or ("redis", its settings). A wrong value is reported and reads as sqlite
    (the load fails all the same: nothing runs on a half-understood store)."""
    if value == "sqlite":
        return "sqlite", None
    if isinstance(value, str):
        url = _redis_url(value, "store", c)
        return ("redis", RedisSettings(url)) if url is not None else ("sqlite", None)
    if not isinstance(value, dict):
        c.err("store", f"must be {_SHAPE}, got {kind_of(value)}")
        return "sqlite", None
    return _mapping(value, c)


def _mapping(m: dict[str, Any], c: Checker) -> tuple[Literal["sqlite", "redis"], RedisSettings | None]:
    from broker.config.checks import parse_secret_ref  # checks imports this module

    c.only_keys(m, "store", STORE_KEYS)
    if "url" not in m:
        c.err("store.url", "is required: the Redis URL, e.g. rediss://redis.internal:6380/0")
        return "sqlite", None
    url = _redis_url(m["url"], "store.url", c)
    password = _ref(m, "password", c, parse_secret_ref)
    master_key = _ref(m, "master_key", c, parse_secret_ref)
    username = _matching(m, "username", USERNAME, "1-128 of letters, digits and _ . @ -", c)
    prefix = _matching(m, "prefix", PREFIX, "1-64 of letters, digits and _ . -", c)
    ca_file = m.get("ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file.strip()):
        c.err("store.ca_file", f"must be the path of a PEM CA bundle, got {kind_of(ca_file)}")
        ca_file = None
    if ca_file is not None and url is not None and not url.startswith("rediss://"):
        c.err("store.ca_file", "only applies to rediss:// (TLS); use a rediss:// URL or remove `ca_file`")
    if url is None:
        return "sqlite", None
    settings = RedisSettings(
        url,
        password=password,
        username=username,
        ca_file=ca_file,
        master_key=master_key,
        prefix=prefix or DEFAULT_REDIS_PREFIX,
    )
    return "redis", settings


def _ref(m: dict[str, Any], key: str, c: Checker, parse: Any) -> SecretRef | None:
    if key not in m:
        return None
    ref: SecretRef = parse(m[key], f"store.{key}", c)
    return ref


def _matching(m: dict[str, Any], key: str, shape: re.Pattern[str], words: str, c: Checker) -> str | None:
    value = m.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not shape.fullmatch(value):
        c.err(child_place("store", key), f"must be {words}")
        return None
    return value


def _redis_url(value: Any, place: str, c: Checker) -> str | None:
    """The URL as written when it is a plain redis:// or rediss:// address; else an issue that
    says what is wrong without quoting it."""
    if not isinstance(value, str) or not value:
        c.err(place, f"must be {_SHAPE}, got {kind_of(value)}")
        return None
    if any(ch.isspace() or not ch.isprintable() for ch in value):
        c.err(place, "must not contain spaces or control characters")
        return None
    lowered = value.lower()
    if not lowered.startswith(("redis://", "rediss://")):
        if place == "store" and "://" not in value:
            c.err(place, f"must be {_SHAPE}")
        else:
            c.err(place, "must be a redis:// or rediss:// (TLS) URL, like redis://redis.internal:6379/0")
        return None
    parts = urlsplit(value)
    if "@" in parts.netloc:
        c.err(
            place,
            "must not carry a user name or password (secrets never go in the config file): use "
            "the mapping form with `password: keyring` (then `agentcard-broker set-key store`), "
            "`env:NAME` or `file:PATH`, and `username:`",
        )
        return None
    if parts.query or parts.fragment or "?" in value or "#" in value:
        c.err(place, "must not have a query string or fragment; use the mapping form's keys")
        return None
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    if not parts.hostname or not _HOST.fullmatch(host):
        c.err(place, "must name a host, like redis://redis.internal:6379/0")
        return None
    if port is not None and not 0 < port <= 65535:
        c.err(place, "must have a port from 1 to 65535")
        return None
    db = parts.path.lstrip("/")
    if db and (not db.isdigit() or len(db) > 5):
        c.err(place, "the path must be a database number, like /0")
        return None
    return value
