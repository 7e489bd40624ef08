"""A real oidc-provider authorization server (tests/oidc/server.js under node) for tests.

`run_oidc_provider(**knobs)` starts it on a free 127.0.0.1 port, waits until its OpenID and
OAuth metadata answer, yields an `OidcProvider` (issuer, the MCP resource URL, what the token
endpoint saw) and stops it. `authorize()` and `approve_device()` are the user's browser: an
HTTP client that follows the auto-approving interaction. Knobs: tests/oidc/README.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import aiohttp
import pytest

HARNESS = Path(__file__).parent / "oidc"


def ensure_harness() -> None:
    """node, and tests/oidc/node_modules installed from its lock file (`npm ci`, once): the
    README's test command works on a machine that has node and npm without `.ci/run`. No skip:
    a machine without node fails here, saying what to install."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the oidc-provider tests (apt install nodejs npm)")
    if (HARNESS / "node_modules" / "oidc-provider").is_dir():
        return
    done = subprocess.run(
        ["npm", "ci", "--prefix", str(HARNESS), "--silent", "--no-audit", "--no-fund"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        pytest.fail(f"npm ci --prefix tests/oidc failed:\n{done.stderr[-2000:]}")


@pytest.fixture
def oidc_harness() -> None:
    ensure_harness()


needs_node = pytest.mark.usefixtures("oidc_harness")


@dataclass
class OidcProvider:
    issuer: str
    resource: str  # the MCP upstream URL its protected-resource metadata names
    events: list[dict[str, Any]] = field(default_factory=list)

    def token_requests(self, grant_type: str | None = None) -> list[dict[str, Any]]:
        """Each token request's grant_type, resource, scope, status and error, in order."""
        return [
            e
            for e in self.events
            if e["event"] == "token" and (grant_type is None or e["grant_type"].endswith(grant_type))
        ]


def cookie_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))  # cookies on 127.0.0.1


async def authorize(url: str, stop_at: str = "http://127.0.0.1:") -> str:
    """Open the authorization URL and follow the redirects through the auto-approving
    interaction; return the Location that leads to `stop_at` (the loopback callback), unloaded."""
    async with cookie_session() as s:
        for _ in range(10):
            async with s.get(url, allow_redirects=False) as r:
                assert r.status in (302, 303), (r.status, await r.text())
                url = urljoin(url, r.headers["Location"])
            if url.startswith(stop_at) and "/callback" in url:
                return url
    raise AssertionError("too many redirects")


async def approve_device(verification_uri_complete: str, *, deny: bool = False) -> str:
    """Confirm (or abort) a device code at the verification page, as the user would; the page
    the server ends on."""
    async with cookie_session() as s:
        async with s.get(verification_uri_complete) as r:
            page = await r.text()
        xsrf = re.search(r'name="xsrf" value="([^"]+)"', page)
        code = re.search(r'name="user_code" value="([^"]+)"', page)
        assert xsrf and code, page
        form = {"xsrf": xsrf[1], "user_code": code[1], ("abort" if deny else "confirm"): "yes"}
        action = urljoin(verification_uri_complete, "/device")
        async with s.post(action, data=form) as r:
            return await r.text()


async def _pump(stdout: asyncio.StreamReader, events: list[dict[str, Any]]) -> None:
    while line := await stdout.readline():
        with contextlib.suppress(ValueError):
            doc = json.loads(line)
            if isinstance(doc, dict) and "event" in doc:
                events.append(doc)


@contextlib.asynccontextmanager
async def run_oidc_provider(**knobs: Any) -> AsyncIterator[OidcProvider]:
    proc = await asyncio.create_subprocess_exec(
        "node", str(HARNESS / "server.js"), "0",
        cwd=HARNESS, env={"PATH": os.environ["PATH"], "OIDC_CONFIG": json.dumps(knobs)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 15))
        op = OidcProvider(ready["issuer"], ready["resource"])
        pump = asyncio.create_task(_pump(proc.stdout, op.events))
        async with aiohttp.ClientSession() as s:
            for path in ("openid-configuration", "oauth-authorization-server"):
                async with s.get(f"{op.issuer}/.well-known/{path}") as r:
                    assert r.status == 200, path
        yield op
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
        with contextlib.suppress(NameError):
            await pump
