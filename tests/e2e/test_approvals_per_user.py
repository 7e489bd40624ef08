"""Approvals on a per-user route: the end user decides through a link, as on the connect page.

The platform, AgentCard (the MCP SDK server behind its OAuth server) and the end user's browser
are the real ones of tests/e2e/test_per_user.py; the agent is raw JSON-RPC or `mcp.Client`.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp import MCPError

from broker import config as config_mod
from broker.admin.client import DaemonClient
from broker.auth.platform_clients import add_client
from broker.errors import JSONRPC_URL_ELICITATION
from tests.conftest import BrokerFactory, write_config
from tests.e2e.conftest import free_port
from tests.e2e.test_per_user import (
    MODES,
    Platform,
    browser_connect,
    call_tool,
    connect_url_of,
    mcp_client,
    per_user_doc,
)
from tests.mcp_upstream import run_mcp_upstream
from tests.test_approvals import no_desktop

__all__ = ["no_desktop"]  # the autouse fixture: no real desktop notification from these tests

APPROVE_RE = re.compile(r"http://127\.0\.0\.1:\d+/_broker/approve/[A-Z2-7]{26}")
NAVIGATE = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}


@pytest.fixture
async def platform(make_broker: BrokerFactory, tmp_path: Path) -> AsyncIterator[Platform]:
    async with run_mcp_upstream(access_ttl=60) as up:
        port = free_port()
        doc = per_user_doc(up, port, tmp_path / "state")
        doc["routes"][0]["policy"] = {"approve": {"tools": ["create_card"], "wait": "60s"}}
        cfg = config_mod.load(write_config(tmp_path / "clients.yaml", doc))
        lines = await asyncio.to_thread(add_client, cfg, "librechat")
        token = next(line.text for line in lines if not line.to_stderr)
        p = Platform(await make_broker(doc), up, token, f"http://127.0.0.1:{port}", tmp_path / "state")
        status, page, _ = await browser_connect(p, await connect_url_of(p, "alice"))
        assert status == 200, page
        yield p


META = {  # what mcp.Client in auto mode sends (MCP 2026-07-28): a call that needs no session
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientInfo": {"name": "mcp", "version": "0.1.0"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def create_card(rid: int, **arguments: Any) -> dict[str, Any]:
    doc = call_tool("create_card", rid, **arguments)
    doc["params"]["_meta"] = META
    return doc


async def post(p: Platform, doc: Any, user: str = "alice") -> tuple[int, dict[str, str], str]:
    headers = {**p.headers(user), "Accept": "application/json, text/event-stream"}
    headers |= {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call", "Mcp-Name": "create_card"}
    async with p.b.request("POST", "/mcp", json=doc, headers=headers) as r:
        return r.status, dict(r.headers), await r.text()


async def approve_link(p: Platform, doc: Any) -> str:
    status, headers, text = await post(p, doc)
    assert status == 403 and headers["X-Broker-Error"] == "approval_required", text
    body = json.loads(text)
    err = body["error"]
    assert err["code"] == JSONRPC_URL_ELICITATION and err["data"]["code"] == "approval_required"
    (elicitation,) = err["data"]["elicitations"]
    url = str(elicitation["url"])
    assert APPROVE_RE.fullmatch(url) and url in err["message"]
    assert elicitation["elicitationId"] == url.rsplit("/", 1)[1] and body["id"] == doc["id"]
    return url


async def browser_decide(p: Platform, url: str, decision: str) -> tuple[int, str, str]:
    """The end user's browser: the page, then its form's button. Returns (status, answer, page)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=NAVIGATE) as r:
            assert r.status == 200, await r.text()
            page = await r.text()
        action = html.unescape(re.search(r"<form method='post' action='([^']+)'", page)[1])  # type: ignore[index]
        approval_id = html.unescape(re.search(r"name='approval_id' value='([^']+)'", page)[1])  # type: ignore[index]
        assert action == url
        async with s.post(
            action,
            data={"approval_id": approval_id, "decision": decision},
            headers={"Origin": p.public_url, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"},
        ) as r:
            return r.status, await r.text(), page


async def test_the_end_user_approves_one_call_through_the_link(platform: Platform) -> None:
    p = platform
    calls = p.up.recorder.calls
    url = await approve_link(p, create_card(1, amount_cents=900))
    assert calls[("POST", "/mcp")] == 0  # nothing reached AgentCard

    # the owner sees it, but on a per-user route the end user decides
    (held,) = p.b.daemon.rt.approvals.pending()
    assert (held.client, held.user, held.tools) == ("librechat", "alice", ("create_card",))
    owner = DaemonClient(p.b.daemon.rt.snapshot.config)  # the owner's CLI, with the admin key
    status, answer = await asyncio.to_thread(owner.admin, "POST", f"/_broker/approvals/{held.id}/approve")
    assert status == 409 and "end user decides" in answer["error"]["message"]

    # a form posted from anywhere but the broker's own page is refused; the link still works
    approval_id = url.rsplit("/", 1)[1]
    async with aiohttp.ClientSession() as s:
        for origin in ("https://evil.example", None):
            headers = {"Origin": origin} if origin else {}
            async with s.post(
                url, data={"approval_id": approval_id, "decision": "approve"}, headers=headers
            ) as r:
                assert r.status == 403
        async with s.get(url, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}) as r:
            assert r.status == 403  # a script on another site cannot read the page
    status, answer, page = await browser_decide(p, url, "approve")
    assert status == 200 and "Approved" in answer
    assert "create_card" in page and "$9.00" in page and "librechat" in page and "alice" in page
    assert "&quot;amount_cents&quot;: 900" in page  # the arguments, escaped
    form = {"approval_id": approval_id, "decision": "approve"}
    async with aiohttp.ClientSession() as s, s.post(url, data=form, headers={"Origin": p.public_url}) as r:
        assert r.status == 410  # the link is used up

    # the agent asks again (a new JSON-RPC id): it goes through, once
    status, headers, text = await post(p, create_card(2, amount_cents=900))
    assert status == 200, text
    assert "900" in text and calls[("POST", "/mcp")] == 1
    assert held.state == "approved" and held.decided_by == "end user"
    # the same call a third time is held again: a new link
    again = await approve_link(p, create_card(3, amount_cents=900))
    assert again != url
    # and a changed call is another approval; its page escapes what the agent wrote
    changed = await approve_link(p, create_card(4, amount_cents=900, note="<b>x</b>&'"))
    assert changed not in (url, again)
    async with aiohttp.ClientSession() as s, s.get(changed, headers=NAVIGATE) as r:
        page = await r.text()
    assert "<b>x" not in page and "&lt;b&gt;x&lt;/b&gt;&amp;" in page
    assert calls[("POST", "/mcp")] == 1


async def test_the_end_user_denies(platform: Platform) -> None:
    p = platform
    url = await approve_link(p, create_card(1, amount_cents=500))
    status, answer, _ = await browser_decide(p, url, "deny")
    assert status == 200 and "Denied" in answer
    status, headers, text = await post(p, create_card(2, amount_cents=500))
    assert status == 403 and headers["X-Broker-Error"] == "approval_denied", text
    assert '"id": 2' in text
    assert await approve_link(p, create_card(3, amount_cents=500)) != url  # asked anew
    assert p.up.recorder.calls[("POST", "/mcp")] == 0
    # bob never connected: he is asked to connect first, never to approve
    status, headers, _ = await post(p, create_card(1, amount_cents=500), user="bob")
    assert headers["X-Broker-Error"] == "needs_connect"


@pytest.mark.parametrize("mode", MODES)
async def test_mcp_client_gets_the_link_then_its_retry_goes_through(platform: Platform, mode: str) -> None:
    p = platform
    async with mcp_client(p, mode, "alice") as agent:
        assert not (await agent.call_tool("list_cards", {})).is_error  # not held
        with pytest.raises(MCPError) as info:
            await agent.call_tool("create_card", {"amount_cents": 700})
        assert info.value.error.code == JSONRPC_URL_ELICITATION
        found = APPROVE_RE.search(str(info.value))
        assert found, str(info.value)
        status, answer, _ = await browser_decide(p, found[0], "approve")
        assert status == 200, answer
        result = await agent.call_tool("create_card", {"amount_cents": 700})
        assert not result.is_error and "700" in str(result.model_dump(mode="json"))
