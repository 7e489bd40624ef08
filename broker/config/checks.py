"""Plain values read from config.yaml -> the `Config` model, checking every rule.

Owns: the rules of SPEC.md "Config file": which keys exist, loopback-only listeners, https
upstreams without credentials, route names and prefixes, auth blocks, and no literal secret
anywhere (only `keyring`, `env:NAME` or `file:PATH`); policy.py checks `policy:` blocks and
per_user.py the per-user keys for it. Every problem is collected with its place, none stops
the check. Must never: echo a value that could be a secret in an issue, read files, or touch
the secret store (a config only describes where secrets live).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.config.checker import Checker, child_place, kind_of
from broker.config.issues import ConfigIssue
from broker.config.model import (
    DEFAULT_ALLOWED_HOSTS,
    DEFAULT_REDIRECT_PORT,
    ApiKeyAuth,
    Auth,
    ClientCredentialsAuth,
    Config,
    Limits,
    Listen,
    LogConfig,
    OAuthAuth,
    Route,
    SecretRef,
    Timeouts,
)
from broker.config.per_user import PER_USER_KEYS, parse_platform, parse_user_fields, without_user_fields
from broker.config.policy import parse_policy
from broker.scrub import SECRET_SHAPE as SECRET_LITERAL

DEFAULT_PORT = 8765

SECRET_KEY_NAMES = frozenset({"key", "secret", "client_secret", "api_key", "token", "password", "master_key"})
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_PREFIX = "/_broker"


def _find_literal_secrets(value: Any, place: str, key: str | None, c: Checker) -> None:
    """Flag any string that looks like a secret, or that sits under a secret-named key."""
    if isinstance(value, dict):
        for k, v in value.items():
            _find_literal_secrets(v, child_place(place, k), k, c)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _find_literal_secrets(v, f"{place}[{i}]", key, c)
    elif isinstance(value, str):
        is_reference = value == "keyring" or value.startswith(("env:", "file:"))
        if SECRET_LITERAL.search(value) or (key in SECRET_KEY_NAMES and not is_reference):
            c.err(
                place,
                "a literal secret is not allowed in the config file; use `keyring` (then "
                "`agentcard-broker set-key ROUTE`), `env:NAME` or `file:PATH`",
            )


def parse_secret_ref(value: Any, place: str, c: Checker) -> SecretRef:
    """`keyring`, `env:NAME` or `file:PATH`; anything missing or wrong falls back to `keyring`."""
    default = SecretRef("keyring")
    if value is None:
        return default
    if not isinstance(value, str):
        c.err(place, f"must be `keyring`, `env:NAME` or `file:PATH`, got {kind_of(value)}")
        return default
    if value == "keyring":
        return SecretRef("keyring")
    if value.startswith("env:"):
        name = value[4:]
        if not ENV_NAME.match(name):
            c.err(place, "`env:` must be followed by an environment variable name")
            return default
        return SecretRef("env", name)
    if value.startswith("file:"):
        path = value[5:]
        if not path:
            c.err(place, "`file:` must be followed by a path")
            return default
        return SecretRef("file", str(Path(path).expanduser()))
    # a literal: already reported by _find_literal_secrets; never echo it
    return default


def parse_listen(value: Any, place: str, allow_remote: bool, c: Checker) -> Listen | None:
    if not isinstance(value, str) or not value:
        c.err(place, f"must be `HOST:PORT` or `unix:PATH`, got {kind_of(value)}")
        return None
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            c.err(place, "`unix:` must be followed by a socket path")
            return None
        return Listen("unix", path=str(Path(path).expanduser()))
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not m:
        c.err(place, f"must be `HOST:PORT`, `[IPv6]:PORT` or `unix:PATH` (got {value!r})")
        return None
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if port > 65535:
        c.err(place, "port must be between 0 and 65535")
        return None
    if not allow_remote and not _is_loopback(host):
        c.err(
            place,
            f"{host} is not a loopback address; the broker serves this machine only "
            "(set allow_remote: true to override, and read README 'Threat model' first)",
        )
        return None
    return Listen("tcp", host=host, port=port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_upstream(value: Any, place: str, insecure_ok: bool, c: Checker) -> str | None:
    if not isinstance(value, str) or not value:
        c.err(place, f"must be an https:// URL, got {kind_of(value)}")
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        c.err(place, "must be an absolute https:// URL")
        return None
    if parts.scheme == "http" and not insecure_ok:
        c.err(place, "must be https:// (set allow_insecure_upstream: true only for local test servers)")
        return None
    if parts.username or parts.password:
        c.err(place, "must not carry credentials; secrets live in the secret store")
        return None
    if parts.query or parts.fragment:
        c.err(place, "must not have a query string or fragment")
        return None
    return value


def parse_prefix(value: Any, place: str, c: Checker) -> str | None:
    if not isinstance(value, str) or not value.startswith("/"):
        c.err(place, "must be a path starting with /")
        return None
    if any(ch in value for ch in "?#%\\ ") or "//" in value:
        c.err(place, "must be a plain path (no ?, #, %, \\, spaces or empty segments)")
        return None
    segs = value.strip("/").split("/")
    if any(s in (".", "..") for s in segs):
        c.err(place, "must not contain . or .. segments")
        return None
    prefix = "/" + "/".join(s for s in segs if s)
    if prefix == RESERVED_PREFIX or prefix.startswith(RESERVED_PREFIX + "/"):
        c.err(place, f"{RESERVED_PREFIX} is reserved for the broker's own endpoints")
        return None
    return prefix


def parse_auth(value: Any, place: str, insecure_ok: bool, c: Checker) -> Auth | None:
    if not isinstance(value, dict):
        c.err(place, "must be a mapping with a `type` (api_key, oauth or client_credentials)")
        return None
    m: dict[str, Any] = value
    kind = m.get("type")
    if kind == "api_key":
        c.only_keys(without_user_fields(m, place, kind, c), place, {"type", "key", "allow_live"})
        return ApiKeyAuth(
            key=parse_secret_ref(m.get("key"), child_place(place, "key"), c),
            allow_live=c.boolean(m, "allow_live", place, False),
        )
    if kind == "oauth":
        allowed = {"type", "client_id", "client_secret", "scopes", "redirect_port"}
        c.only_keys(m, place, allowed | PER_USER_KEYS)
        secret = m.get("client_secret")
        auth = OAuthAuth(
            client_id=c.string(m, "client_id", place),
            client_secret=(
                parse_secret_ref(secret, child_place(place, "client_secret"), c)
                if secret is not None
                else None
            ),
            scopes=c.strings(m, "scopes", place, ()),
            redirect_port=c.integer(m, "redirect_port", place, DEFAULT_REDIRECT_PORT, 1, 65535),
        )
        return parse_user_fields(m, place, c, auth)
    if kind == "client_credentials":
        allowed = {"type", "token_url", "client_id", "client_secret", "scopes"}
        c.only_keys(without_user_fields(m, place, kind, c), place, allowed)
        token_url = parse_upstream(m.get("token_url"), child_place(place, "token_url"), insecure_ok, c)
        client_id = c.string(m, "client_id", place)
        if client_id is None:
            c.err(child_place(place, "client_id"), "is required for client_credentials")
        if token_url is None or client_id is None:
            return None
        return ClientCredentialsAuth(
            token_url=token_url,
            client_id=client_id,
            client_secret=parse_secret_ref(m.get("client_secret"), child_place(place, "client_secret"), c),
            scopes=c.strings(m, "scopes", place, ()),
        )
    c.err(child_place(place, "type"), "must be one of: api_key, oauth, client_credentials")
    return None


TOP_KEYS = {
    "listen", "allowed_hosts", "allowed_origins", "allowed_uids", "allow_remote",
    "allow_insecure_upstream", "secret_store", "state_dir", "socket_mode", "limits", "timeouts", "log",
    "routes", "public_url", "store", "clients",
}  # fmt: skip


def build_config(data: Any, lines: dict[str, int], path: str, issues: list[ConfigIssue]) -> Config | None:
    """Check plain values against every rule; return the snapshot, or None with `issues` filled."""
    c = Checker(lines, issues)
    top = c.mapping(data, "", TOP_KEYS)
    if top is None:
        return None
    _find_literal_secrets(top, "", None, c)

    allow_remote = c.boolean(top, "allow_remote", "", False)
    insecure = c.boolean(top, "allow_insecure_upstream", "", False)

    raw_listen = top.get("listen", [f"127.0.0.1:{DEFAULT_PORT}"])
    if isinstance(raw_listen, str):
        raw_listen = [raw_listen]
    listens: list[Listen] = []
    if not isinstance(raw_listen, list) or not raw_listen:
        c.err("listen", "must be a non-empty list of `HOST:PORT` or `unix:PATH`")
    else:
        for i, item in enumerate(raw_listen):
            lst = parse_listen(item, f"listen[{i}]", allow_remote, c)
            if lst is not None:
                if lst in listens:
                    c.err(f"listen[{i}]", "listed twice")
                listens.append(lst)

    hosts = tuple(h.lower() for h in c.strings(top, "allowed_hosts", "", DEFAULT_ALLOWED_HOSTS))
    origins = c.strings(top, "allowed_origins", "", ())
    for i, o in enumerate(origins):
        if o == "null" or not re.fullmatch(r"https?://[^/\s]+", o):
            c.err(f"allowed_origins[{i}]", "must be an origin like http://localhost:3000")

    uids: list[int] = []
    raw_uids = top.get("allowed_uids", ["self"])
    if not isinstance(raw_uids, list):
        c.err("allowed_uids", f"must be a list, got {kind_of(raw_uids)}")
    else:
        for i, u in enumerate(raw_uids):
            if u == "self":
                uids.append(os.getuid())
            elif isinstance(u, int) and not isinstance(u, bool) and u >= 0:
                uids.append(u)
            else:
                c.err(f"allowed_uids[{i}]", "must be `self` or a numeric uid")

    store = top.get("secret_store", "keyring")
    if store not in ("keyring", "file"):
        c.err("secret_store", "must be `keyring` or `file`")
        store = "keyring"

    sdir = c.string(top, "state_dir", "")
    if sdir is not None and not Path(sdir).expanduser().is_absolute():
        c.err("state_dir", "must be an absolute path")
        sdir = None
    raw_mode = top.get("socket_mode", "0600")
    socket_mode = {"0600": 0o600, "0660": 0o660, 384: 0o600, 432: 0o660}.get(raw_mode)
    if socket_mode is None:
        c.err("socket_mode", 'must be "0600" (this user only) or "0660" (this user and group)')
        socket_mode = 0o600

    lm = c.mapping(top.get("limits"), "limits", {"max_body_bytes", "max_header_bytes"}) or {}
    limits = Limits(
        max_body_bytes=c.integer(lm, "max_body_bytes", "limits", Limits().max_body_bytes, 1, 2**40),
        max_header_bytes=c.integer(lm, "max_header_bytes", "limits", Limits().max_header_bytes, 1024, 2**20),
    )
    tm = c.mapping(top.get("timeouts"), "timeouts", {"connect", "first_byte", "idle", "drain"}) or {}
    timeouts = Timeouts(
        connect=c.number(tm, "connect", "timeouts", Timeouts().connect, 0.001),
        first_byte=c.number(tm, "first_byte", "timeouts", Timeouts().first_byte, 0.001),
        idle=c.number(tm, "idle", "timeouts", Timeouts().idle, 0.001),
        drain=c.number(tm, "drain", "timeouts", Timeouts().drain, 0),
    )
    lg = c.mapping(top.get("log"), "log", {"level", "format", "audit"}) or {}
    level = str(lg.get("level", "info")).lower()
    if level not in ("debug", "info", "warning", "error"):
        c.err("log.level", "must be one of: debug, info, warning, error")
        level = "info"
    fmt = lg.get("format", "auto")
    if fmt not in ("auto", "console", "json"):
        c.err("log.format", "must be one of: auto, console, json")
        fmt = "auto"
    log = LogConfig(level=level, format=fmt, audit=c.boolean(lg, "audit", "log", True))

    routes: list[Route] = []
    raw_routes = top.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        c.err("routes", "must be a non-empty list of routes")
        raw_routes = []
    names: set[str] = set()
    prefixes: set[str] = set()
    for i, raw in enumerate(raw_routes):
        place = f"routes[{i}]"
        m = c.mapping(raw, place, {"name", "prefix", "upstream", "auth", "policy"})
        if m is None:
            continue
        name = m.get("name")
        if not isinstance(name, str) or not ROUTE_NAME.match(name):
            c.err(child_place(place, "name"), "must be a short name of letters, digits, -, _ or .")
            name = None
        elif name in names:
            c.err(child_place(place, "name"), f"duplicate route name {name!r}")
        prefix = parse_prefix(m.get("prefix"), child_place(place, "prefix"), c)
        if prefix is not None:
            if prefix in prefixes:
                c.err(child_place(place, "prefix"), f"duplicate prefix {prefix!r}")
            prefixes.add(prefix)
        upstream = parse_upstream(m.get("upstream"), child_place(place, "upstream"), insecure, c)
        if "auth" not in m:
            c.err(child_place(place, "auth"), "is required")
        auth = parse_auth(m.get("auth"), child_place(place, "auth"), insecure, c)
        policy = parse_policy(m["policy"], child_place(place, "policy"), c) if "policy" in m else None
        if name and prefix and upstream and auth:
            names.add(name)
            routes.append(Route(name, prefix, upstream, auth, place, policy))
    platform = parse_platform(top, routes, insecure, c)

    if issues:
        return None
    return Config(
        path=path,
        listen=tuple(listens),
        routes=tuple(routes),
        allowed_hosts=hosts,
        allowed_origins=origins,
        allowed_uids=tuple(dict.fromkeys(uids)),
        allow_remote=allow_remote,
        allow_insecure_upstream=insecure,
        secret_store=store,
        public_url=platform.public_url,
        store=platform.store,
        redis=platform.redis,
        clients=platform.clients,
        state_dir=str(Path(sdir).expanduser()) if sdir else "",
        socket_mode=socket_mode,
        limits=limits,
        timeouts=timeouts,
        log=log,
        lines=lines,
    )
