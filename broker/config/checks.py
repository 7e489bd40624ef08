"""Plain values read from config.yaml -> the `Config` model, checking every rule.

Owns: the rules of SPEC.md "Config file": which keys exist, loopback-only listeners, https
upstreams without credentials, route names and prefixes, auth blocks, policies, and no literal
secret anywhere (only `keyring`, `env:NAME` or `file:PATH`); per_user.py checks the per-user
keys for it. Every problem is collected with its place, none stops the check. Must never: echo
a value that could be a secret in an issue, read files, or touch the secret store (a config
only describes where secrets live).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from broker.config.checker import Checker, child_place, kind_of
from broker.config.issues import ConfigIssue
from broker.config.model import (
    CARD_DATA,
    DEFAULT_ALLOWED_HOSTS,
    DEFAULT_AMOUNT_FIELDS,
    DEFAULT_REDIRECT_PORT,
    ApiKeyAuth,
    ApprovePolicy,
    Auth,
    ClientCredentialsAuth,
    Config,
    Limits,
    Listen,
    LogConfig,
    OAuthAuth,
    PathRule,
    Policy,
    Route,
    SecretRef,
    Timeouts,
    Window,
)
from broker.config.per_user import PER_USER_KEYS, parse_platform, parse_user_fields, without_user_fields
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

    def rules(key: str) -> tuple[PathRule, ...]:
        raw = m.get(key, [])
        if not isinstance(raw, list):
            c.err(child_place(place, key), 'must be a list of "METHOD /glob" rules')
            return ()
        return tuple(r for i, v in enumerate(raw) if (r := parse_path_rule(v, f"{place}.{key}[{i}]", c)))

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
        allow=rules("allow") if "allow" in m else None,
        deny=rules("deny"),
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
    requests: list[PathRule] = []
    raw = m.get("requests", [])
    if not isinstance(raw, list):
        c.err(child_place(place, "requests"), 'must be a list of "METHOD /glob" rules')
    else:
        requests = [r for i, v in enumerate(raw) if (r := parse_path_rule(v, f"{place}.requests[{i}]", c))]
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
        requests=tuple(requests),
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
