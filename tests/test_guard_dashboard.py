"""broker/guard.py, the dashboard's part: its own page and top-level navigations are let through
to the dashboard's own checks; other origins, rebound hosts and cross-site calls are refused
before it, and the rest of the guard is unchanged by it."""

from __future__ import annotations

import pytest

from tests.conftest import Broker

GUARD_CODES = ("origin_not_allowed", "host_not_allowed", "method_not_allowed")


def _refused_by_guard(status: int, headers: dict[str, str] | object) -> str | None:
    code = headers.get("X-Broker-Error")  # type: ignore[attr-defined]
    return code if status in (403, 405) and code in GUARD_CODES else None


@pytest.mark.parametrize(
    "method, headers",
    [
        ("GET", {}),  # the command line, curl
        ("GET", {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}),  # typed or opened by the CLI
        # another page's link: a top-level navigation (it arrives without the SameSite cookie)
        ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}),
        # its own page
        (
            "POST",
            {
                "Host": "localhost:{port}",
                "Origin": "http://localhost:{port}",
                "Sec-Fetch-Site": "same-origin",
            },
        ),
        ("GET", {"Origin": "http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}),
        # the Host it was reached by must be the Origin's: localhost's page calling 127.0.0.1 is not
        # its own (and was refused above as another origin)
    ],
)
async def test_the_dashboards_own_page_and_navigations_pass_the_guard(
    broker: Broker, method: str, headers: dict[str, str]
) -> None:
    sent = {k: v.format(port=broker.port) for k, v in headers.items()}
    path = "/_broker/ui/api/state" if method == "GET" else "/_broker/ui/api/logout"
    async with broker.request(method, path, headers=sent, allow_redirects=False) as r:
        assert _refused_by_guard(r.status, r.headers) is None, (r.status, await r.text())
        # past the guard, the dashboard's own check: no session here
        assert r.status in (401, 403) and r.headers.get("X-Broker-Error") in (None, "admin_required")


@pytest.mark.parametrize(
    "method, headers, code",
    [
        ("POST", {"Origin": "http://evil.example"}, "origin_not_allowed"),
        ("POST", {"Origin": "null"}, "origin_not_allowed"),
        # same site as the dashboard (ports do not make a site) but another origin
        ("POST", {"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-site"}, "origin_not_allowed"),
        ("GET", {"Origin": "http://localhost:1", "Sec-Fetch-Site": "same-site"}, "origin_not_allowed"),
        # a page's fetch or image, not a navigation
        ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}, "origin_not_allowed"),
        ("GET", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, "origin_not_allowed"),
        # a frame is not a top-level navigation
        (
            "GET",
            {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"},
            "origin_not_allowed",
        ),
        # a cross-site form post is a navigation but not a GET
        ("POST", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, "origin_not_allowed"),
        # DNS rebinding: the attacker's name pointed at 127.0.0.1, its page is same-origin to itself
        ("GET", {"Host": "evil.example:{port}", "Sec-Fetch-Site": "same-origin"}, "host_not_allowed"),
        (
            "POST",
            {"Host": "evil.example:{port}", "Origin": "http://evil.example:{port}"},
            "host_not_allowed",
        ),
        ("PUT", {}, "method_not_allowed"),
    ],
)
async def test_other_pages_are_refused_before_the_dashboard(
    broker: Broker, method: str, headers: dict[str, str], code: str
) -> None:
    sent = {k: v.format(port=broker.port) for k, v in headers.items()}
    for path in (
        "/_broker/ui/api/state",
        "/_broker/ui/api/approvals/x/approve",
        "/_broker/ui",
        "/_broker/ui/",
    ):
        async with broker.request(method, path, headers=sent, allow_redirects=False) as r:
            assert _refused_by_guard(r.status, r.headers) == code, (path, await r.text())
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_the_own_origin_of_the_dashboard_opens_nothing_else(broker: Broker, upstream: object) -> None:
    own = {
        "Host": f"localhost:{broker.port}",
        "Origin": f"http://localhost:{broker.port}",
        "Sec-Fetch-Site": "same-origin",
    }
    for path in ("/_broker/status", "/_broker/reload", "/v1/cards", "/_broker/uix", "/_broker/connect/x"):
        async with broker.request("POST", path, headers=own) as r:
            assert r.status == 403 and r.headers["X-Broker-Error"] == "origin_not_allowed", path
