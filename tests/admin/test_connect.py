"""broker/admin/connect.py: the connect page and the callback, as an end user's browser sees them.

The pages are served by the broker's own HTTP engine on 127.0.0.1 through the /_broker/
dispatch (`admin.api.handle`); the browser is a real aiohttp client; AgentCard is the sandbox
authorization server; the store a real SQLite file. Only fake values.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from broker.admin import api
from broker.auth.per_user import UserGrants
from broker.auth.secret_store import KeyringStore
from broker.errors import BrokerError, error_response
from broker.http.listener import AgentServer
from broker.http.server import Request, StreamResponse
from broker.scrub import SecretSet
from broker.store.sqlite import SqliteStore
from tests.auth.test_per_user import authorize_in_browser, per_user_config
from tests.mcp_upstream import McpUpstream, run_mcp_upstream
from tests.store.conftest import Clock

HOSTILE_LABEL = "<script>alert('x')</script>\"'><img src=x onerror=alert(1)>"


@dataclass
class Pages:
    up: McpUpstream
    grants: UserGrants
    store: SqliteStore
    clock: Clock
    base: str  # public_url: where the pages are served
    browser: aiohttp.ClientSession

    async def link(self, user: str = "alice", label: str | None = "alice@example.test") -> str:
        return await self.grants.connect_link("librechat", user, label)

    def post(self, url: str, connect_id: str | None = None, origin: str | None = "") -> Any:
        headers = {} if origin is None else {"Origin": origin or self.base}
        data = {"connect_id": url.rsplit("/", 1)[1] if connect_id is None else connect_id}
        return self.browser.post(url, data=data, headers=headers, allow_redirects=False)

    async def grants_stored(self) -> list[tuple[str, str, str]]:
        return [(i.client, i.user, i.state) for i in await self.store.list_grants()]


@pytest.fixture
async def pages(tmp_path: Path) -> AsyncIterator[Pages]:
    rt = SimpleNamespace(snapshot=SimpleNamespace(user_grants={}, config=None), state_store=None)

    async def handle(request: Request) -> StreamResponse:
        try:
            return await api.handle(request, rt)  # type: ignore[arg-type]
        except BrokerError as exc:
            return error_response(exc)

    server = AgentServer(handle, lambda: 32 * 1024)
    await server.listen_tcp("127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.addresses()[0][1]}"
    clock = Clock(time.time())
    async with run_mcp_upstream() as up:
        cfg, route = per_user_config(up, public_url=base)
        store = await SqliteStore.open(tmp_path / "state.sqlite3", KeyringStore(), clock=clock)
        grants = UserGrants(route, cfg, store, KeyringStore(), SecretSet())
        rt.snapshot = SimpleNamespace(user_grants={"mcp": grants}, config=cfg)
        rt.state_store = store
        async with aiohttp.ClientSession() as browser:
            yield Pages(up, grants, store, clock, base, browser)
        await grants.close()
        await store.close()
    await server.shutdown(0.1)


def assert_page_headers(r: aiohttp.ClientResponse) -> None:
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["Referrer-Policy"] == "no-referrer"
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "frame-ancestors 'none'" in csp


async def test_connect_then_callback_stores_that_users_grant(pages: Pages) -> None:
    up = pages.up
    link = await pages.link()
    assert link.startswith(f"{pages.base}/_broker/connect/")
    async with pages.browser.get(link) as r:
        assert r.status == 200
        assert_page_headers(r)
        page = await r.text()
    assert "librechat" in page and "alice@example.test" in page
    assert "Continue to AgentCard" in page
    assert f"action='{link}'" in page and "method='post'" in page
    assert await pages.grants_stored() == []

    async with pages.post(link) as r:
        assert r.status == 303, await r.text()
        assert_page_headers(r)
        authorize = r.headers["Location"]
    parts = urlsplit(authorize)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{up.base}/authorize"
    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert q["resource"] == up.mcp_url
    assert q["redirect_uri"] == f"{pages.base}/_broker/callback"
    assert q["scope"] == "cards" and q["state"]

    location = await authorize_in_browser(authorize)
    async with pages.browser.get(location) as r:
        assert r.status == 200
        assert_page_headers(r)
        done = await r.text()
    assert "Connected" in done and "Return to the chat" in done
    assert await pages.grants_stored() == [("librechat", "alice", "active")]
    assert up.recorder.grants["authorization_code"] == 1
    header = await pages.grants.credential("librechat", "alice", None).authorization()
    assert header["Authorization"].removeprefix("Bearer ") in up.provider.access_tokens
    for secret in (q["state"], callback_code(location), header["Authorization"][7:]):
        assert secret not in page + done

    # the callback again (the browser's back button, or a replay): refused, nothing changes
    async with pages.browser.get(location) as r:
        assert r.status == 400
        assert "already finished" in await r.text()
    assert up.recorder.grants["authorization_code"] == 1
    # and the link is used up
    async with pages.browser.get(link) as r:
        assert r.status == 410
    async with pages.post(link) as r:
        assert r.status == 410
    assert await pages.grants_stored() == [("librechat", "alice", "active")]


def callback_code(location: str) -> str:
    return parse_qs(urlsplit(location).query)["code"][0]


async def test_the_page_escapes_what_it_shows(pages: Pages) -> None:
    link = await pages.link(user='"><b>u</b>', label=HOSTILE_LABEL)
    async with pages.browser.get(link) as r:
        assert r.status == 200
        page = await r.text()
    assert "<script" not in page and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    no_label = await pages.link(user='"><b>u</b>', label=None)
    async with pages.browser.get(no_label) as r:
        page = await r.text()
    assert "<b>" not in page and "&quot;&gt;&lt;b&gt;u&lt;/b&gt;" in page


async def test_unknown_malformed_and_expired_links_show_an_error(pages: Pages) -> None:
    unknown = f"{pages.base}/_broker/connect/{'A' * 43}"
    async with pages.browser.get(unknown) as r:
        assert r.status == 410
        assert_page_headers(r)
        assert "no longer works" in await r.text()
    async with pages.post(unknown) as r:
        assert r.status == 410
    async with pages.browser.get(f"{pages.base}/_broker/connect/short") as r:
        assert r.status == 404
    link = await pages.link()
    pages.clock.now += 901
    async with pages.browser.get(link) as r:
        assert r.status == 410
    async with pages.post(link) as r:
        assert r.status == 410
    assert pages.up.recorder.calls[("GET", "/authorize")] == 0
    assert await pages.grants_stored() == []


async def test_the_form_is_only_accepted_from_the_page_itself(pages: Pages) -> None:
    link = await pages.link()
    for origin in (None, "https://evil.example.test", "null"):
        async with pages.post(link, origin=origin) as r:
            assert r.status == 403, origin
            assert_page_headers(r)
    async with pages.post(link, connect_id="B" * 43) as r:  # a form not from this page
        assert r.status == 400
    async with pages.browser.put(link, headers={"Origin": pages.base}) as r:
        assert r.status == 405
    # none of these used the link up
    async with pages.post(link) as r:
        assert r.status == 303
        assert r.headers["Location"].startswith(f"{pages.up.base}/authorize?")


async def test_forged_and_failed_callbacks_store_nothing(pages: Pages) -> None:
    up = pages.up
    up.provider.issuer = up.base  # the authorization response carries RFC 9207 `iss`
    async with pages.post(await pages.link()) as r:
        location = await authorize_in_browser(r.headers["Location"])
    q = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    callback = f"{pages.base}/_broker/callback"
    tag = q["state"].partition(".")[0]
    forged = [
        {"code": q["code"]},
        {"code": q["code"], "state": "FAKEstate"},
        {"code": q["code"], "state": f"{tag}.FAKEstate0123456789abcdefABCDEF0123456789abcd"},
        {"code": q["code"], "state": q["state"], "iss": "https://evil.example.test"},  # ends the state
        {"code": q["code"], "state": q["state"], "iss": q["iss"]},  # too late
    ]
    for params in forged:
        async with pages.browser.get(callback, params=params) as r:
            assert r.status == 400, params
            assert_page_headers(r)
            page = await r.text()
        assert "Sign-in failed" in page and q["code"] not in page
    assert up.recorder.grants["authorization_code"] == 0
    assert await pages.grants_stored() == []

    # the user declines at AgentCard: the error is shown (escaped) and the state ends
    async with pages.post(await pages.link()) as r:
        declined = await authorize_in_browser(r.headers["Location"])
    state = parse_qs(urlsplit(declined).query)["state"][0]
    params = {"error": "access_denied", "state": state, "iss": up.base}
    async with pages.browser.get(callback, params=params) as r:
        assert r.status == 400
        assert "AgentCard said: access_denied." in await r.text()
    async with pages.browser.get(declined) as r:
        assert r.status == 400
    hostile = {"error": "<script>x</script>", "state": "x"}
    async with pages.browser.get(callback, params=hostile) as r:
        assert r.status == 400
        assert "<script" not in await r.text()
    assert up.recorder.grants["authorization_code"] == 0
    assert await pages.grants_stored() == []


def test_connect_ids_are_what_connect_links_hold() -> None:
    from broker.admin.connect import CONNECT_ID

    assert CONNECT_ID.fullmatch("a" * 43)
    assert not re.fullmatch(CONNECT_ID, "oauth-state:" + "a" * 43)
