"""Issuer binding and step-up (issue 19) against two real authorization servers.

Two MCP SDK authorization servers (the broker's sandbox provider, each on its own 127.0.0.1
port) and one protected resource whose RFC 9728 metadata names one of them, switched by the
test. The resource checks a bearer token against the authorization server it names now, and
asks for more scope with a 403 `insufficient_scope` challenge when told to.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import keyring
from aiohttp import web

from broker import config as config_mod
from broker.auth.platform_clients import add_client
from tests.conftest import BrokerFactory, write_config
from tests.e2e.conftest import free_port
from tests.e2e.test_oauth_mcp import Login, browser, login, mcp_config
from tests.e2e.test_per_user import LIST, Platform, browser_connect, connect_url_of, per_user_doc
from tests.mcp_upstream import McpUpstream, run_mcp_upstream


class Resource:
    """A protected resource at `url`, guarded by `servers[current]`."""

    def __init__(self, servers: list[McpUpstream]) -> None:
        self.servers = servers
        self.current = 0
        self.base = ""
        self.required_scope: str | None = None  # when set: a 403 insufficient_scope without it
        self.challenge = ""  # the WWW-Authenticate of that 403 (default: built from required_scope)

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    @property
    def issuer(self) -> str:
        return self.servers[self.current].base

    async def prm(self, request: web.Request) -> web.Response:
        return web.json_response({"resource": self.url, "authorization_servers": [self.issuer]})

    async def mcp(self, request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        at = await self.servers[self.current].provider.load_access_token(token)
        if at is None:
            meta = f"{self.base}/.well-known/oauth-protected-resource/mcp"
            return web.json_response(
                {"error": "invalid_token"},
                status=401,
                headers={"WWW-Authenticate": f'Bearer error="invalid_token", resource_metadata="{meta}"'},
            )
        if self.required_scope and self.required_scope not in at.scopes:
            challenge = self.challenge or (
                f'Bearer error="insufficient_scope", scope="{self.required_scope}", '
                'error_description="more scope, please"'
            )
            return web.json_response(
                {"error": "insufficient_scope"}, status=403, headers={"WWW-Authenticate": challenge}
            )
        return web.json_response({"ok": True, "scopes": at.scopes, "issuer": self.issuer})


@contextlib.asynccontextmanager
async def two_servers() -> AsyncIterator[Resource]:
    async with run_mcp_upstream() as a, run_mcp_upstream() as b:
        res = Resource([a, b])
        app = web.Application()
        app.router.add_get("/.well-known/oauth-protected-resource/mcp", res.prm)
        app.router.add_route("*", "/mcp", res.mcp)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        res.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        for up in (a, b):
            up.provider.expected_resource = res.url
        try:
            yield res
        finally:
            await runner.cleanup()


def route_config(res: Resource, scopes: list[str]) -> dict[str, Any]:
    doc = mcp_config(res.servers[0])
    doc["routes"][0]["upstream"] = res.url
    doc["routes"][0]["auth"]["scopes"] = scopes
    return doc


async def route_status(b: Any) -> dict[str, Any]:
    async with b.request("GET", "/_broker/status") as r:
        return dict((await r.json())["routes"][0])


async def test_a_grant_of_the_former_authorization_server_is_not_used(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    async with two_servers() as res:
        a, b = res.servers
        doc = route_config(res, ["cards"])
        cfg = write_config(tmp_path / "login.yaml", doc)
        rc, _, err = await login(cfg)
        assert rc == 0, err
        stored = json.loads(keyring.get_password("agentcard-broker", "mcp:oauth_tokens") or "{}")
        assert stored["issuer"].rstrip("/") == a.base  # the grant is bound to its issuer
        broker = await make_broker(doc)
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["issuer"] == a.base

        res.current = 1  # the resource now names another authorization server
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 503
            body = await r.json()
        assert body["error"]["code"] == "needs_login"
        assert "the authorization server changed from" in body["error"]["message"]
        assert "run: agentcard-broker login mcp" in body["error"]["message"]
        status = await route_status(broker)
        assert status["state"] == "needs_login"
        assert status["reason"] == (
            f"the authorization server changed from {a.base} to {b.base}: log in again; "
            "run: agentcard-broker login mcp"
        )
        # the old grant went to neither server: no refresh at the old one, nothing at the new one
        assert a.recorder.grants["refresh_token"] == 0
        assert not b.recorder.token_requests
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 503  # and stays unused

        rc, _, err = await login(cfg)  # logs in at the new server (registering there)
        assert rc == 0, err
        assert b.recorder.calls[("POST", "/register")] == 1
        async with broker.request("POST", "/_broker/reload") as r:
            assert r.status == 200
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["issuer"] == b.base
        assert (await route_status(broker))["state"] == "ready"


async def test_a_401_under_the_same_authorization_server_refreshes_and_keeps_the_grant(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """A 401 while the metadata names the same server: an ordinary refresh, the grant kept."""
    async with two_servers() as res:
        a, _ = res.servers
        doc = route_config(res, ["cards"])
        rc, _, err = await login(write_config(tmp_path / "login.yaml", doc))
        assert rc == 0, err
        broker = await make_broker(doc)
        a.provider.access_tokens.clear()  # the access token is refused; the refresh token works
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 200, await r.text()
        assert a.recorder.grants["refresh_token"] == 1
        assert (await route_status(broker))["state"] == "ready"


async def test_step_up_turns_the_route_to_a_login_for_the_union_of_scopes(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    async with two_servers() as res:
        a, _ = res.servers
        doc = route_config(res, [])  # the login asks for no scope: the token has none
        cfg = write_config(tmp_path / "login.yaml", doc)
        rc, _, err = await login(cfg)
        assert rc == 0, err
        broker = await make_broker(doc)
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["scopes"] == []

        res.required_scope = "cards"  # the upstream now asks for more scope
        for _ in range(3):
            async with broker.request("GET", "/mcp") as r:
                assert r.status == 503, await r.text()
                body = await r.json()
            assert body["error"]["code"] == "needs_login"
            assert "run: agentcard-broker login mcp" in body["error"]["message"]
        assert "the upstream asks for more scope (cards)" in body["error"]["message"]
        status = await route_status(broker)
        assert status["state"] == "needs_login"
        assert "more scope (cards): log in again for cards" in status["reason"]
        assert a.recorder.grants["refresh_token"] == 0  # no refresh in between (nor a loop)
        stored = json.loads(keyring.get_password("agentcard-broker", "mcp:oauth_tokens") or "{}")
        assert stored["wanted_scope"] == "cards"

        lg = Login(cfg)
        url = await lg.start()
        assert parse_qs(urlsplit(url).query)["scope"] == ["cards"]  # the union is asked for
        status_code, page = await browser(url)
        assert status_code == 200, page
        rc, _, err = await lg.finish()
        assert rc == 0, err
        async with broker.request("POST", "/_broker/reload") as r:
            assert r.status == 200
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["scopes"] == ["cards"]
        assert a.recorder.grants["refresh_token"] == 0


async def test_a_403_without_insufficient_scope_passes_through(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    async with two_servers() as res:
        doc = route_config(res, [])
        rc, _, err = await login(write_config(tmp_path / "login.yaml", doc))
        assert rc == 0, err
        broker = await make_broker(doc)
        res.required_scope = "cards"
        res.challenge = 'Bearer error="invalid_request", scope="cards"'  # a 403, but no step-up
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 403
            assert "WWW-Authenticate" not in r.headers
        assert (await route_status(broker))["state"] == "ready"


async def test_per_user_step_up_through_the_broker_gives_that_user_a_connect_link(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """A per-user route: the 403 insufficient_scope reaches the agent as needs_connect with the
    user's link (URL elicitation), the grant is not refreshed, and the link's sign-in asks for
    the union of scopes."""
    async with two_servers() as res:
        a, _ = res.servers
        port = free_port()
        doc = per_user_doc(a, port, tmp_path / "state")
        doc["routes"][0]["upstream"] = res.url
        cfg = config_mod.load(write_config(tmp_path / "clients.yaml", doc))
        lines = await asyncio.to_thread(add_client, cfg, "librechat")
        token = next(line.text for line in lines if not line.to_stderr)
        b = await make_broker(doc)
        up = _ResourceUpstream(a, res.url)
        p = Platform(b, up, token, f"http://127.0.0.1:{port}", tmp_path / "state")  # type: ignore[arg-type]
        status, page, _ = await browser_connect(p, await connect_url_of(p, "alice"))
        assert status == 200, page
        status, _, body = await p.post(LIST, headers=p.headers("alice"))
        assert status == 200 and body["ok"], body

        res.required_scope = "cards:write"
        status, headers, body = await p.post(LIST, headers=p.headers("alice"))
        assert status == 403 and headers["X-Broker-Error"] == "needs_connect", body
        message = body["error"]["message"]
        assert (
            "the upstream asks for more scope (cards:write): connect again for cards cards:write" in message
        )
        link = body["error"]["data"]["elicitations"][0]["url"]
        assert link in message
        assert a.recorder.grants["refresh_token"] == 0
        async with aiohttp.ClientSession() as s:  # the link's page, then its form: the union asked
            async with s.get(
                link, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
            ) as r:
                page = await r.text()
            connect_id = html.unescape(re.search(r"name='connect_id' value='([^']+)'", page)[1])  # type: ignore[index]
            action = html.unescape(re.search(r"<form method='post' action='([^']+)'", page)[1])  # type: ignore[index]
            async with s.post(
                action,
                data={"connect_id": connect_id},
                headers={
                    "Origin": p.public_url,
                    "Sec-Fetch-Site": "same-origin",
                    "Sec-Fetch-Mode": "navigate",
                },
                allow_redirects=False,
            ) as r:
                assert r.status == 303, await r.text()
                authorize = r.headers["Location"]
        assert parse_qs(urlsplit(authorize).query)["scope"] == ["cards cards:write"]


@dataclass
class _ResourceUpstream:
    """What browser_connect needs of an upstream: the authorization server's base, the resource."""

    server: McpUpstream
    mcp_url: str

    @property
    def base(self) -> str:
        return self.server.base
