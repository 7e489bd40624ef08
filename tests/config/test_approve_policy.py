"""`policy.approve` and `policy.card_data` (SPEC "Approvals, the dashboard, and card data")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from broker.config import load
from broker.config.model import ApprovePolicy
from tests.config.documents import issues_at, load_error, write_text


def doc(policy: Any) -> str:
    return yaml.safe_dump(
        {
            "routes": [
                {
                    "name": "mcp",
                    "prefix": "/mcp",
                    "upstream": "https://mcp.agentcard.sh/mcp",
                    "auth": {"type": "oauth"},
                    "policy": policy,
                }
            ]
        },
        sort_keys=False,
    )


def test_approve_and_card_data(cfg_path: Path) -> None:
    policy = {
        "approve": {
            "above_cents": 2000,
            "tools": ["get_card_details", "fund_wallet"],
            "requests": ["POST /api/v1/cards/*/fund"],
            "wait": "2m",
            "require_passkey": True,
        },
        "card_data": "redact",
    }
    p = load(write_text(cfg_path, doc(policy))).routes[0].policy
    assert p is not None and p.card_data == "redact" and p.reads_body
    a = p.approve
    assert isinstance(a, ApprovePolicy)
    assert (a.above_cents, a.tools, a.wait_s, a.wait_text, a.require_passkey) == (
        2000,
        frozenset({"get_card_details", "fund_wallet"}),
        120.0,
        "2m",
        True,
    )
    assert [r.text for r in a.requests] == ["POST /api/v1/cards/*/fund"]


def test_defaults(cfg_path: Path) -> None:
    p = load(write_text(cfg_path, doc({"approve": {"tools": ["get_card_details"]}}))).routes[0].policy
    assert p is not None and p.approve is not None
    assert (p.approve.wait_s, p.approve.require_passkey, p.card_data) == (120.0, False, "allow")
    rest_only = load(write_text(cfg_path, doc({"approve": {"requests": ["POST /x"]}}))).routes[0].policy
    assert rest_only is not None and not rest_only.reads_body  # a REST glob needs no body


@pytest.mark.parametrize(
    ("policy", "place", "words"),
    [
        ({"approve": {}}, "routes[0].policy.approve", "holds nothing"),
        ({"approve": {"tools": "get_card_details"}}, "routes[0].policy.approve.tools", ""),
        ({"approve": {"above_cents": -1}}, "routes[0].policy.approve.above_cents", ""),
        ({"approve": {"requests": "POST /x"}}, "routes[0].policy.approve.requests", "list"),
        ({"approve": {"requests": ["fund it"]}}, "routes[0].policy.approve.requests[0]", "METHOD"),
        ({"approve": {"tools": ["x"], "wait": "forever"}}, "routes[0].policy.approve.wait", "duration"),
        ({"approve": {"tools": ["x"], "wait": "2h"}}, "routes[0].policy.approve.wait", "at most 1h"),
        ({"approve": {"tools": ["x"], "later": 1}}, "routes[0].policy.approve.later", ""),
        ({"card_data": "mask"}, "routes[0].policy.card_data", "allow, redact, approve"),
    ],
)
def test_refused(cfg_path: Path, policy: Any, place: str, words: str) -> None:
    err = load_error(write_text(cfg_path, doc(policy)))
    found = issues_at(err, place)
    assert found, err.lines()
    assert words in found[0].message
