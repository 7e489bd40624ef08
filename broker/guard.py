"""Checks made before anything else: who is asking, from where, and in what form.

Owns: the Host allowlist (DNS rebinding), the Origin / Sec-Fetch-Site browser guard, the
refusal of absolute-form and CONNECT requests, and unix-socket peer uid checks. Must never:
read the body, touch a credential, or reach the upstream.
"""

from __future__ import annotations

import asyncio
from typing import NamedTuple

from broker.config import Config
from broker.errors import BrokerError
from broker.http.server import Request
from broker.service.peers import UNKNOWN, PeerLookup

_CROSS_SITE = frozenset({"cross-site", "same-site"})


class ConnectionFacts(NamedTuple):
    """What the guard needs of a connection, asked once as it opens (each costs a system call)."""

    port: int | None  # the local TCP port it arrived on; None for a unix socket
    uid: int | None  # the peer process's uid; None: this OS cannot tell; UNKNOWN: lookup failed


class Connections:
    """Looks each agent connection up once, as it opens: the engine keeps the answer with the
    connection and hands it to every request on it (`request.connection_facts`). One object for
    the daemon's life, across reloads."""

    def __init__(self) -> None:
        self.peers = PeerLookup()

    def opened(self, transport: asyncio.BaseTransport | None) -> ConnectionFacts:
        """The connection's facts, asked while the agent is still writing its first request."""
        port = None
        if transport is not None:
            sockname = transport.get_extra_info("sockname")
            port = int(sockname[1]) if isinstance(sockname, tuple) and len(sockname) >= 2 else None
        return ConnectionFacts(port, self.peers.peer_uid(transport))

    def facts(self, request: Request) -> ConnectionFacts:
        facts = request.connection_facts
        if isinstance(facts, ConnectionFacts):
            return facts
        return self.opened(request.transport)  # the lookup at connect failed: ask now


def check_peer(uid: int | None, cfg: Config) -> BrokerError | None:
    """Refuse a peer process owned by a uid not in `allowed_uids` (unix sockets; Linux TCP)."""
    if uid is None or uid in cfg.allowed_uids:
        return None
    if uid == UNKNOWN:
        return BrokerError("peer_not_allowed", "cannot tell which user owns the connecting process")
    return BrokerError("peer_not_allowed", f"processes of uid {uid} are not in allowed_uids")


def allowed_host_values(cfg: Config, port: int | None) -> frozenset[str]:
    """Exact Host header values accepted on a listener (`127.0.0.1:8765`, `[::1]:8765`, …), and
    `public_url`'s authority on every listener: the reverse proxy in front passes the browser's
    Host through, whatever port it reaches the broker on."""
    # public_url is checked to be an origin, scheme://authority (config/per_user.py)
    public = {cfg.public_url.partition("://")[2].partition("/")[0].lower()} if cfg.public_url else set()
    if port is None:  # a unix socket cannot be reached by a browser; any allowed name will do
        return frozenset(cfg.allowed_hosts) | public
    values = {f"{h}:{port}" for h in cfg.allowed_hosts} | public
    if port == 80:
        values.update(cfg.allowed_hosts)
    return frozenset(values)


def check(request: Request, cfg: Config, hosts: frozenset[str]) -> BrokerError | None:
    """The first gate. Returns the refusal, or None to let the request go on."""
    if request.raw_path.startswith(DASHBOARD) and is_dashboard(request.raw_path):
        return check_dashboard(request, hosts)
    host_values = request.headers.getall("Host", [])
    if len(host_values) != 1 or host_values[0].lower() not in hosts:
        return BrokerError(
            "host_not_allowed",
            "the Host header is not one the broker serves (a DNS-rebinding guard); "
            "use http://127.0.0.1:PORT or add the name to allowed_hosts",
        )
    origin = request.headers.get("Origin")
    if origin is not None and origin not in cfg.allowed_origins:
        return BrokerError(
            "origin_not_allowed",
            "requests from web pages are refused; add the page's origin to allowed_origins to allow it",
        )
    if request.headers.get("Sec-Fetch-Site", "").lower() in _CROSS_SITE:
        return BrokerError("origin_not_allowed", "cross-site browser requests are refused")
    if request.method == "CONNECT":
        return BrokerError("method_not_allowed", "CONNECT is refused: the broker is not a proxy")
    if not request.raw_path.startswith("/"):
        return BrokerError(
            "bad_request",
            "absolute-form request targets are refused; the destination comes from the "
            "broker's config, send a plain path",
        )
    return None


BROWSER_PAGES = ("/_broker/connect/", "/_broker/callback", "/_broker/approve/")


def is_browser_page(raw_path: str) -> bool:
    """The paths served to end users' browsers on per-user routes: connect, callback, approve (as
    sent, before routing normalizes them: another spelling gets the ordinary guard, which refuses
    browsers)."""
    return raw_path.startswith(BROWSER_PAGES[::2]) or raw_path.partition("?")[0] == BROWSER_PAGES[1]


def check_page(request: Request, cfg: Config, hosts: frozenset[str]) -> BrokerError | None:
    """The guard for the connect, callback and approve pages: browsers arrive there from the chat
    platform's pages (a cross-site, top-level navigation) and post the connect or approve form
    from `public_url` itself. Nothing else from a browser is let through."""
    host_values = request.headers.getall("Host", [])
    if len(host_values) != 1 or host_values[0].lower() not in hosts:
        return BrokerError("host_not_allowed", "the Host header is not one the broker serves")
    public = (cfg.public_url or "").rstrip("/")
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site", "").lower()
    if request.method in ("GET", "HEAD"):
        cross = site in _CROSS_SITE
        if cross and request.headers.get("Sec-Fetch-Mode", "").lower() != "navigate":
            return BrokerError("origin_not_allowed", "only a top-level navigation may open this page")
        return None
    if request.method == "POST":
        if not public or origin != public:
            return BrokerError("origin_not_allowed", "this form is only accepted from the broker's own page")
        return None
    return BrokerError("method_not_allowed", "use GET, or POST from the page itself")


DASHBOARD = "/_broker/ui"
DASHBOARD_HOSTS = ("localhost", "127.0.0.1")  # the names its link and its passkeys use
_OWN_SITE = frozenset({"", "same-origin", "none"})  # none: typed, a bookmark, opened by the CLI


def is_dashboard(raw_path: str) -> bool:
    """The dashboard's paths, as sent (another spelling gets the ordinary guard)."""
    return raw_path.startswith(DASHBOARD + "/") or raw_path.partition("?")[0] == DASHBOARD


def check_dashboard(request: Request, hosts: frozenset[str]) -> BrokerError | None:
    """The guard for the dashboard, served to the owner's browser at http://localhost:PORT: its
    own origin may call it (Origin equal to the page's own scheme and Host), and any page may
    open it with a top-level navigation (the session cookie is SameSite=Strict, so such a visit
    arrives logged out). Every other page is refused: another origin, a same-site one included
    (`localhost:3000` is the same site as `localhost:8765`), and embedding. The session, CSRF
    token and passkey are the dashboard's own checks, after this one."""
    host_values = request.headers.getall("Host", [])
    if len(host_values) != 1 or host_values[0].lower() not in hosts:
        return BrokerError("host_not_allowed", "the Host header is not one the broker serves")
    host = host_values[0].lower()
    origin = request.headers.get("Origin")
    if origin is not None and (
        origin.lower() != f"http://{host}" or host.rpartition(":")[0] not in DASHBOARD_HOSTS
    ):
        return BrokerError("origin_not_allowed", "the dashboard answers only its own page")
    if request.method not in ("GET", "HEAD", "POST"):
        return BrokerError("method_not_allowed", "the dashboard takes GET and POST")
    if request.headers.get("Sec-Fetch-Site", "").lower() not in _OWN_SITE:
        navigation = (
            request.method in ("GET", "HEAD")
            and request.headers.get("Sec-Fetch-Mode", "").lower() == "navigate"
            and request.headers.get("Sec-Fetch-Dest", "document").lower() == "document"
        )
        if not navigation:
            return BrokerError("origin_not_allowed", "other pages may only open the dashboard, not call it")
    return None
