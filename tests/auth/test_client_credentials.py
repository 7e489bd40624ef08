"""The client_credentials credential (AgentCard v2 platform tokens) against a real token server."""

from __future__ import annotations

import asyncio
import secrets
import time

import keyring
from aiohttp import web

from tests.conftest import BrokerFactory, Upstream, api_config, assert_no_secret

CLIENT_SECRET = "acs_FAKEclientSecret0123456789abcdef"


def v2(upstream: Upstream, lifetime: int = 3600) -> dict[str, object]:
    minted: dict[str, float] = {}
    upstream.handlers["/api/v2/oauth/token"] = _token_handler(minted, lifetime)
    upstream.handlers["/api/v2/cards"] = _cards_handler(minted)
    return minted


def _token_handler(minted: dict[str, float], lifetime: int):  # type: ignore[no-untyped-def]
    async def token(request: web.Request) -> web.Response:
        form = dict(await request.post())
        if form.get("grant_type") != "client_credentials" or form.get("client_secret") != CLIENT_SECRET:
            return web.json_response({"error": "invalid_client"}, status=401)
        await asyncio.sleep(0.05)  # slow enough for concurrent requests to pile up behind one mint
        tok = "pt_" + secrets.token_urlsafe(16)
        minted[tok] = time.time() + lifetime
        return web.json_response({"access_token": tok, "token_type": "Bearer", "expires_in": lifetime})

    return token


def _cards_handler(minted: dict[str, float]):  # type: ignore[no-untyped-def]
    async def cards(request: web.Request) -> web.Response:
        tok = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if minted.get(tok, 0) < time.time():
            return web.json_response(
                {"error": "invalid token"}, status=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return web.json_response({"cards": [], "token_used": tok})

    return cards


def cc_config(upstream: Upstream) -> dict[str, object]:
    return api_config(
        upstream.url,
        routes=[
            {
                "name": "platform",
                "prefix": "/api/v2",
                "upstream": upstream.url + "/api/v2",
                "auth": {
                    "type": "client_credentials",
                    "token_url": upstream.url + "/api/v2/oauth/token",
                    "client_id": "test_client_1",
                    "client_secret": "keyring",
                },
            }
        ],
    )


async def test_one_mint_for_many_requests_and_no_token_in_responses(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    minted = v2(upstream)
    upstream.streaming.add("/api/v2/oauth/token")  # its handler reads the form body itself
    keyring.set_password("agentcard-broker", "platform:client_secret", CLIENT_SECRET)
    b = await make_broker(cc_config(upstream))

    async def one() -> tuple[int, bytes]:
        async with b.request("GET", "/api/v2/cards") as r:
            return r.status, await r.read()

    results = await asyncio.gather(*(one() for _ in range(20)))
    assert [s for s, _ in results] == [200] * 20
    assert len(minted) == 1  # one mint for twenty concurrent requests
    for _, body in results:
        assert_no_secret(body, secrets=(CLIENT_SECRET, *minted))
    assert_no_secret(b.logs, secrets=(CLIENT_SECRET, *minted))
    async with b.request("GET", "/_broker/status") as r:
        route = (await r.json())["routes"][0]
    assert route["state"] == "ready"
    assert route["expires_at"] is not None


async def test_mints_again_after_expiry_and_after_a_401(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    minted = v2(upstream, lifetime=1)
    upstream.streaming.add("/api/v2/oauth/token")
    keyring.set_password("agentcard-broker", "platform:client_secret", CLIENT_SECRET)
    b = await make_broker(cc_config(upstream))
    async with b.request("GET", "/api/v2/cards") as r:
        assert r.status == 200
    await asyncio.sleep(1.1)
    async with b.request("GET", "/api/v2/cards") as r:
        assert r.status == 200
    assert len(minted) == 2  # expired: minted again before use
    # the upstream revokes the token early: one 401 -> one mint -> one retry
    for tok in minted:
        minted[tok] = 0
    b.daemon.rt.credentials["platform"]._expires_at = time.time() + 100  # type: ignore[attr-defined]
    async with b.request("POST", "/api/v2/cards", json={"x": 1}) as r:
        assert r.status == 200
        assert "WWW-Authenticate" not in r.headers
    assert len(minted) == 3


async def test_missing_or_refused_secret(make_broker: BrokerFactory, upstream: Upstream) -> None:
    v2(upstream)
    upstream.streaming.add("/api/v2/oauth/token")
    b = await make_broker(cc_config(upstream))
    async with b.request("GET", "/api/v2/cards") as r:
        assert r.status == 503
        doc = await r.json()
    assert doc["error"]["code"] == "no_credential"
    assert "agentcard-broker set-key platform" in doc["error"]["message"]
    keyring.set_password("agentcard-broker", "platform:client_secret", "acs_FAKEwrongSecret000000000000")
    b.daemon.rt.credentials["platform"].invalidate()
    async with b.request("GET", "/api/v2/cards") as r:
        assert r.status == 503
        assert (await r.json())["error"]["code"] == "credential_rejected"
