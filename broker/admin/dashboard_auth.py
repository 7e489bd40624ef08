"""Who may use the dashboard: one-time links, sessions, CSRF tokens, and the headers it sends.

A session starts only from a link `agentcard-broker dashboard` asks for with the admin key: a
random token, good once and for `LINK_TTL_S`. Taking it sets the cookie `acb_session`
(HttpOnly, SameSite=Strict, Path=/_broker/ui, no Max-Age: the browser drops it when it closes;
the daemon drops it after `SESSION_TTL_S`, or when it restarts: all of this lives in memory).
Every change (a POST) also needs the session's CSRF token in `X-CSRF-Token`, which only the
dashboard's own page can read (a meta tag), and an Origin, when one is sent, that is the
dashboard's own.

Owns: the links, the sessions and their passkey proofs (which approval a verified passkey
assertion is for, and until when), and the checks a request must pass. Must never: log or
answer with a link token, session id or CSRF token other than the one the session owns;
compare a secret in variable time; keep more than a bounded number of either.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass, field

from broker.errors import BrokerError
from broker.http.server import Request

COOKIE = "acb_session"
CSRF_HEADER = "X-CSRF-Token"
LINK_TTL_S = 60.0
SESSION_TTL_S = 12 * 3600.0
CHALLENGE_TTL_S = 120.0  # a WebAuthn ceremony's challenge
PROOF_TTL_S = 120.0  # a verified passkey assertion, for the one approval (or registration) it names
MAX_LINKS = 32
MAX_SESSIONS = 32
REGISTER = "register"  # a proof's purpose when it lets the session add another passkey

HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _digest(token: str) -> bytes:
    """Tokens are kept by their hash: a lookup's timing tells nothing of a live token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


@dataclass
class Challenge:
    """A WebAuthn ceremony the page started: its challenge, what it is for, until when."""

    kind: str  # "register" | "authenticate"
    value: bytes
    purpose: str  # authenticate: the approval id it is for, or REGISTER
    until: float


@dataclass
class Session:
    csrf: str
    until: float  # monotonic
    challenge: Challenge | None = None
    proof: tuple[str, float] | None = None  # (purpose, until): a verified passkey assertion
    created: float = field(default_factory=time.monotonic)

    def take_challenge(self, kind: str) -> Challenge | None:
        """The pending challenge of that kind, once (a second verify with it fails)."""
        ch, self.challenge = self.challenge, None
        if ch is None or ch.kind != kind or time.monotonic() > ch.until:
            return None
        return ch

    def take_proof(self, purpose: str) -> bool:
        """Was a passkey verified in this session for `purpose`, and recently? Once only."""
        proof, self.proof = self.proof, None
        if proof is None:
            return False
        return hmac.compare_digest(proof[0].encode(), purpose.encode()) and time.monotonic() <= proof[1]


class DashboardSessions:
    """The daemon's dashboard logins, in memory: a restart logs the dashboard out."""

    def __init__(self) -> None:
        self._links: dict[bytes, float] = {}
        self._sessions: dict[bytes, Session] = {}
        self.logins: dict[str, asyncio.Task[None]] = {}  # OAuth logins started here, by route
        self.login_notes: dict[str, dict[str, object]] = {}  # how each one went, for the page
        self.passkey_count: int | None = None  # registered passkeys, once read from the store
        self.passkey_lock = asyncio.Lock()  # one ceremony's check and store write at a time

    async def close(self) -> None:
        """At shutdown: a login still waiting for its browser stops (its listener closes)."""
        tasks = [t for t in self.logins.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def mint_link(self) -> str:
        """A one-time login token, good for LINK_TTL_S."""
        self._prune()
        while len(self._links) >= MAX_LINKS:
            self._links.pop(next(iter(self._links)))  # the oldest goes
        token = secrets.token_urlsafe(32)
        self._links[_digest(token)] = time.monotonic() + LINK_TTL_S
        return token

    def take_link(self, token: str) -> bool:
        """True once for a live token: it is spent by the first try, good or late."""
        until = self._links.pop(_digest(token), None)
        return until is not None and time.monotonic() <= until

    def start(self) -> tuple[str, Session]:
        """A new session: its id (the cookie's value) and the session itself."""
        self._prune()
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.pop(next(iter(self._sessions)))
        sid = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), until=time.monotonic() + SESSION_TTL_S)
        self._sessions[_digest(sid)] = session
        return sid, session

    def find(self, request: Request) -> Session | None:
        """The live session the request's cookie names, if any."""
        for value in cookie_values(request, COOKIE):
            session = self._sessions.get(_digest(value))
            if session is not None and time.monotonic() <= session.until:
                return session
        return None

    def end(self, request: Request) -> None:
        for value in cookie_values(request, COOKIE):
            self._sessions.pop(_digest(value), None)

    def _prune(self) -> None:
        now = time.monotonic()
        self._links = {k: v for k, v in self._links.items() if v >= now}
        self._sessions = {k: s for k, s in self._sessions.items() if s.until >= now}


def cookie_values(request: Request, name: str) -> list[str]:
    """Every value the request's Cookie headers give `name` (a browser may send several)."""
    out = []
    for header in request.headers.getall("Cookie", []):
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name and value:
                out.append(value)
    return out


def session_cookie(sid: str) -> str:
    return f"{COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/_broker/ui"


def own_origin(port: int) -> str:
    """The dashboard's origin: `localhost`, since browsers refuse passkeys on IP addresses."""
    return f"http://localhost:{port}"


def require_session(sessions: DashboardSessions, request: Request) -> Session:
    session = sessions.find(request)
    if session is None:
        raise BrokerError(
            "admin_required", "no dashboard session: run `agentcard-broker dashboard` to open one"
        )
    return session


def require_change(sessions: DashboardSessions, request: Request, port: int | None) -> Session:
    """A change from the dashboard's own page: its session cookie, its CSRF token, and (when the
    browser sends one) its own Origin. Anything else is 403, whoever asks."""
    origin = request.headers.get("Origin")
    if origin is not None and (port is None or origin.lower() != own_origin(port)):
        raise BrokerError("origin_not_allowed", "changes are only taken from the dashboard's own page")
    session = require_session(sessions, request)
    presented = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(presented.encode("utf-8", "replace"), session.csrf.encode()):
        raise BrokerError("admin_required", "this change did not come from the dashboard's page")
    return session
