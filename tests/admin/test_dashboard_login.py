"""The dashboard's login button: the same OAuth login as `agentcard-broker login`, run in the
daemon, against the real MCP SDK authorization server; the running daemon uses the tokens at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.admin.dashboard_client import owner
from tests.conftest import BrokerFactory, assert_no_secret
from tests.e2e.test_oauth_mcp import browser, mcp_config
from tests.mcp_upstream import McpUpstream, run_mcp_upstream


@pytest.fixture
async def upstream_mcp() -> AsyncIterator[McpUpstream]:
    async with run_mcp_upstream(access_ttl=60) as up:
        yield up


async def test_the_login_button_logs_an_oauth_route_in(
    make_broker: BrokerFactory, upstream_mcp: McpUpstream
) -> None:
    b = await make_broker(mcp_config(upstream_mcp))
    me = await owner(b)
    assert (await me.state())["routes"][0]["state"] == "no_credential"
    status, doc = await me.post("/api/login/mcp")
    assert status == 200 and doc["route"] == "mcp" and "/authorize?" in doc["url"]
    page_status, page = await browser(doc["url"])  # the user signs in; the loopback callback answers
    assert page_status == 200, page
    state: dict[str, Any] = {}
    for _ in range(100):
        state = await me.state()
        if state["routes"][0]["state"] == "ready":
            break
        await asyncio.sleep(0.05)
    assert state["routes"][0]["state"] == "ready", state["routes"][0]
    assert (
        state["logins"]["mcp"]["ok"] is True and "logged in route 'mcp'" in state["logins"]["mcp"]["message"]
    )
    assert upstream_mcp.recorder.grants["authorization_code"] == 1
    # the agent is served with the new tokens, without a restart and without holding any
    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}
    headers = {"Accept": "application/json, text/event-stream"}
    async with b.request("POST", "/mcp", json=rpc, headers=headers) as r:
        assert r.status == 200, await r.text()
    assert_no_secret(b.logs)


async def test_login_is_refused_for_a_route_that_is_not_oauth_and_without_the_csrf_token(
    make_broker: BrokerFactory, upstream_mcp: McpUpstream
) -> None:
    b = await make_broker(mcp_config(upstream_mcp))
    me = await owner(b)
    status, doc = await me.post("/api/login/nope")
    assert status == 400 and "nope" in doc["error"]["message"]
    async with b.request("POST", "/_broker/ui/api/login/mcp", headers=me.headers(csrf=False)) as r:
        assert r.status == 403
    assert upstream_mcp.recorder.calls.get(("POST", "/register"), 0) == 0  # nothing was started
