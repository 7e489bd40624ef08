"""Which OAuth client the broker is (issue 19): a Client ID Metadata Document on a per-user route
when the authorization server supports them, else dynamic registration ("native" for `login`'s
loopback redirect), kept and reused. The authorization server is the sandbox one (the MCP SDK's),
taught to read client documents in tests/mcp_upstream.py (the installed SDK's server has no
such support); the document is fetched from the running broker over 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from broker import config as config_mod
from broker.auth.platform_clients import add_client
from tests.conftest import BrokerFactory, write_config
from tests.e2e.conftest import free_port
from tests.e2e.test_oauth_mcp import login, mcp_config
from tests.e2e.test_per_user import LIST, Platform, browser_connect, connect_url_of, per_user_doc
from tests.mcp_upstream import CimdProvider, run_mcp_upstream


@pytest.fixture
async def cimd_platform(make_broker: BrokerFactory, tmp_path: Path) -> AsyncIterator[Platform]:
    async with run_mcp_upstream(access_ttl=60, cimd=True) as up:
        port = free_port()
        doc = per_user_doc(up, port, tmp_path / "state")
        cfg = config_mod.load(write_config(tmp_path / "clients.yaml", doc))
        lines = await asyncio.to_thread(add_client, cfg, "librechat")
        token = next(line.text for line in lines if not line.to_stderr)
        b = await make_broker(doc)
        yield Platform(b, up, token, f"http://127.0.0.1:{port}", tmp_path / "state")


async def test_a_per_user_route_is_its_client_metadata_document(cimd_platform: Platform) -> None:
    p = cimd_platform
    document_url = f"{p.public_url}/_broker/oauth/client.json"
    async with aiohttp.ClientSession() as s, s.get(document_url) as r:
        assert r.status == 200
        doc = await r.json()
    assert doc == {
        "client_id": document_url,
        "client_name": "agentcard-broker",
        "redirect_uris": [f"{p.public_url}/_broker/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "application_type": "web",
    }
    status, page, _ = await browser_connect(p, await connect_url_of(p, "alice"))
    assert status == 200, page
    assert isinstance(p.up.provider, CimdProvider)
    assert document_url in p.up.provider.fetched  # the server learnt the client from the document
    assert p.up.recorder.calls[("POST", "/register")] == 0  # and nothing was registered
    status, headers, body = await p.post(LIST, headers=p.headers("alice"))
    # the upstream itself answers (it wants an MCP session first): the user's token was accepted
    assert status == 400 and "X-Broker-Error" not in headers, body
    assert "session" in body["error"]["message"]
    grant = await p.grant_tokens("alice")
    assert grant is not None and not grant.dead


async def test_no_document_without_public_url(make_broker: BrokerFactory, tmp_path: Path) -> None:
    async with run_mcp_upstream(cimd=True) as up:
        b = await make_broker(mcp_config(up))
        async with b.request("GET", "/_broker/oauth/client.json") as r:
            assert r.status == 404


async def test_login_registers_as_a_native_client_once_even_where_documents_are_supported(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """`login` has a loopback redirect and no public URL: dynamic registration, application_type
    native, kept: a second login and a restarted daemon register nothing more."""
    async with run_mcp_upstream(cimd=True) as up:
        doc = mcp_config(up)
        cfg = write_config(tmp_path / "login.yaml", doc)
        rc, _, err = await login(cfg)
        assert rc == 0, err
        assert [r["application_type"] for r in up.recorder.registrations] == ["native"]
        assert up.recorder.registrations[0]["redirect_uris"][0].startswith("http://127.0.0.1:")
        b = await make_broker(doc)
        async with b.request("GET", "/mcp") as r:
            assert r.status != 401
        await b.daemon.stop()
        rc, _, err = await login(cfg)
        assert rc == 0, err
        b = await make_broker(doc)
        async with b.request("GET", "/_broker/status") as r:
            assert (await r.json())["routes"][0]["state"] == "ready"
        assert up.recorder.calls[("POST", "/register")] == 1
