"""`agentcard-broker stdio`: an MCP host that only starts local commands reaches the daemon."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import TEST_KEY, BrokerFactory, store_key, write_config
from tests.e2e.conftest import free_port
from tests.mcp_upstream import McpUpstream, run_mcp_upstream


@pytest.fixture
async def plain_mcp() -> AsyncIterator[McpUpstream]:
    async with run_mcp_upstream(auth=False) as up:
        yield up


def stdio_params(config: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "broker", "stdio", "mcp", "--config", str(config)],
        cwd=str(Path.cwd()),
    )


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_stdio_relays_tools_through_the_daemon(
    make_broker: BrokerFactory, plain_mcp: McpUpstream, tmp_path: Path, mode: str
) -> None:
    store_key(TEST_KEY, "mcp")
    doc = {
        "listen": [f"127.0.0.1:{free_port()}"],
        "allow_insecure_upstream": True,
        "timeouts": {"drain": 1},
        "routes": [
            {"name": "mcp", "prefix": "/mcp", "upstream": plain_mcp.mcp_url, "auth": {"type": "api_key"}}
        ],
    }
    await make_broker(doc)
    cfg = write_config(tmp_path / "c.yaml", doc)
    async with Client(stdio_params(cfg), mode=mode) as host:
        names = {t.name for t in (await host.list_tools()).tools}
        assert {"list_cards", "create_card"} <= names
        result = await host.call_tool("create_card", {"amount_cents": 42})
        assert result.structured_content == {"id": "c2", "amount_cents": 42}
    seen = plain_mcp.recorder.mcp_headers
    assert seen and all(h["authorization"] == f"Bearer {TEST_KEY}" for h in seen)  # added by the daemon
    if mode == "legacy":
        assert any("mcp-session-id" in h for h in seen)
        assert any(h["method"] == "DELETE" for h in seen)  # stdin closed: the session was ended
    else:
        assert any(h.get("mcp-method") == "tools/call" and h.get("mcp-name") == "create_card" for h in seen)


async def test_stdio_reaches_a_daemon_on_its_unix_socket(
    make_broker: BrokerFactory, plain_mcp: McpUpstream, tmp_path: Path
) -> None:
    store_key(TEST_KEY, "mcp")
    sock = tmp_path / "run" / "broker.sock"
    doc = {
        "listen": [f"unix:{sock}"],  # the only listener: no TCP port to fall back on
        "allow_insecure_upstream": True,
        "timeouts": {"drain": 1},
        "routes": [
            {"name": "mcp", "prefix": "/mcp", "upstream": plain_mcp.mcp_url, "auth": {"type": "api_key"}}
        ],
    }
    await make_broker(doc)
    cfg = write_config(tmp_path / "c.yaml", doc)
    async with Client(stdio_params(cfg), mode="legacy") as host:
        result = await host.call_tool("create_card", {"amount_cents": 7})
        assert result.structured_content == {"id": "c2", "amount_cents": 7}
    seen = plain_mcp.recorder.mcp_headers
    assert seen and all(h["authorization"] == f"Bearer {TEST_KEY}" for h in seen)


async def test_stdio_says_how_to_start_the_daemon(plain_mcp: McpUpstream, tmp_path: Path) -> None:
    doc = {
        "listen": [f"127.0.0.1:{free_port()}"],  # nothing listens here
        "allow_insecure_upstream": True,
        "routes": [
            {"name": "mcp", "prefix": "/mcp", "upstream": plain_mcp.mcp_url, "auth": {"type": "api_key"}}
        ],
    }
    cfg = write_config(tmp_path / "c.yaml", doc)
    with pytest.raises(BaseExceptionGroup) as info:
        async with Client(stdio_params(cfg), mode="legacy") as host:
            await host.list_tools()
    assert "agentcard-broker run" in repr(info.value)
