"""Issue 19's OAuth client against a real oidc-provider (tests/oidc/): dynamic registration
(once, `native`, reused by the next login), the issuer changing under a running broker, and
step-up to the union of scopes.

The route's upstream is a small aiohttp resource the test controls: its RFC 9728 metadata names
provider A or B, it accepts any bearer token, and answers 401 or a 403 `insufficient_scope`
when told to. The CLI is the real one as a subprocess (`login --no-browser`, pasted back).
127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import keyring
from aiohttp import web

from tests.conftest import BrokerFactory, write_config
from tests.e2e.conftest import free_port
from tests.e2e.test_login_anywhere import Cli
from tests.oidc_provider import (  # noqa: F401 - oidc_harness: the fixture needs_node asks for
    OidcProvider,
    authorize,
    needs_node,
    oidc_harness,
    run_oidc_provider,
)

pytestmark = needs_node

TOKENS = ("agentcard-broker", "mcp:oauth_tokens")
AUTH_URL = r"(http://\S+/auth\?\S+)"


class Resource:
    """The route's upstream: protected-resource metadata naming `issuer`; any bearer passes
    unless `status` (401 or 403) is set."""

    def __init__(self) -> None:
        self.base = ""
        self.issuer = ""
        self.status = 200
        self.scope = "cards:write"
        self.seen: list[str] = []  # the Authorization headers it got

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    async def prm(self, request: web.Request) -> web.Response:
        return web.json_response({"resource": self.url, "authorization_servers": [self.issuer]})

    async def mcp(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        self.seen.append(auth)
        meta = f"{self.base}/.well-known/oauth-protected-resource/mcp"
        if not auth.startswith("Bearer ") or self.status == 401:
            challenge = f'Bearer error="invalid_token", resource_metadata="{meta}"'
            return web.json_response(
                {"error": "invalid_token"}, status=401, headers={"WWW-Authenticate": challenge}
            )
        if self.status == 403:
            challenge = f'Bearer error="insufficient_scope", scope="{self.scope}", resource_metadata="{meta}"'
            return web.json_response(
                {"error": "insufficient_scope"}, status=403, headers={"WWW-Authenticate": challenge}
            )
        return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def resource() -> AsyncIterator[Resource]:
    res = Resource()
    app = web.Application()
    app.router.add_get("/.well-known/oauth-protected-resource/mcp", res.prm)
    app.router.add_get("/.well-known/oauth-protected-resource", res.prm)
    app.router.add_route("*", "/mcp", res.mcp)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    res.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield res
    finally:
        await runner.cleanup()


def route_doc(res: Resource, scopes: list[str]) -> dict[str, Any]:
    return {
        "listen": [f"127.0.0.1:{free_port()}"],
        "allow_insecure_upstream": True,
        "log": {"level": "debug", "format": "json"},
        "timeouts": {"drain": 1},
        "routes": [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": res.url,
                "auth": {"type": "oauth", "scopes": scopes, "redirect_port": free_port()},
            }
        ],
    }


async def paste_login(cfg: Path) -> tuple[str, str]:
    """One `login mcp --no-browser`, the redirected URL pasted back: the authorization URL it
    printed and its output."""
    async with Cli(cfg, "--no-browser") as lg:
        url = (await lg.line_matching(AUTH_URL))[1]
        await lg.paste(await authorize(url))
        rc, out, err = await lg.finish()
    assert rc == 0, err
    return url, out


def registrations(op: OidcProvider) -> list[dict[str, Any]]:
    return [e for e in op.events if e["event"] == "registration"]


async def route_status(b: Any) -> dict[str, Any]:
    async with b.request("GET", "/_broker/status") as r:
        return dict((await r.json())["routes"][0])


async def test_login_registers_once_as_native_and_the_next_login_reuses_it(tmp_path: Path) -> None:
    async with resource() as res, run_oidc_provider(resource=res.url) as op:
        res.issuer = op.issuer
        cfg = write_config(tmp_path / "c.yaml", route_doc(res, ["cards"]))
        _, out = await paste_login(cfg)
        assert "logged in route 'mcp' at " + op.issuer in out
        [reg] = registrations(op)
        assert reg["application_type"] == "native" and reg["status"] == 201, reg
        _, out = await paste_login(cfg)  # a new broker command: the registration is read back
        assert "logged in route 'mcp' at " + op.issuer in out
    assert len(registrations(op)) == 1  # exactly one registration seen by the provider
    codes = op.token_requests("authorization_code")
    assert [c["client_id"] for c in codes] == [reg["client_id"]] * 2
    assert all(c["status"] == 200 for c in codes)


async def test_an_issuer_change_turns_the_route_to_needs_login_without_a_refresh_at_the_new_one(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    async with (
        resource() as res,
        run_oidc_provider(resource=res.url) as a,
        run_oidc_provider(resource=res.url) as b,
    ):
        res.issuer = a.issuer
        doc = route_doc(res, ["cards"])
        await paste_login(write_config(tmp_path / "login.yaml", doc))
        stored = json.loads(keyring.get_password(*TOKENS) or "{}")
        assert stored["refresh_token"] and stored["issuer"].rstrip("/") == a.issuer
        broker = await make_broker(doc)
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 200, await r.text()
        assert res.seen[-1] == f"Bearer {stored['access_token']}"

        res.issuer, res.status = b.issuer, 401  # the metadata now names B; the token is refused
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 503, await r.text()
            body = await r.json()
        assert body["error"]["code"] == "needs_login"
        status = await route_status(broker)
        assert status["state"] == "needs_login"
        assert status["reason"] == (
            f"the authorization server changed from {a.issuer} to {b.issuer}: log in again; "
            "run: agentcard-broker login mcp"
        )
        assert b.token_requests("refresh_token") == [] and b.token_requests() == []
        assert a.token_requests("refresh_token") == []  # the old grant is not used either
        assert registrations(b) == []


@contextlib.asynccontextmanager
async def stepped_up(
    make_broker: BrokerFactory, tmp_path: Path
) -> AsyncIterator[tuple[OidcProvider, Path, Any]]:
    """Logged in for `cards`, a broker running, and the upstream's 403 insufficient_scope for
    `cards:write` seen through it: the route needs a login, nothing was refreshed."""
    async with (
        resource() as res,
        run_oidc_provider(resource=res.url, scopes=["cards", "cards:write", "read"]) as op,
    ):
        res.issuer = op.issuer
        doc = route_doc(res, ["cards"])
        cfg = write_config(tmp_path / "login.yaml", doc)
        url, _ = await paste_login(cfg)
        assert parse_qs(urlsplit(url).query)["scope"] == ["cards"]
        broker = await make_broker(doc)
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 200, await r.text()

        res.status = 403  # insufficient_scope, scope="cards:write"
        for _ in range(2):
            async with broker.request("GET", "/mcp") as r:
                assert r.status == 503, await r.text()
                body = await r.json()
            assert body["error"]["code"] == "needs_login"
        status = await route_status(broker)
        assert status["state"] == "needs_login"
        assert "more scope (cards:write)" in status["reason"]
        assert op.token_requests("refresh_token") == []  # no refresh in between (nor a loop)
        res.status = 200
        yield op, cfg, broker
        assert op.token_requests("refresh_token") == []


async def test_step_up_needs_a_login_that_asks_for_the_union_of_scopes(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    async with stepped_up(make_broker, tmp_path) as (_, cfg, _), Cli(cfg, "--no-browser") as lg:
        url = (await lg.line_matching(AUTH_URL))[1]
        assert parse_qs(urlsplit(url).query)["scope"] == ["cards cards:write"]  # the union


async def test_step_up_login_is_granted_the_union_of_scopes(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    async with stepped_up(make_broker, tmp_path) as (op, cfg, broker):
        url, _ = await paste_login(cfg)
        assert parse_qs(urlsplit(url).query)["scope"] == ["cards cards:write"]
        stored = json.loads(keyring.get_password(*TOKENS) or "{}")
        assert set(stored["scope"].split()) >= {"cards", "cards:write"}, stored.get("scope")
        async with broker.request("POST", "/_broker/reload") as r:
            assert r.status == 200
        async with broker.request("GET", "/mcp") as r:
            assert r.status == 200, await r.text()
        assert [c["status"] for c in op.token_requests("authorization_code")] == [200, 200]
