"""Where people decide held requests: the owner's `/_broker/approvals` endpoints and an end
user's page `/_broker/approve/<id>` (per-user routes).

`GET /_broker/approvals` lists pending and recent approvals; `POST
/_broker/approvals/<id>/approve` (or `/deny`) decides one. Both need the admin key the daemon
wrote to its state dir (what `agentcard-broker approvals`, `approve ID`, `deny ID` send): an
agent on the same listener gets 403 `admin_required` and decides nothing.

The approve page is the end user's, reached through the link an `approval_required` answer
carries: GET shows the exact call (route, tools or path, amount, arguments) with Approve and
Deny; the form's POST, from `public_url` only, takes the approval once and keeps the decision
for the call's retry (`policy/hold.py`).

Owns: these endpoints and the page (escaped throughout, no script, no caching, no framing).
Must never: decide without the admin key or, for the page, without the one pending record;
show a page's arguments unescaped; accept the page's form from another origin.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
import secrets as pysecrets
import time
from typing import TYPE_CHECKING, Any

from broker.admin.access import HEADER
from broker.admin.connect import _origin, _page, read_form
from broker.errors import BrokerError
from broker.http.server import Request, Response
from broker.policy.approvals import END_USER, ApprovalError
from broker.policy.hold import APPROVE_PATH, read_pending, record_decision
from broker.policy.notify import dollars
from broker.store import StoreError

if TYPE_CHECKING:
    from broker.runtime import Runtime

LIST_PATH = "/_broker/approvals"
_DECIDE = re.compile(r"/_broker/approvals/([A-Za-z2-7]{8,32})/(approve|deny)")
LINK_ID = re.compile(r"[A-Z2-7]{26}")  # an end user's link: 130 random bits
_AGAIN = "Ask again in the chat to get a new link."


async def handle(request: Request, rt: Runtime, path: str) -> Response:
    """`/_broker/approvals…` (the owner, with the admin key) and `/_broker/approve/<id>` (an end user)."""
    if path.startswith(APPROVE_PATH):
        return await page(request, rt, path.removeprefix(APPROVE_PATH))
    key = rt.admin_key
    if key is None:
        raise BrokerError(
            "admin_required", "the daemon could not write its admin key to the state dir: see its log"
        )
    key.require(request.headers.get(HEADER), "deciding approvals")
    book = rt.approvals
    if path == LIST_PATH:
        if request.method not in ("GET", "HEAD"):
            raise BrokerError("method_not_allowed", "use GET here")
        pending, recent = book.pending(), book.recent()
        return _json({"pending": [a.document() for a in pending], "recent": [a.document() for a in recent]})
    m = _DECIDE.fullmatch(path)
    if m is None:
        raise BrokerError("not_found", "use /_broker/approvals or /_broker/approvals/ID/approve (or /deny)")
    if request.method != "POST":
        raise BrokerError("method_not_allowed", "use POST here")
    try:
        approval = book.decide(m[1].upper(), m[2] == "approve", "cli")
    except ApprovalError as exc:
        raise BrokerError("approval_conflict", str(exc)) from None
    return _json(approval.document())


def _json(doc: Any) -> Response:
    return Response(
        body=json.dumps(doc, indent=2).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


# ---------------------------------------------------------------- the end user's page


async def _form(request: Request) -> dict[str, str] | None:
    """A small urlencoded form, each field once; None when the body is not one."""
    fields = await read_form(request)
    if fields is None or any(len(v) != 1 for v in fields.values()):
        return None
    return {k: v[0] for k, v in fields.items()}


def _call_lines(doc: dict[str, Any]) -> list[str]:
    """The call in plain words (escaped by the page)."""
    tools = [str(t) for t in doc.get("tools") or []]
    what = f"tool {', '.join(tools)}" if tools else f"{doc.get('method')} {doc.get('path')}"
    lines = [f"Call: {what} (route {doc.get('route')})"]
    amount = doc.get("amount_cents")
    if isinstance(amount, int | float):
        lines.append(f"Amount: {dollars(amount)} ({amount:g} cents)")
    reasons = [str(r) for r in doc.get("reasons") or []]
    if reasons:
        lines.append(f"Held because: {'; '.join(reasons)}")
    left = max(0, int(float(doc.get("expires_at", 0)) - time.time()))
    lines.append(f"This link works for {left} more seconds, once.")
    return lines


async def page(request: Request, rt: Runtime, approval_id: str) -> Response:
    """GET: the call and the two buttons; the form's POST: the decision, once."""
    if request.method not in ("GET", "POST"):
        return _page(405, "Not here", ["Open the link from the chat in your browser."])
    store = rt.state_store
    if not LINK_ID.fullmatch(approval_id) or store is None or not rt.snapshot.per_user:
        return _page(404, "Unknown link", [_AGAIN])
    public = (rt.snapshot.config.public_url or "").rstrip("/")
    if request.method == "GET":
        try:
            doc = await read_pending(store, approval_id)
        except StoreError as exc:
            return _page(503, "The broker cannot continue", [str(exc), "Try again in a moment."])
        if doc is None:
            return _gone()
        action = html.escape(f"{public}{APPROVE_PATH}{approval_id}", quote=True)
        arguments = str(doc.get("arguments") or "")
        shown = (
            "<p>With these arguments:</p><pre style='white-space: pre-wrap; background: #f4f4f4; "
            f"padding: .8em; overflow-wrap: anywhere'>{html.escape(arguments)}</pre>"
            if arguments
            else ""
        )
        button = "font-size: 1.1em; padding: .5em 1.2em; margin-right: 1em"
        form = (
            f"{shown}<form method='post' action='{action}'>"
            f"<input type='hidden' name='approval_id' value='{html.escape(approval_id, quote=True)}'>"
            f"<button type='submit' name='decision' value='approve' style='{button}'>Approve</button>"
            f"<button type='submit' name='decision' value='deny' style='{button}'>Deny</button></form>"
        )
        who = f"{doc.get('client')} asks to make this request with your AgentCard account"
        return _page(200, "Approve this request?", [f"{who}, as {doc.get('user')}.", *_call_lines(doc)], form)
    # POST: only the form of the page above, from the broker's own origin
    origin = request.headers.get("Origin")
    if not public or origin is None or origin.lower() != _origin(public):
        return _page(403, "Refused", ["This form is only accepted from the broker's own page.", _AGAIN])
    form_fields = await _form(request)
    posted = (form_fields or {}).get("approval_id", "")
    decision = (form_fields or {}).get("decision")
    if decision not in ("approve", "deny") or not pysecrets.compare_digest(
        posted.encode(), approval_id.encode()
    ):
        return _page(400, "Refused", ["The form did not come from this page.", _AGAIN])
    approve = decision == "approve"
    try:
        doc = await record_decision(store, approval_id, approve)
    except StoreError as exc:
        return _page(503, "The broker cannot continue", [str(exc), "Try again in a moment."])
    if doc is None:
        return _gone()
    with contextlib.suppress(ApprovalError):  # held here, or by another replica
        rt.approvals.decide(approval_id, approve, END_USER)
    if approve:
        return _page(
            200, "Approved", ["Return to the chat and ask again: that same request now goes through, once."]
        )
    return _page(200, "Denied", ["Return to the chat: the request is refused."])


def _gone() -> Response:
    return _page(410, "This link no longer works", ["It was already used, or it expired.", _AGAIN])
