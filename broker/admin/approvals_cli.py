"""`agentcard-broker approvals` / `approve ID` / `deny ID`: the owner decides held requests.

The commands ask the running daemon's `/_broker/approvals` endpoints with the admin key it
wrote to the state dir (`DaemonClient.admin`): only someone who can read that 0600 file decides.

Owns: what these commands print and their exit codes (0 done; 1 refused, not running, or the
key unreadable). Must never: print the admin key, or claim a decision the daemon did not make.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from broker.admin import report

if TYPE_CHECKING:
    from broker.admin.client import DaemonClient
    from broker.config import Config

WATCH_EVERY_S = 1.0
CLEAR = "\x1b[H\x1b[2J"


def main(args: argparse.Namespace, cfg: Config | None) -> int:
    """`approvals [--json] [--watch]`, `approve ID`, `deny ID`."""
    if cfg is None:
        return 1
    from broker.admin.client import DaemonClient

    client = DaemonClient(cfg)
    if args.command == "approvals":
        return _watch(client) if args.watch else _list(client, args.json)
    return _decide(client, args.id, approve=args.command == "approve")


def _ask(client: DaemonClient, method: str, path: str) -> tuple[int, dict[str, Any]] | None:
    """The daemon's answer, or None after saying why there is none."""
    from broker.admin.access import key_path, read_key

    state = client.config.state_path()
    if read_key(state) is None:
        if client.status() is None:
            _not_running(client)
        else:
            print(
                f"cannot read the daemon's admin key ({key_path(state)}): run this as the user the "
                "daemon runs as (the file must be yours and 0600)",
                file=sys.stderr,
            )
        return None
    status, doc = client.admin(method, path)
    if status == 0:
        _not_running(client)
        return None
    return status, doc


def _not_running(client: DaemonClient) -> None:
    print(
        f"agentcard-broker is not running (nothing answers on {client.address}); "
        "start it: agentcard-broker run",
        file=sys.stderr,
    )


def _refusal(status: int, doc: dict[str, Any]) -> str:
    err = doc.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        return str(err["message"])
    return f"the daemon answered HTTP {status}"


def _decide(client: DaemonClient, approval_id: str, approve: bool) -> int:
    verb = "approve" if approve else "deny"
    answer = _ask(client, "POST", f"/_broker/approvals/{approval_id.strip().upper()}/{verb}")
    if answer is None:
        return 1
    status, doc = answer
    if status != 200:
        print(_refusal(status, doc), file=sys.stderr)
        return 1
    what = _safe(_what(doc))
    if approve:
        print(f"approved {doc.get('id')}: {what}; the request goes on now")
    else:
        print(f"denied {doc.get('id')}: {what}; the agent is told approval_denied")
    return 0


def _fetch(client: DaemonClient) -> dict[str, Any] | None:
    answer = _ask(client, "GET", "/_broker/approvals")
    if answer is None:
        return None
    status, doc = answer
    if status != 200:
        print(_refusal(status, doc), file=sys.stderr)
        return None
    return doc


def _list(client: DaemonClient, as_json: bool) -> int:
    doc = _fetch(client)
    if doc is None:
        return 1
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        print(*lines(doc), sep="\n")
    return 0


def _watch(client: DaemonClient) -> int:
    clear = CLEAR if sys.stdout.isatty() else ""
    try:
        while True:
            doc = _fetch(client)
            if doc is None:
                return 1
            shown = "\n".join(lines(doc))
            print(f"{clear}{shown}\n(refreshed every second; Ctrl-C to stop)", flush=True)
            time.sleep(WATCH_EVERY_S)
    except KeyboardInterrupt:
        return 0


def _safe(text: str) -> str:
    """An agent's words (tool names, paths) without control characters: nothing it sends may
    drive the terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _amount(cents: Any) -> str:
    return f"${cents / 100:,.2f}" if isinstance(cents, int | float) else "-"


def _what(doc: dict[str, Any]) -> str:
    tools = doc.get("tools") or []
    what = ", ".join(map(str, tools)) if tools else f"{doc.get('method')} {doc.get('path')}"
    amount = doc.get("amount_cents")
    return f"{what} ({_amount(amount)})" if amount is not None else what


def lines(doc: dict[str, Any], now: float | None = None) -> list[str]:
    """The pending approvals as a table, with how to decide them."""
    now = time.time() if now is None else now
    pending = doc.get("pending") or []
    if not pending:
        return ["no requests wait for approval"]
    rows = [["ID", "ROUTE", "USER", "TOOL/PATH", "AMOUNT", "REASONS", "EXPIRES IN"]]
    for a in pending:
        tools = a.get("tools") or []
        what = ", ".join(map(str, tools)) if tools else f"{a.get('method')} {a.get('path')}"
        user = f"{a['client']}/{a['user']}" if a.get("user") is not None else "-"
        left = max(0, int(float(a.get("expires_at", now)) - now))
        passkey = " (passkey)" if a.get("require_passkey") else ""
        cells = [
            f"{a.get('id')}{passkey}",
            str(a.get("route")),
            user,
            what,
            _amount(a.get("amount_cents")),
            "; ".join(map(str, a.get("reasons") or [])),
            f"{left}s",
        ]
        rows.append([_safe(c) for c in cells])
    return [
        *report.table(rows),
        "",
        "agentcard-broker approve ID  |  agentcard-broker deny ID  |  per-user rows: the end user decides",
    ]
