"""The dashboard in a real Chromium: open the one-time link, see a held request with its amount,
approve it (with a passkey through Chromium's virtual authenticator where the route needs one),
and the agent's held request completes; and what an agent or another page cannot do.

Everything is real: the daemon in-process on 127.0.0.1, a recording upstream, an aiohttp agent
whose request the daemon holds, Debian's Chromium driven over CDP by Playwright.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import keyring
from aiohttp import web
from playwright.async_api import BrowserContext, Page, expect

from broker.admin import passkeys
from tests.admin.dashboard_client import link
from tests.admin.test_dashboard import HELD, hold
from tests.browser.conftest import screenshot_path
from tests.conftest import TEST_KEY, Broker, BrokerFactory, Upstream, api_config, store_key


def of(kind: str, approval: dict[str, Any]) -> str:
    """The page's element for an approval (ids may start with a digit: quoted)."""
    return f'[data-{kind}="{approval["id"]}"]'


async def held_next(
    b: Broker, after: str, body: dict[str, Any]
) -> tuple[asyncio.Task[tuple[int, str]], dict[str, Any]]:
    """Another agent request held while `after` still waits: its task and its approval."""

    async def agent() -> tuple[int, str]:
        async with b.request("POST", "/v1/cards", json=body) as r:
            return r.status, await r.text()

    task = asyncio.create_task(agent())
    for _ in range(200):
        others = [x for x in b.daemon.rt.approvals.pending() if x.id != after]
        if others:
            return task, others[0].document()
        await asyncio.sleep(0.02)
    raise AssertionError("the request was not held")


def config(upstream: Upstream, require_passkey: bool = False) -> dict[str, Any]:
    api = {
        "name": "api",
        "prefix": "/",
        "upstream": upstream.url,
        "auth": {"type": "api_key", "key": "keyring"},
        "policy": {
            "budget": {"amount_cents": 20000, "per": "24h"},
            "approve": {"above_cents": 2000, "wait": "30s", "require_passkey": require_passkey},
        },
    }
    mcp = {  # an OAuth route nobody logged in yet: the page offers its login button
        "name": "mcp",
        "prefix": "/mcp",
        "upstream": upstream.url + "/mcp",
        "auth": {"type": "oauth", "scopes": ["cards"]},
    }
    return api_config(upstream.url, routes=[mcp, api])


async def open_dashboard(b: Broker, context: BrowserContext) -> Page:
    status, doc = await link(b)
    assert status == 200, doc
    page = await context.new_page()
    await page.goto(doc["url"])
    assert page.url == f"http://localhost:{b.port}/_broker/ui/"
    await expect(page.locator("#live")).to_have_text("live")
    return page


async def some_traffic(b: Broker) -> None:
    for body in ({"amount_cents": 500}, {"amount_cents": 1250}):
        async with b.request("POST", "/v1/cards", json=body) as r:
            assert r.status == 200
    async with b.request("GET", "/v1/cards") as r:
        assert r.status == 200
    async with b.request("POST", "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}) as r:
        assert r.status == 503  # not logged in


async def test_approve_a_held_request_in_the_browser(
    make_broker: BrokerFactory, upstream: Upstream, chromium: BrowserContext, tmp_path: Path
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(config(upstream))
    await some_traffic(b)
    page = await open_dashboard(b, chromium)
    await expect(page.locator("[data-route=api]")).to_contain_text("$17.50 used, $182.50 left")
    await expect(page.locator("[data-route=mcp] [data-login=mcp]")).to_have_text("Log in")

    task, approval = await hold(b)  # arrives over the event stream, not a reload
    card = page.locator(of("approval", approval))
    await expect(card).to_be_visible()
    await expect(card.locator("[data-field=amount]")).to_have_text("$25.00")
    await expect(card).to_contain_text("POST /v1/cards")
    await expect(card).to_contain_text("the held one")  # the exact call: its arguments
    # the held request is not answered yet: the last one answered is the refused MCP call
    await expect(page.locator("#requests tbody tr").first).to_contain_text("POST /mcp503")
    await page.screenshot(path=str(screenshot_path(tmp_path, "dashboard.png")), full_page=True)
    assert not [s for s in upstream.seen if s.body and json.loads(s.body) == HELD]  # still held

    await card.locator("[data-action=approve]").click()
    status, text = await asyncio.wait_for(task, 10)
    assert status == 200 and json.loads(text)["path"] == "/v1/cards"
    assert json.loads(upstream.seen[-1].body) == HELD  # forwarded byte for byte, once
    await expect(card).to_have_count(0)
    decision = page.locator(of("decision", approval))
    await expect(decision).to_contain_text("approved")
    await expect(decision).to_contain_text("dashboard")
    await expect(page.locator("[data-route=api]")).to_contain_text("$42.50 used")
    await expect(page.locator("#requests tbody tr").first).to_contain_text("POST /v1/cards200")  # live
    await page.screenshot(path=str(screenshot_path(tmp_path, "dashboard-approved.png")), full_page=True)
    # the page asked the upstream for nothing (no /favicon.ico through the "/" route)
    assert [s.raw_path for s in upstream.seen if s.method == "GET"] == ["/v1/cards"]
    assert b.daemon.rt.approvals.get(approval["id"]).decided_by == "dashboard"  # type: ignore[union-attr]


async def test_approve_with_a_passkey_through_the_virtual_authenticator(
    make_broker: BrokerFactory, upstream: Upstream, chromium: BrowserContext
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(config(upstream, require_passkey=True))
    page = await open_dashboard(b, chromium)
    cdp = await chromium.new_cdp_session(page)
    await cdp.send("WebAuthn.enable")
    await cdp.send(
        "WebAuthn.addVirtualAuthenticator",
        {
            "options": {
                "protocol": "ctap2",
                "transport": "internal",
                "hasResidentKey": True,
                "hasUserVerification": True,
                "isUserVerified": True,
            }
        },
    )
    await page.locator("#passkey-register").click()
    await expect(page.locator("#notice")).to_contain_text("Passkey registered (1 in all)")
    await expect(page.locator("#passkey-text")).to_contain_text("1 passkey registered")
    stored = json.loads(keyring.get_password("agentcard-broker", passkeys.ACCOUNT) or "{}")
    assert len(stored["credentials"]) == 1 and stored["credentials"][0]["public_key"]

    task, approval = await hold(b)
    card = page.locator(of("approval", approval))
    await expect(card.locator("[data-field=amount]")).to_have_text("$25.00")
    await card.locator("[data-action=approve]").click()  # "Approve with passkey": get(), then approve
    status, _ = await asyncio.wait_for(task, 10)
    assert status == 200
    assert json.loads(upstream.seen[-1].body) == HELD
    done = b.daemon.rt.approvals.get(approval["id"])
    assert done is not None and done.state == "approved" and done.decided_by == "dashboard+passkey"
    await expect(page.locator(of("decision", approval))).to_contain_text("dashboard+passkey")

    # an assertion is for the one approval it was asked for: verified for A, it does not approve B
    task_a, a = await hold(b, {"amount_cents": 3000})
    task_b, b_approval = await held_next(b, a["id"], {"amount_cents": 4000})
    approve_status = """id => fetch(`/_broker/ui/api/approvals/${id}/approve`, {method: 'POST', body: '{}',
          headers: {'Content-Type': 'application/json',
                    'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content}})
        .then(r => r.status)"""
    await page.evaluate("id => passkeyFor(id)", a["id"])  # the page's own ceremony, for A
    assert await page.evaluate(approve_status, b_approval["id"]) == 403
    assert await page.evaluate(approve_status, a["id"]) == 403  # the proof was spent on the try above
    await page.evaluate("id => passkeyFor(id)", a["id"])
    assert await page.evaluate(approve_status, a["id"]) == 200
    assert (await asyncio.wait_for(task_a, 10))[0] == 200
    await page.locator(of("approval", b_approval) + " [data-action=deny]").click()
    assert (await asyncio.wait_for(task_b, 10))[0] == 403

    # adding a passkey now needs an assertion by the one registered: asked straight, it is refused
    asked = await page.evaluate(
        """() => fetch('/_broker/ui/api/passkey/register/options', {method: 'POST', body: '{}',
              headers: {'Content-Type': 'application/json',
                        'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content}})
            .then(r => r.status)"""
    )
    assert asked == 403
    # the page gives the assertion first; the server then lists the passkey it has, so this
    # authenticator (which holds it) is refused by the browser rather than registered twice
    await page.locator("#passkey-register").click()
    await expect(page.locator("#notice")).to_contain_text("already registered")
    stored = json.loads(keyring.get_password("agentcard-broker", passkeys.ACCOUNT) or "{}")
    assert len(stored["credentials"]) == 1


async def test_without_a_passkey_the_browser_session_alone_cannot_approve(
    make_broker: BrokerFactory, upstream: Upstream, chromium: BrowserContext
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(config(upstream, require_passkey=True))
    page = await open_dashboard(b, chromium)
    task, approval = await hold(b)
    card = page.locator(of("approval", approval))
    await card.locator("[data-action=approve]").click()
    await expect(page.locator("#notice")).to_contain_text("no passkey is registered")
    assert b.daemon.rt.approvals.get(approval["id"]).state == "pending"  # type: ignore[union-attr]
    await card.locator("[data-action=deny]").click()
    status, text = await asyncio.wait_for(task, 10)
    assert status == 403 and json.loads(text)["error"]["code"] == "approval_denied"


async def test_agents_stolen_cookies_and_other_pages_cannot_approve_or_read(
    make_broker: BrokerFactory, upstream: Upstream, chromium: BrowserContext
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(config(upstream))
    status, doc = await link(b)
    page = await chromium.new_page()
    await page.goto(doc["url"])
    await expect(page.locator("#live")).to_have_text("live")
    # the link works once: a second browser tab gets the "no longer works" page
    second = await chromium.new_page()
    response = await second.goto(doc["url"])
    assert response is not None and response.status == 403
    await expect(second.locator("h1")).to_have_text("This link no longer works")

    [cookie] = [c for c in await chromium.cookies() if c["name"] == "acb_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/_broker/ui"
    assert cookie["domain"] == "localhost" and not cookie["secure"]
    assert await page.evaluate("document.cookie") == ""  # HttpOnly: no script reads it

    task, approval = await hold(b)
    approve = f"/_broker/ui/api/approvals/{approval['id']}/approve"
    # an agent, straight at the endpoint
    async with b.request("POST", approve) as r:
        assert r.status == 403
    # an agent that stole the cookie, without the page's CSRF token
    stolen = {"Host": f"localhost:{b.port}", "Cookie": f"acb_session={cookie['value']}"}
    async with b.request("POST", approve, headers=stolen) as r:
        assert r.status == 403 and r.headers["X-Broker-Error"] == "admin_required"

    # another page in the same browser, on the same site (localhost, another port): the
    # SameSite=Strict cookie goes along, and still nothing is read or approved
    evil = (
        (
            "<!doctype html><html><body><form id=f method=post action='http://localhost:PORTAPPROVE'></form>"
            "<script>"
            "fetch('http://localhost:PORT/_broker/ui/api/state', {credentials: 'include'})"
            "  .then(r => r.text()).then(t => { document.title = 'read: ' + t.slice(0, 20); })"
            "  .catch(e => { document.title = 'blocked'; });"
            "</script></body></html>"
        )
        .replace("PORT", str(b.port))
        .replace("APPROVE", approve)
    )

    async def evil_page(request: web.Request) -> web.StreamResponse:
        return web.Response(text=evil, content_type="text/html")

    upstream.handlers["/evil.html"] = evil_page
    attacker = await chromium.new_page()
    await attacker.goto(f"http://localhost:{upstream.port}/evil.html")
    await expect(attacker).to_have_title("blocked")
    async with attacker.expect_navigation():
        await attacker.evaluate("document.getElementById('f').submit()")
    assert "origin_not_allowed" in await attacker.content()
    assert b.daemon.rt.approvals.get(approval["id"]).state == "pending"  # type: ignore[union-attr]
    # the owner's page still decides
    await page.locator(of("approval", approval) + " [data-action=deny]").click()
    status, _ = await asyncio.wait_for(task, 10)
    assert status == 403


async def test_the_login_button_signs_an_oauth_route_in(
    make_broker: BrokerFactory, chromium: BrowserContext
) -> None:
    from tests.e2e.test_oauth_mcp import mcp_config
    from tests.mcp_upstream import run_mcp_upstream

    async with run_mcp_upstream(access_ttl=60) as up:
        b = await make_broker(mcp_config(up))
        page = await open_dashboard(b, chromium)
        row = page.locator("[data-route=mcp]")
        await expect(row).to_contain_text("no_credential")
        async with chromium.expect_page() as opened:
            await row.locator("[data-login=mcp]").click()
        signin = await opened.value  # the authorization server's page, which sends it straight back
        await expect(signin.locator("h1")).to_have_text("Logged in")  # the daemon's loopback callback
        await expect(row).to_contain_text("ready")
        await expect(row).to_contain_text("logged in route 'mcp'")
        await expect(row.locator("[data-login=mcp]")).to_have_text("Log in again")
        assert up.recorder.grants["authorization_code"] == 1
