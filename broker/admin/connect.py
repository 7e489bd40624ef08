"""The two pages end users' browsers see on per-user routes: the connect page and the callback.

Owns: `/_broker/connect/<id>` (GET: which platform and which user, and a "Continue" form; POST
from that form: the link taken once and a 303 to AgentCard's authorize URL) and
`/_broker/callback` (the code exchanged, the user told to go back to the chat), the HTML of both,
escaped throughout, and their headers (no caching, no referrer, no script, no framing). Must
never: show or log a token, code, verifier or state; store anything for an unknown, expired,
used or forged id or state; trust a POST whose Origin is not `public_url`.
"""

from __future__ import annotations

import html
import re
import secrets as pysecrets
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from broker.auth.per_user import CONNECT_PATH, ConnectError, UserGrants, read_link, take_link
from broker.errors import BrokerError
from broker.http.server import Request, Response
from broker.store import ConnectRecord, StoreError

if TYPE_CHECKING:
    from broker.runtime import Runtime

CONNECT_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
MAX_FORM_BYTES = 4096
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    # no script at all; no form-action: the form's 303 goes on to AgentCard, which it would block
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
_AGAIN = "Ask for a new link in the chat and open it."


def _page(status: int, title: str, paragraphs: list[str], form: str = "") -> Response:
    """A page; `title` and `paragraphs` are plain text (escaped here), `form` is built HTML."""
    ok = status < 400
    color = "#1a7f37" if ok else "#b42318"
    text = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
    body = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{html.escape(title)} · agentcard-broker</title></head>"
        "<body style='font-family: system-ui, sans-serif; max-width: 36em; margin: 4em auto; padding: 0 1em'>"
        f"<h1 style='color: {color}'>{html.escape(title)}</h1>{text}{form}</body></html>"
    )
    return Response(status=status, text=body, content_type="text/html", charset="utf-8", headers=_HEADERS)


def _gone() -> Response:
    return _page(410, "This link no longer works", ["It was already used, or it expired.", _AGAIN])


def _unavailable(exc: Exception) -> Response:
    return _page(503, "The broker cannot continue", [str(exc), "Try again in a moment."])


async def _link(rt: Runtime, connect_id: str, *, use: bool) -> tuple[ConnectRecord, UserGrants] | Response:
    """The link's record and its route's grants (taken once when `use`), or the page saying why not."""
    store = rt.state_store
    if store is None:
        return _page(404, "Unknown link", [_AGAIN])
    try:
        record = await (take_link if use else read_link)(store, connect_id)
    except StoreError as exc:
        return _unavailable(exc)
    if record is None:
        return _gone()
    grants = rt.snapshot.user_grants.get(record.route)
    if grants is None:
        return _page(404, "Unknown link", [_AGAIN])
    return record, grants


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.partition('/')[0]}".lower()


async def read_form(request: Request) -> dict[str, list[str]] | None:
    """A small urlencoded form body (MAX_FORM_BYTES at most, read bounded), each field's values;
    None when the body is not one. The pages the broker serves to browsers post these."""
    if request.content_type != "application/x-www-form-urlencoded":
        return None
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > MAX_FORM_BYTES:
            return None
    return parse_qs(data.decode("ascii", "replace"))


async def _form_field(request: Request, name: str) -> str | None:
    """One field of a small urlencoded form body, sent once; None when the body is not one."""
    fields = await read_form(request)
    values = fields.get(name) if fields is not None else None
    return values[0] if values and len(values) == 1 else None


async def connect_page(request: Request, rt: Runtime, connect_id: str) -> Response:
    """`/_broker/connect/<id>`: GET shows who connects to what; the form's POST starts the sign-in."""
    if request.method not in ("GET", "POST"):
        return _page(405, "Not here", ["Open the link from the chat in your browser."])
    if not CONNECT_ID.fullmatch(connect_id) or not rt.snapshot.user_grants:
        return _page(404, "Unknown link", [_AGAIN])
    public = (rt.snapshot.config.public_url or "").rstrip("/")
    if request.method == "GET":
        found = await _link(rt, connect_id, use=False)
        if isinstance(found, Response):
            return found
        record = found[0]
        action = html.escape(f"{public}{CONNECT_PATH}{connect_id}", quote=True)
        form = (
            f"<form method='post' action='{action}'>"
            f"<input type='hidden' name='connect_id' value='{html.escape(connect_id, quote=True)}'>"
            "<button type='submit' style='font-size: 1.1em; padding: .5em 1.2em'>"
            "Continue to AgentCard</button></form>"
        )
        who = record.label or record.user
        return _page(
            200,
            "Connect your AgentCard account",
            [
                f"{record.client} asks to use AgentCard on your behalf, as {who}.",
                "Continue to sign in at AgentCard and allow it. Only this broker keeps the grant; "
                f"{record.client} never sees it.",
            ],
            form,
        )
    # POST: only the form of the page above, from the broker's own origin
    origin = request.headers.get("Origin")
    if not public or origin is None or origin.lower() != _origin(public):
        return _page(403, "Refused", ["This form is only accepted from the broker's own page.", _AGAIN])
    posted = await _form_field(request, "connect_id")
    if posted is None or not pysecrets.compare_digest(posted.encode(), connect_id.encode()):
        return _page(400, "Refused", ["The form did not come from this page.", _AGAIN])
    found = await _link(rt, connect_id, use=True)
    if isinstance(found, Response):
        return found
    record, grants = found
    try:
        url = await grants.begin_authorization(record)
    except ConnectError as exc:
        return _page(502, "AgentCard cannot be reached", [str(exc), _AGAIN])
    page = _page(303, "Continue at AgentCard", ["Your browser goes on to AgentCard."])
    page.headers["Location"] = url
    return page


async def callback(request: Request, rt: Runtime) -> Response:
    """`/_broker/callback`: AgentCard sends the browser back here with a code (or an error)."""
    if request.method != "GET":
        return _page(405, "Not here", ["This address is only for AgentCard's redirect."])
    try:
        q = request.query
    except BrokerError:
        return _page(400, "Sign-in failed", ["The answer could not be read.", _AGAIN])
    state, code, iss, error = q.get("state", ""), q.get("code", ""), q.get("iss"), q.get("error")
    grants = next((g for g in rt.snapshot.user_grants.values() if g.owns_state(state)), None)
    if grants is None:
        return _page(400, "Sign-in failed", ["This sign-in was not started here, or it ended.", _AGAIN])
    try:
        # an error answer still ends the state: it is never accepted afterwards
        client, _user = await grants.complete(state, "" if error is not None else code, iss)
    except ConnectError as exc:
        said = [f"AgentCard said: {error}."] if error is not None and _ERROR_CODE.fullmatch(error) else []
        return _page(400, "Sign-in failed", [*said, str(exc)])
    return _page(
        200,
        "Connected",
        [f"Your AgentCard account is connected for {client}.", "Return to the chat and try again."],
    )
