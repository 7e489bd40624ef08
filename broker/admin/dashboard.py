"""The dashboard at `/_broker/ui/`: the owner's page in a browser, served by the daemon.

Routes and their auth state (with a login button for OAuth routes, the same login as the CLI's),
budgets used and left, the last requests live (server-sent events), and the requests held for
approval with the exact call (amount, tools, arguments), to approve or deny. Plain HTML, CSS and
JS shipped in `broker/admin/static/`: no build step, nothing fetched from elsewhere.

Endpoints (under `/_broker/ui`):

    POST /link                    the admin key: a one-time login link (dashboard_cli asks it)
    GET  /login?t=TOKEN           the link: a session cookie, then 303 to the page
    GET  /                        the page (its CSRF token in a meta tag)
    GET  /static/NAME             dashboard.js, dashboard.css
    GET  /api/state               status, budgets, approvals, recent requests, passkeys
    GET  /api/events              server-sent events: requests, approvals; heartbeats
    POST /api/approvals/ID/approve|deny
    POST /api/login/ROUTE         start an OAuth route's login; answers the URL to open
    POST /api/passkey/register/options|verify, /api/passkey/authenticate/options|verify
    POST /api/logout

Owns: these endpoints and what they answer. Must never: change anything without the session
and its CSRF token (dashboard_auth), approve a `require_passkey` approval without a passkey
assertion made in this session for that approval, answer with a secret the broker holds, or
send an `Access-Control-Allow-*` header.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
import time
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog

from broker.admin import passkeys
from broker.admin.access import HEADER as ADMIN_HEADER
from broker.admin.dashboard_auth import (
    HEADERS,
    REGISTER,
    Session,
    own_origin,
    require_change,
    require_session,
    session_cookie,
)
from broker.errors import BrokerError
from broker.http.server import Request, Response, StreamResponse

if TYPE_CHECKING:
    from broker.runtime import Runtime

log = structlog.get_logger("broker.dashboard")
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "favicon.svg": "image/svg+xml"}
MAX_JSON_BYTES = 64 * 1024
HEARTBEAT_S = 15.0
TICK_S = 0.5  # how often an event stream looks for a shutdown or a logout
LOGIN_URL_WAIT_S = 30.0  # discovery and registration, before the authorization URL exists
LOGIN_WAIT_S = 300.0  # then the browser's answer, as `agentcard-broker login` waits
_APPROVAL = re.compile(r"/api/approvals/([A-Za-z0-9_-]{1,64})/(approve|deny)")
_LOGIN = re.compile(r"/api/login/([A-Za-z0-9_.-]{1,64})")


@cache
def _static(name: str) -> bytes:
    return resources.files("broker.admin").joinpath("static", name).read_bytes()


def _json(doc: Any, status: int = 200, rt: Runtime | None = None) -> Response:
    text = json.dumps(doc)
    if rt is not None:  # reasons and arguments can quote an upstream or an agent: nothing held goes out
        text = rt.secrets.redact(text)
    return Response(status=status, body=text.encode(), content_type="application/json", headers=HEADERS)


def _page(status: int, title: str, text: str) -> Response:
    """A plain page (no session, a spent link): escaped text, the dashboard's stylesheet."""
    body = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)} · agentcard-broker</title>"
        "<link rel='stylesheet' href='/_broker/ui/static/dashboard.css'>"
        # its own icon: a browser asking for /favicon.ico would reach a route with prefix "/"
        "<link rel='icon' href='/_broker/ui/static/favicon.svg'></head>"
        f"<body class='plain'><main><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></main>"
        "</body></html>"
    )
    return Response(status=status, text=body, content_type="text/html", headers=HEADERS)


def _logged_out() -> Response:
    return _page(
        401,
        "Open the dashboard from your terminal",
        "Run `agentcard-broker dashboard` on this machine: it opens a one-time link that starts a session.",
    )


def _port(request: Request, rt: Runtime) -> int | None:
    return rt.connections.facts(request).port


def _tcp_port(rt: Runtime) -> int | None:
    """A TCP port the daemon listens on (for a link asked over a unix socket)."""
    for addr in rt.listen_addresses:
        if not addr.startswith("unix:"):
            return int(addr.rpartition(":")[2])
    return None


async def _body(request: Request) -> dict[str, Any]:
    """A small JSON object body; {} when none was sent."""
    if not request.body_exists:
        return {}
    if request.content_type != "application/json":
        raise BrokerError("bad_request", "send JSON (Content-Type: application/json)")
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > MAX_JSON_BYTES:
            raise BrokerError("request_too_large", "the dashboard takes small JSON bodies")
    try:
        doc = json.loads(data) if data else {}
    except ValueError:
        raise BrokerError("bad_request", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise BrokerError("bad_request", "the body is not a JSON object")
    return doc


def _only(request: Request, method: str, head: bool = True) -> None:
    """Refuse other methods. `head=False` where a HEAD must not act like the GET (a link
    previewer's HEAD must not spend a login link; an event stream has no head-only form)."""
    if request.method != method and not (head and method == "GET" and request.method == "HEAD"):
        raise BrokerError("method_not_allowed", f"use {method} here")


async def handle(request: Request, rt: Runtime, path: str) -> StreamResponse:
    sub = path.removeprefix("/_broker/ui")
    sessions = rt.dashboard
    if sub == "/link":
        _only(request, "POST")
        if rt.admin_key is None:
            raise BrokerError("admin_required", "the daemon has no admin key (its state dir is not writable)")
        rt.admin_key.require(request.headers.get(ADMIN_HEADER), "opening the dashboard")
        port = _port(request, rt) or _tcp_port(rt)
        if port is None:
            raise BrokerError("not_found", "the dashboard needs a TCP listener (listen: 127.0.0.1:PORT)")
        if "localhost" not in rt.snapshot.config.allowed_hosts:
            raise BrokerError(
                "not_found",
                "the dashboard is served at http://localhost:PORT: add localhost to allowed_hosts",
            )
        token = sessions.mint_link()
        log.info("dashboard.link")
        return _json({"url": f"{own_origin(port)}/_broker/ui/login?t={token}", "expires_in": 60})
    if sub == "/login":
        _only(request, "GET", head=False)
        if not sessions.take_link(request.query.get("t", "")):
            return _page(
                403,
                "This link no longer works",
                "It was used already, or it is older than a minute: run `agentcard-broker dashboard` again.",
            )
        sid, _ = sessions.start()
        log.info("dashboard.session_started")
        headers = {**HEADERS, "Location": "/_broker/ui/", "Set-Cookie": session_cookie(sid)}
        return Response(status=303, headers=headers)
    if sub.startswith("/static/"):
        _only(request, "GET")
        name = sub.removeprefix("/static/")
        if name not in STATIC:
            raise BrokerError("not_found", "no such file")
        return Response(body=_static(name), content_type=STATIC[name], charset="utf-8", headers=HEADERS)
    if sub == "":
        _only(request, "GET")
        session = sessions.find(request)
        if session is None:
            return _logged_out()
        page = _static("index.html").decode().replace("{{csrf}}", html.escape(session.csrf, quote=True))
        return Response(text=page, content_type="text/html", headers=HEADERS)
    if sub == "/api/state":
        _only(request, "GET")
        require_session(sessions, request)
        return _json(await state_document(rt), rt=rt)
    if sub == "/api/events":
        _only(request, "GET", head=False)
        return await _events(request, rt, require_session(sessions, request))
    # everything below changes something: the session, its CSRF token, the page's own origin
    _only(request, "POST")
    port = _port(request, rt)
    session = require_change(sessions, request, port)
    if sub == "/api/logout":
        sessions.end(request)
        return _json({"logged_out": True})
    if m := _APPROVAL.fullmatch(sub):
        return _decide(rt, session, m.group(1), m.group(2) == "approve")
    if m := _LOGIN.fullmatch(sub):
        return await _start_login(rt, m.group(1))
    if sub.startswith("/api/passkey/"):
        return await _passkey(request, rt, session, sub.removeprefix("/api/passkey/"), port)
    raise BrokerError("not_found", "unknown dashboard endpoint")


# ---------------------------------------------------------------- what the page shows


async def state_document(rt: Runtime) -> dict[str, Any]:
    """The status document (routes, auth states, budgets), the approvals, the last requests."""
    from broker.admin.api import _count_users, status_document

    await rt.credentials_read()
    doc = await status_document(rt)
    await _count_users(rt, doc)
    book = rt.approvals
    doc["approvals"] = {
        "pending": [a.document() for a in book.pending()],
        "recent": [a.document() for a in book.recent(20)],
    }
    doc["requests"] = rt.recent.last(50)
    sessions = rt.dashboard
    if sessions.passkey_count is None:
        sessions.passkey_count = await passkeys.count(rt.store)
    doc["passkeys"] = sessions.passkey_count
    doc["logins"] = dict(sessions.login_notes)
    doc["now"] = time.time()
    return doc


async def _events(request: Request, rt: Runtime, session: Session) -> StreamResponse:
    """Server-sent events until the page leaves, its session ends, or the daemon shuts down."""
    resp = StreamResponse(headers={**HEADERS, "Content-Type": "text/event-stream"})
    await resp.prepare(request)
    queues = [rt.recent.subscribe(), rt.approvals.subscribe()]
    waits = {asyncio.ensure_future(q.get()): q for q in queues}
    loop = asyncio.get_running_loop()
    beat = loop.time()
    try:
        await resp.write(b"retry: 3000\n\n: connected\n\n")
        while not request.gone and not request.closing and time.monotonic() <= session.until:
            done, _ = await asyncio.wait(waits, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED)
            out = []
            for task in done:
                queue = waits.pop(task)
                event = task.result()
                data = rt.secrets.redact(json.dumps(event))
                out.append(f"event: {event.get('type', 'message')}\ndata: {data}\n\n")
                waits[asyncio.ensure_future(queue.get())] = queue
            if not out and loop.time() - beat >= HEARTBEAT_S:
                out.append(": ping\n\n")
            if out:
                beat = loop.time()
                await resp.write("".join(out).encode())
    except ConnectionError:
        pass  # the page left
    finally:
        for task in waits:
            task.cancel()
        rt.recent.unsubscribe(queues[0])
        rt.approvals.unsubscribe(queues[1])
    return resp


# ---------------------------------------------------------------- changes


def _decide(rt: Runtime, session: Session, approval_id: str, approve: bool) -> Response:
    from broker.policy.approvals import PASSKEY_NEEDED, ApprovalError

    passkey = approve and session.take_proof(approval_id)
    by = "dashboard+passkey" if passkey else "dashboard"
    try:
        approval = rt.approvals.decide(approval_id, approve, by, passkey=passkey)
    except ApprovalError as exc:
        status = 403 if str(exc) == PASSKEY_NEEDED else 409
        return _json({"error": {"code": "not_decided", "message": str(exc)}}, status, rt)
    log.info("dashboard.decided", approval=approval_id, state=approval.state, by=by)
    return _json({"approval": approval.document()}, rt=rt)


async def _start_login(rt: Runtime, name: str) -> Response:
    """Start the route's OAuth login in the daemon, as `agentcard-broker login` does, and answer
    the authorization URL for the page to open; the login goes on until the browser comes back
    to the loopback callback (or LOGIN_WAIT_S)."""
    from broker.auth.oauth.login_flow import LoginError, login, login_summary, oauth_route
    from broker.auth.secret_store import SecretStoreError

    cfg = rt.snapshot.config
    try:
        route = oauth_route(cfg, name)
    except LoginError as exc:
        return _json({"error": {"code": "not_oauth", "message": str(exc)}}, 400, rt)
    if route.name in rt.snapshot.per_user:
        return _json(
            {"error": {"code": "per_user", "message": "each end user connects their own account"}}, 400, rt
        )
    sessions = rt.dashboard
    earlier = sessions.logins.get(route.name)
    if earlier is not None and not earlier.done():  # its listener holds the callback port
        earlier.cancel()
        await asyncio.wait([earlier], timeout=2.0)
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[str] = loop.create_future()

    def offer(url: str) -> None:
        if not ready.done():
            ready.set_result(url)

    async def run() -> None:
        sessions.login_notes[route.name] = {"ok": None, "message": "waiting for the browser"}
        try:
            result = await login(
                cfg,
                route,
                rt.store,
                open_browser=False,
                wait_s=LOGIN_WAIT_S,
                say=lambda _: None,
                on_url=offer,
            )
        except (LoginError, SecretStoreError) as exc:
            sessions.login_notes[route.name] = {"ok": False, "message": f"login failed: {exc}"}
            log.warning("dashboard.login_failed", route=route.name, error=str(exc))
            return
        finally:
            offer("")  # nothing to open: the note says why
        sessions.login_notes[route.name] = {"ok": True, "message": "; ".join(login_summary(route, result))}
        log.info("dashboard.logged_in", route=route.name)
        await rt.reread_credentials()

    sessions.logins[route.name] = loop.create_task(run())
    try:
        url = await asyncio.wait_for(asyncio.shield(ready), LOGIN_URL_WAIT_S)
    except TimeoutError:
        url = ""
    if not url.startswith(("https://", "http://")):  # discovery checked it; the page opens nothing else
        note = sessions.login_notes.get(route.name, {})
        message = str(note.get("message") or "the authorization server did not answer in time")
        return _json({"error": {"code": "login_failed", "message": message}}, 502, rt)
    return _json({"route": route.name, "url": url, "https": url.startswith("https://")}, rt=rt)


async def _passkey(request: Request, rt: Runtime, session: Session, step: str, port: int | None) -> Response:
    if port is None:
        raise BrokerError("not_found", "passkeys need the dashboard at http://localhost:PORT")
    body = await _body(request)
    sessions = rt.dashboard
    try:
        async with sessions.passkey_lock:
            if step == "register/options":
                return _json(await passkeys.registration_options(rt.store, session))
            if step == "register/verify":
                sessions.passkey_count = await passkeys.register(
                    rt.store, session, body.get("credential"), own_origin(port)
                )
                log.info("dashboard.passkey_registered", passkeys=sessions.passkey_count)
                return _json({"registered": True, "passkeys": sessions.passkey_count})
            if step == "authenticate/options":
                purpose = body.get("for")
                if not isinstance(purpose, str) or not (purpose == REGISTER or rt.approvals.get(purpose)):
                    raise BrokerError(
                        "bad_request", "say what the passkey is for: an approval's id, or register"
                    )
                return _json(await passkeys.authentication_options(rt.store, session, purpose))
            if step == "authenticate/verify":
                purpose = await passkeys.authenticate(
                    rt.store, session, body.get("credential"), own_origin(port)
                )
                return _json({"verified": True, "for": purpose})
    except passkeys.PasskeyError as exc:
        return _json({"error": {"code": "passkey", "message": str(exc)}}, 400, rt)
    raise BrokerError("not_found", "unknown passkey step")
