"""OAuth 2.1 on the user's behalf, and MCP through the broker.

The upstream is the real MCP SDK server with the SDK's own authorization server (short-lived
access tokens, single-use rotating refresh tokens); the agent is the real `mcp.Client` in both
`legacy` and `auto` modes, pointed at the broker with no token; `login` is the real CLI.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import keyring
import pytest
from aiohttp import web
from keyrings.alt.file import PlaintextKeyring
from mcp import Client, MCPError

from broker.auth.oauth import OAuthError, discover
from tests.conftest import Broker, BrokerFactory, assert_no_secret, write_config
from tests.e2e.conftest import CLI, cli, free_port
from tests.mcp_upstream import McpUpstream, run_mcp_upstream

MODES = ["legacy", "auto"]


@pytest.fixture
async def upstream_mcp() -> AsyncIterator[McpUpstream]:
    async with run_mcp_upstream(access_ttl=60) as up:
        yield up


def mcp_config(up: McpUpstream, **top: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listen": [f"127.0.0.1:{free_port()}"],  # a real port: login/logout poke the daemon there
        "allow_insecure_upstream": True,
        "log": {"level": "debug", "format": "json"},
        "timeouts": {"drain": 1},
        "routes": [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": up.mcp_url,
                "auth": {"type": "oauth", "scopes": ["cards"], "redirect_port": free_port()},
            }
        ],
    }
    doc.update(top)
    return doc


class Login:
    """`agentcard-broker login mcp --no-browser` as a subprocess, and the browser's part of it."""

    def __init__(self, config: Path, timeout: float = 20) -> None:
        self.config, self.timeout = config, timeout
        self.out: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> str:
        self.proc = await asyncio.create_subprocess_exec(
            *CLI, "login", "mcp", "--config", str(self.config), "--no-browser",
            "--timeout", str(self.timeout),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout
        while line := await asyncio.wait_for(self.proc.stdout.readline(), 30):
            text = line.decode().strip()
            self.out.append(text)
            if "/authorize?" in text:
                return text
        raise AssertionError(f"no authorization URL printed: {self.out}")

    async def finish(self) -> tuple[int, str, str]:
        assert self.proc and self.proc.stdout and self.proc.stderr
        out, err = await asyncio.wait_for(self.proc.communicate(), 60)
        return self.proc.returncode or 0, "\n".join(self.out) + out.decode(), err.decode()


async def browser(authorize_url: str, *, state: str | None = None) -> tuple[int, str]:
    """What the user's browser does: open the URL, follow the redirect back to the callback."""
    async with aiohttp.ClientSession() as s:
        async with s.get(authorize_url, allow_redirects=False) as r:
            assert r.status == 302, await r.text()
            location = r.headers["Location"]
        if state is not None:  # a forged callback: same code, someone else's state
            parts = urlsplit(location)
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            q["state"] = state
            location = parts._replace(query="&".join(f"{k}={v}" for k, v in q.items())).geturl()
        async with s.get(location) as r:
            return r.status, await r.text()


async def login(config: Path) -> tuple[int, str, str]:
    lg = Login(config)
    url = await lg.start()
    status, page = await browser(url)
    assert status == 200, page
    return await lg.finish()


async def logged_in_broker(make_broker: BrokerFactory, up: McpUpstream, tmp_path: Path, **top: Any) -> Broker:
    doc = mcp_config(up, **top)
    rc, _, err = await login(write_config(tmp_path / "login.yaml", doc))
    assert rc == 0, err
    return await make_broker(doc)


@pytest.mark.parametrize("mode", MODES)
async def test_login_then_mcp_tools_through_the_broker(
    make_broker: BrokerFactory, upstream_mcp: McpUpstream, tmp_path: Path, mode: str
) -> None:
    doc = mcp_config(upstream_mcp)
    b = await make_broker(doc)
    # before login: the agent gets a JSON-RPC error that names the fix, not a 401
    async with b.request("POST", "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}) as r:
        assert r.status == 503
        body = await r.json()
    assert body["id"] == 1
    assert body["error"]["data"]["code"] == "no_credential"
    assert "run: agentcard-broker login mcp" in body["error"]["message"]

    cfg_path = write_config(tmp_path / "c.yaml", doc)
    rc, out, err = await login(cfg_path)
    assert rc == 0, err
    assert "the running daemon picked it up" in out
    assert f"at {upstream_mcp.base}" in out
    assert "alice@example.test" not in out or "as " in out
    assert "access token expires" in out
    assert upstream_mcp.recorder.calls[("POST", "/register")] == 1
    assert upstream_mcp.recorder.grants["authorization_code"] == 1

    # the running broker picks the login up without a restart; the agent holds no token
    async with Client(f"{b.url}/mcp", mode=mode) as agent:
        tools = await agent.list_tools()
        assert {t.name for t in tools.tools} >= {"list_cards", "create_card", "whoami"}
        result = await agent.call_tool("create_card", {"amount_cents": 1234})
        assert not result.is_error
        assert result.structured_content == {"id": "c2", "amount_cents": 1234}
        who = await agent.call_tool("whoami", {})
    assert who.content[0].text.endswith(f" alice@example.test {upstream_mcp.mcp_url}")  # type: ignore[union-attr]
    seen = upstream_mcp.recorder.mcp_headers
    assert all(h.get("authorization", "").startswith("Bearer at_") for h in seen)
    if mode == "legacy":
        assert any(h["method"] == "GET" for h in seen)  # the server stream
        assert any(h["method"] == "DELETE" for h in seen)  # session end
        assert any("mcp-session-id" in h for h in seen)
    else:
        assert any(h.get("mcp-protocol-version") == "2026-07-28" for h in seen)
        assert any(h.get("mcp-method") == "tools/call" and h.get("mcp-name") == "create_card" for h in seen)
    tokens = json.loads(keyring.get_password("agentcard-broker", "mcp:oauth_tokens") or "{}")
    assert_no_secret(b.logs, secrets=(tokens["access_token"], tokens["refresh_token"]))
    async with b.request("GET", "/_broker/status") as r:
        route = (await r.json())["routes"][0]
    assert route["state"] == "ready"
    assert route["scopes"] == ["cards"]
    assert route["subject"] is None or route["subject"] == "alice@example.test"
    assert route["expires_at"] is not None


async def test_status_right_after_login_shows_the_login(
    make_broker: BrokerFactory, upstream_mcp: McpUpstream, tmp_path: Path
) -> None:
    """`login` tells the running daemon, which reads the new tokens before it answers: `status`
    right after shows the route ready, with no agent request in between."""
    doc = mcp_config(upstream_mcp)
    await make_broker(doc)
    cfg_path = write_config(tmp_path / "c.yaml", doc)

    async def route_status() -> dict[str, Any]:
        rc, out, err = await cli("status", "--config", str(cfg_path), "--json")
        assert rc == 0, err
        return dict(json.loads(out)["routes"][0])

    assert (await route_status())["state"] == "no_credential"
    rc, _out, err = await login(cfg_path)
    assert rc == 0, err
    route = await route_status()
    assert route["state"] == "ready", route
    assert route["reason"] == f"logged in to {upstream_mcp.base}"
    assert route["scopes"] == ["cards"]
    assert route["expires_at"] is not None
    assert upstream_mcp.recorder.calls.get(("POST", "/mcp"), 0) == 0  # no agent request came


async def test_oauth_discovery_never_reaches_the_agent(
    make_broker: BrokerFactory, upstream_mcp: McpUpstream, tmp_path: Path
) -> None:
    b = await make_broker(mcp_config(upstream_mcp, routes=[
        *mcp_config(upstream_mcp)["routes"],
        {"name": "api", "prefix": "/", "upstream": upstream_mcp.base, "auth": {"type": "api_key"}},
    ]))  # fmt: skip
    for path in (
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
        "/mcp/.well-known/oauth-protected-resource",
    ):
        async with b.request("GET", path) as r:
            assert r.status == 404, path
            assert r.headers["X-Broker-Error"] == "not_found"
    assert upstream_mcp.recorder.calls == {}
    # an upstream 401 (and its WWW-Authenticate) never reaches the agent
    keyring.set_password(
        "agentcard-broker",
        "mcp:oauth_client",
        json.dumps({
            "client_id": "x", "issuer": upstream_mcp.base, "authorization_endpoint": "", "token_endpoint":
            f"{upstream_mcp.base}/token", "revocation_endpoint": None, "registration_endpoint": None,
            "resource": upstream_mcp.mcp_url, "redirect_uri": "http://127.0.0.1:1/callback",
        }),
    )  # fmt: skip
    keyring.set_password(
        "agentcard-broker",
        "mcp:oauth_tokens",
        json.dumps({"access_token": "at_forged", "refresh_token": None, "expires_at": time.time() + 600}),
    )
    b.daemon.rt.credentials["mcp"].invalidate()
    async with b.request("POST", "/mcp", json={"jsonrpc": "2.0", "id": "a", "method": "tools/list"}) as r:
        assert r.status == 503
        assert "WWW-Authenticate" not in r.headers
        body = await r.json()
    assert body.get("id") == "a", body
    assert body["error"]["data"]["code"] in ("credential_rejected", "needs_login")
    assert "agentcard-broker login mcp" in body["error"]["message"]


async def test_twenty_concurrent_calls_across_expiry_refresh_once(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    async with run_mcp_upstream(access_ttl=4) as up:
        b = await logged_in_broker(make_broker, up, tmp_path)
        cred = b.daemon.rt.credentials["mcp"]
        async with Client(f"{b.url}/mcp", mode="auto") as agent:
            await agent.list_tools()
            first_access = cred._tokens.access_token  # type: ignore[attr-defined]
            expires_at = cred._tokens.expires_at  # type: ignore[attr-defined]
            await asyncio.sleep(max(0.0, expires_at - time.time() - 0.3))  # inside the refresh window
            before = up.recorder.grants["refresh_token"]
            results = await asyncio.gather(
                *(agent.call_tool("create_card", {"amount_cents": i}) for i in range(20))
            )
        refreshes = up.recorder.grants["refresh_token"] - before
        print(f"token endpoint: {refreshes} refresh call(s) for 20 concurrent calls across expiry")
        assert refreshes == 1
        assert all(not r.is_error for r in results)
        assert sorted(r.structured_content["amount_cents"] for r in results) == list(range(20))  # type: ignore[index]
        stored = json.loads(keyring.get_password("agentcard-broker", "mcp:oauth_tokens") or "{}")
        assert stored["access_token"] != first_access
        assert stored["refresh_token"] in up.provider.refresh_tokens  # the rotated one was stored


async def test_revoked_grant_ends_in_needs_login_without_hammering(
    make_broker: BrokerFactory, upstream_mcp: McpUpstream, tmp_path: Path
) -> None:
    b = await logged_in_broker(make_broker, upstream_mcp, tmp_path)
    async with Client(f"{b.url}/mcp", mode="auto") as agent:
        await agent.list_tools()
    upstream_mcp.provider.revoke_everything()  # the user revoked the grant at AgentCard
    before = dict(upstream_mcp.recorder.grants)
    for i in range(10):
        async with b.request("POST", "/mcp", json={"jsonrpc": "2.0", "id": i, "method": "tools/list"}) as r:
            assert r.status == 503
            body = await r.json()
        assert body["id"] == i
        assert body["error"]["data"]["code"] == "needs_login"
        assert "run: agentcard-broker login mcp" in body["error"]["message"]
    refresh_calls = upstream_mcp.recorder.grants["refresh_token"] - before.get("refresh_token", 0)
    print(f"token endpoint: {refresh_calls} refresh call(s) for 10 requests after revocation")
    assert refresh_calls == 1
    async with b.request("GET", "/_broker/status") as r:
        assert (await r.json())["routes"][0]["state"] == "needs_login"


async def test_tokens_survive_restart_and_rotation(make_broker: BrokerFactory, tmp_path: Path) -> None:
    async with run_mcp_upstream(access_ttl=2) as up:
        doc = mcp_config(up)
        first = await logged_in_broker(make_broker, up, tmp_path)
        async with Client(f"{first.url}/mcp", mode="auto") as agent:
            await agent.list_tools()
            await asyncio.sleep(2.2)  # expired: the next call refreshes (rotating the refresh token)
            await agent.call_tool("list_cards", {})
        assert up.recorder.grants["refresh_token"] >= 1
        await first.daemon.stop()
        await asyncio.sleep(2.2)  # expired again: the new daemon must refresh with the rotated token
        second = await make_broker(doc)
        async with Client(f"{second.url}/mcp", mode="legacy") as agent:
            result = await agent.call_tool("list_cards", {})
        assert not result.is_error
        async with second.request("GET", "/_broker/status") as r:
            assert (await r.json())["routes"][0]["state"] == "ready"
        assert up.recorder.grants["authorization_code"] == 1  # no second login
        # RFC 8707: every token request names the resource, the refreshes as much as the code's
        assert {r["resource"] for r in up.recorder.token_requests} == {up.mcp_url}
        assert sum(r["grant_type"] == "refresh_token" for r in up.recorder.token_requests) >= 2


async def test_bad_state_is_refused_and_login_times_out(upstream_mcp: McpUpstream, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", mcp_config(upstream_mcp))
    lg = Login(cfg, timeout=3)
    url = await lg.start()
    status, page = await browser(url, state="forged-state")
    assert status == 400
    assert "does not match" in page
    rc, _, err = await lg.finish()
    assert rc == 1
    assert "no answer from the browser" in err
    assert keyring.get_password("agentcard-broker", "mcp:oauth_tokens") is None
    assert upstream_mcp.recorder.grants["authorization_code"] == 0


async def test_wrong_iss_is_refused(tmp_path: Path) -> None:
    async with run_mcp_upstream(iss="https://evil.example") as up:
        cfg = write_config(tmp_path / "c.yaml", mcp_config(up))
        lg = Login(cfg)
        url = await lg.start()
        status, page = await browser(url)
        assert status == 400
        assert "&lt;" not in page or "<script" not in page
        rc, _, err = await lg.finish()
        assert rc == 1
        assert "wrong issuer" in err
        assert keyring.get_password("agentcard-broker", "mcp:oauth_tokens") is None
        assert up.recorder.grants["authorization_code"] == 0


async def test_error_description_is_escaped_in_the_page(upstream_mcp: McpUpstream, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", mcp_config(upstream_mcp))
    lg = Login(cfg)
    url = await lg.start()
    q = parse_qs(urlsplit(url).query)
    callback = q["redirect_uri"][0]
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            callback,
            params={
                "state": q["state"][0],
                "error": "access_denied",
                "error_description": "<script>x</script>",
            },
        ) as r,
    ):
        page = await r.text()
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    rc, _, err = await lg.finish()
    assert rc == 1 and "access_denied" in err


async def _metadata_server(meta: dict[str, Any]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    base = {"url": ""}

    async def prm(request: web.Request) -> web.Response:
        return web.json_response({"resource": base["url"] + "/mcp", "authorization_servers": [base["url"]]})

    async def asm(request: web.Request) -> web.Response:
        return web.json_response({"issuer": base["url"], **meta})

    app.router.add_get("/.well-known/oauth-protected-resource/mcp", prm)
    app.router.add_get("/.well-known/oauth-authorization-server", asm)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    return runner, base["url"]


async def test_metadata_without_s256_or_https_is_refused(tmp_path: Path) -> None:
    meta = {
        "authorization_endpoint": "/authorize", "token_endpoint": "/token",
        "code_challenge_methods_supported": ["plain"],
    }  # fmt: skip
    runner, base = await _metadata_server(meta)
    try:
        meta["authorization_endpoint"] = base + "/authorize"
        meta["token_endpoint"] = base + "/token"
        doc = {
            "allow_insecure_upstream": True,
            "routes": [{"name": "mcp", "prefix": "/mcp", "upstream": base + "/mcp",
                        "auth": {"type": "oauth", "redirect_port": free_port()}}],
        }  # fmt: skip
        cfg = write_config(tmp_path / "c.yaml", doc)
        proc = await asyncio.create_subprocess_exec(
            *CLI, "login", "mcp", "--config", str(cfg), "--no-browser",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        assert "S256" in err.decode()
        assert "/authorize?" not in out.decode()  # refused before any URL was offered
        meta["code_challenge_methods_supported"] = ["S256"]
        async with aiohttp.ClientSession() as s:
            with pytest.raises(OAuthError, match="not https"):
                await discover(s, base + "/mcp", insecure_ok=False)
            found = await discover(s, base + "/mcp", insecure_ok=True)
        assert found.token_endpoint == base + "/token"
    finally:
        await runner.cleanup()


async def test_stale_registration_is_redone_once(upstream_mcp: McpUpstream, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", mcp_config(upstream_mcp))
    rc, _, err = await login(cfg)
    assert rc == 0, err
    rc, _, err = await login(cfg)  # a second login reuses the registration
    assert rc == 0, err
    assert upstream_mcp.recorder.calls[("POST", "/register")] == 1
    upstream_mcp.provider.clients.clear()  # the server forgot the broker's client
    rc, out, err = await login(cfg)
    assert rc == 0, err
    assert "registering again" in out
    assert upstream_mcp.recorder.calls[("POST", "/register")] == 2


async def test_logout_revokes_and_forgets(
    make_broker: BrokerFactory, upstream_mcp: McpUpstream, tmp_path: Path
) -> None:
    b = await logged_in_broker(make_broker, upstream_mcp, tmp_path)
    assert upstream_mcp.provider.refresh_tokens
    proc = await asyncio.create_subprocess_exec(
        *CLI, "logout", "mcp", "--config", str(tmp_path / "login.yaml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert "revoked" in out.decode() and "refresh token" in out.decode()
    assert upstream_mcp.provider.refresh_tokens == {}
    assert upstream_mcp.provider.access_tokens == {}
    assert keyring.get_password("agentcard-broker", "mcp:oauth_tokens") is None
    b.daemon.rt.credentials["mcp"].invalidate()  # what the CLI's poke does for a daemon it can reach
    async with b.request("POST", "/mcp", json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}) as r:
        assert r.status == 503
        assert (await r.json())["error"]["data"]["code"] == "no_credential"


async def test_mcp_client_sees_the_fix_in_its_error(
    make_broker: BrokerFactory, upstream_mcp: McpUpstream
) -> None:
    b = await make_broker(mcp_config(upstream_mcp))
    with pytest.raises(BaseExceptionGroup) as info:  # the SDK raises from its task group
        async with Client(f"{b.url}/mcp", mode="legacy") as agent:
            await agent.list_tools()
    assert info.group_contains(MCPError, match="run: agentcard-broker login mcp", depth=None)
    assert upstream_mcp.recorder.calls == {}


class _SlowTokenReads(PlaintextKeyring):
    """The real file keyring, except that a read of the OAuth tokens returns `delay` seconds
    after it read the file: a keyring (D-Bus, a locked store) answering slowly."""

    delay = 0.0

    def get_password(self, service: str, username: str) -> str | None:
        value = super().get_password(service, username)
        if username.endswith(":oauth_tokens") and self.delay:
            time.sleep(self.delay)
        return value


async def test_a_store_read_overlapping_a_refresh_never_brings_back_the_rotated_out_token(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    # `set-key`/`login` make the daemon re-read the store; a read that began before a refresh
    # stored the rotated pair ends after it with the old pair, whose refresh token is now dead
    async with run_mcp_upstream(access_ttl=2) as up:
        b = await logged_in_broker(make_broker, up, tmp_path)
        slow = _SlowTokenReads()
        keyring.set_keyring(slow)
        cred = b.daemon.rt.credentials["mcp"]
        async with Client(f"{b.url}/mcp", mode="auto") as agent:
            await agent.list_tools()
            await asyncio.sleep(2.2)  # expired: the next call refreshes
            slow.delay = 1.0
            cred.invalidate()
            reread = asyncio.create_task(cred.refresh_from_store())  # reads the old pair, then waits
            await asyncio.sleep(0.2)
            slow.delay = 0.0
            assert not (await agent.call_tool("list_cards", {})).is_error  # refreshes meanwhile
            await reread
            stored = json.loads(keyring.get_password("agentcard-broker", "mcp:oauth_tokens") or "{}")
            assert stored["refresh_token"] in up.provider.refresh_tokens  # the rotated one
            await asyncio.sleep(2.2)  # expired again: this refresh must use the rotated token
            assert not (await agent.call_tool("list_cards", {})).is_error
        assert up.recorder.grants["refresh_token"] == 2
        assert up.recorder.grants["authorization_code"] == 1  # never sent back to login
        async with b.request("GET", "/_broker/status") as r:
            assert (await r.json())["routes"][0]["state"] == "ready"
