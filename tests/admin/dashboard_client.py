"""A test's way into the dashboard as its owner: the admin key, the one-time link, the session
cookie and the CSRF token, over plain HTTP (aiohttp) to the in-process daemon."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from broker.admin import access
from tests.conftest import Broker


@dataclass
class Owner:
    broker: Broker
    cookie: str
    csrf: str

    @property
    def host(self) -> str:
        return f"localhost:{self.broker.port}"

    def headers(self, csrf: bool = True, **more: str) -> dict[str, str]:
        h = {"Host": self.host, "Cookie": f"acb_session={self.cookie}", "Origin": f"http://{self.host}"}
        if csrf:
            h["X-CSRF-Token"] = self.csrf
        return h | more

    async def post(self, path: str, body: Any = None, **headers: str) -> tuple[int, dict[str, Any]]:
        async with self.broker.request(
            "POST", "/_broker/ui" + path, json=body or {}, headers=self.headers(**headers)
        ) as r:
            return r.status, await r.json()

    async def state(self) -> dict[str, Any]:
        async with self.broker.request("GET", "/_broker/ui/api/state", headers=self.headers()) as r:
            assert r.status == 200, await r.text()
            doc: dict[str, Any] = await r.json()
            return doc


async def link(b: Broker, key: str | None = None) -> tuple[int, dict[str, Any]]:
    """POST /_broker/ui/link as `agentcard-broker dashboard` does (the admin key by default)."""
    key = key if key is not None else access.read_key(b.daemon.rt.snapshot.config.state_path())
    headers = {access.HEADER: key} if key is not None else {}
    async with b.request("POST", "/_broker/ui/link", headers=headers) as r:
        return r.status, await r.json()


def login_path(url: str) -> str:
    return "/" + url.split("/", 3)[3]


async def open_link(b: Broker, url: str) -> tuple[int, str | None]:
    """Follow the link as the browser would: (status, the acb_session cookie it set)."""
    async with b.request(
        "GET", login_path(url), headers={"Host": f"localhost:{b.port}"}, allow_redirects=False
    ) as r:
        cookie = r.headers.get("Set-Cookie")
        m = re.match(r"acb_session=([^;]+)", cookie or "")
        return r.status, m.group(1) if m else None


async def owner(b: Broker) -> Owner:
    status, doc = await link(b)
    assert status == 200, doc
    status, cookie = await open_link(b, doc["url"])
    assert status == 303 and cookie
    async with b.request(
        "GET", "/_broker/ui/", headers={"Host": f"localhost:{b.port}", "Cookie": f"acb_session={cookie}"}
    ) as r:
        page = await r.text()
    m = re.search(r'<meta name="csrf-token" content="([^"]+)"', page)
    assert m, page
    return Owner(b, cookie, m.group(1))
