"""What the command line prints about the config and a running daemon: tables and the status
report, as lines.

Owns: the layout of `check`'s and `status`'s text. Must never: print (the CLI does), or show a
value the daemon's status document does not already carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows in aligned columns, the first row the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def status_lines(doc: dict[str, Any]) -> list[str]:
    """`status` for people: the daemon, a table of its routes, then what each route has or needs."""
    out: list[str] = []
    out.append(f"agentcard-broker {doc['version']} pid {doc['pid']} listening on {', '.join(doc['listen'])}")
    out.append(f"config: {doc['config']['path']}")
    if doc["config"]["error"]:
        out.append(f"config error (previous config still in force):\n{doc['config']['error']}")
    store = doc.get("store")
    if isinstance(store, dict):
        if store.get("ok"):
            out.append(f"store: {store.get('place')}: ok, {store.get('latency_ms')} ms round trip")
        else:
            out.append(f"store: {store.get('place')}: UNAVAILABLE: {store.get('error')}")
    rows = [("ROUTE", "PREFIX", "AUTH", "STATE", "MODE", "EXPIRES", "REQUESTS")]
    for r in doc["routes"]:
        state, mode, expires = (r[k] or "-" for k in ("state", "mode", "expires_at"))
        rows.append((r["name"], r["prefix"], r["auth"], state, mode, expires, str(r["requests"])))
    out += table(rows)
    for r in doc["routes"]:
        if r["state"] != "ready" and r.get("reason"):
            out.append(f"{r['name']}: {r['reason']}")
        elif r.get("scopes") or r.get("subject"):
            who = f"account {r['subject']}, " if r.get("subject") else ""
            scopes = " ".join(r.get("scopes") or []) or "-"
            out.append(f"{r['name']}: {who}scopes {scopes}, refreshes {r.get('refreshes', 0)}")
    for r in doc["routes"]:
        budget = r.get("budget")
        if isinstance(r.get("users"), dict):
            counts = ", ".join(f"{n} {state}" for state, n in sorted(r["users"].items())) or "none yet"
            out.append(f"{r['name']}: end users: {counts}")
        if isinstance(budget, dict) and budget.get("each_user"):
            each = f"{cents(budget.get('amount_cents'))} cents per user per {budget.get('per')}"
            out.append(f"{r['name']}: budget {each}")
        elif isinstance(budget, dict) and budget.get("used") is None:
            every = f"{cents(budget.get('amount_cents'))} cents per {budget.get('per')}"
            out.append(f"{r['name']}: budget {every}")
        elif isinstance(budget, dict):
            out.append(
                f"{r['name']}: budget {cents(budget.get('used'))} of {cents(budget.get('amount_cents'))} "
                f"cents used per {budget.get('per')}, {cents(budget.get('left'))} left"
            )
    return out


def cents(value: Any) -> str:
    """Cents as a whole number when they are whole (a daemon may send 3000.0)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
