"""broker/admin/report.py: the status report and tables as the command line prints them."""

from __future__ import annotations

from broker.admin import report


def _doc(**route: object) -> dict[str, object]:
    base = {"name": "mcp", "prefix": "/mcp", "auth": "oauth", "state": "ready", "mode": None}
    base |= {"expires_at": None, "requests": 3} | route
    return {"version": "0.1.0", "pid": 7, "listen": ["127.0.0.1:8765"],
            "config": {"path": "c.yaml", "error": None}, "routes": [base]}  # fmt: skip


def test_table_aligns_columns() -> None:
    assert report.table([("A", "BB"), ("ccc", "d")]) == ["A    BB", "ccc  d"]


def test_a_per_user_route_shows_user_counts_and_the_budget_each_user_has() -> None:
    lines = report.status_lines(
        _doc(
            state="per_user",
            users={"active": 2, "dead": 1},
            budget={"amount_cents": 500.0, "per": "24h", "each_user": True},
        )
    )
    assert "mcp: end users: 2 active, 1 dead" in lines
    assert "mcp: budget 500 cents per user per 24h" in lines
    assert not any("used" in line for line in lines)


def test_a_shared_budget_shows_what_is_used_and_left() -> None:
    lines = report.status_lines(
        _doc(budget={"amount_cents": 3000, "per": "24h", "used": 1200.0, "left": 1800})
    )
    assert "mcp: budget 1200 of 3000 cents used per 24h, 1800 left" in lines
    assert not any("end users" in line for line in lines)
