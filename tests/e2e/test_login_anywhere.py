"""Login from a machine without a browser, against a real oidc-provider (tests/oidc/).

`login --no-browser` with the redirected URL pasted on standard input (the browser on another
machine could not load the loopback callback), and `login --device` (RFC 8628), each the real
CLI as a subprocess; the user's browser is an HTTP client following the auto-approving
interaction. 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import keyring
import pytest

from tests.conftest import assert_no_secret, write_config
from tests.e2e.conftest import CLI, free_port
from tests.oidc_provider import (  # noqa: F401 - oidc_harness: the fixture needs_node asks for
    OidcProvider,
    approve_device,
    authorize,
    needs_node,
    oidc_harness,
    run_oidc_provider,
)

pytestmark = needs_node

TOKENS = ("agentcard-broker", "mcp:oauth_tokens")


def config(tmp_path: Path, op: OidcProvider) -> Path:
    doc: dict[str, Any] = {
        "allow_insecure_upstream": True,
        "routes": [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": op.resource,
                "auth": {"type": "oauth", "scopes": ["cards"], "redirect_port": free_port()},
            }
        ],
    }
    return write_config(tmp_path / "c.yaml", doc)


class Cli:
    """`agentcard-broker login mcp ARGS` with stdin piped; its output line by line."""

    def __init__(self, cfg: Path, *args: str) -> None:
        self.cfg, self.args = cfg, args
        self.out: list[str] = []

    async def __aenter__(self) -> Cli:
        self.proc = await asyncio.create_subprocess_exec(
            *CLI, "login", "mcp", "--config", str(self.cfg), *self.args, "--timeout", "20",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def line_matching(self, pattern: str) -> re.Match[str]:
        assert self.proc.stdout
        while line := await asyncio.wait_for(self.proc.stdout.readline(), 30):
            self.out.append(line.decode().rstrip())
            if m := re.search(pattern, self.out[-1]):
                return m
        raise AssertionError(f"{pattern!r} never printed: {self.out}")

    async def paste(self, text: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def finish(self) -> tuple[int, str, str]:
        out, err = await asyncio.wait_for(self.proc.communicate(), 60)
        return self.proc.returncode or 0, "\n".join(self.out) + "\n" + out.decode(), err.decode()


@pytest.fixture
async def op() -> AsyncIterator[OidcProvider]:
    async with run_oidc_provider(deviceInterval=1) as op:
        yield op


# ---------------------------------------------------------------- --no-browser, pasted back


async def test_pasted_redirect_logs_in(op: OidcProvider, tmp_path: Path) -> None:
    async with Cli(config(tmp_path, op), "--no-browser") as lg:
        url = (await lg.line_matching(r"(http://\S+/auth\?\S+)"))[1]
        landed = await authorize(url)  # where the remote browser would land (and fail to load)
        q = parse_qs(urlsplit(landed).query)
        assert q["iss"] == [op.issuer] and "code" in q  # RFC 9207 from a real server
        await lg.line_matching("paste its whole address here")
        await lg.paste("not a url at all")
        await lg.paste(landed)
        rc, out, err = await lg.finish()
    assert rc == 0, err
    assert "that is not the redirected address" in out
    assert "logged in route 'mcp' at " + op.issuer in out
    assert "refresh token: yes" in out
    assert_no_secret(out, err, secrets=(q["code"][0],))  # the pasted code is never echoed
    stored = json.loads(keyring.get_password(*TOKENS) or "{}")
    assert stored["access_token"] and stored["refresh_token"]
    [code] = op.token_requests("authorization_code")
    assert code["status"] == 200 and code["resource"] == op.resource


async def test_pasted_redirect_with_a_wrong_state_is_refused(op: OidcProvider, tmp_path: Path) -> None:
    async with Cli(config(tmp_path, op), "--no-browser") as lg:
        url = (await lg.line_matching(r"(http://\S+/auth\?\S+)"))[1]
        landed = await authorize(url)
        forged = re.sub(r"state=[^&]+", "state=someone-elses", landed)
        await lg.paste(forged)
        rc, _, err = await lg.finish()
    assert rc == 1
    assert "login failed: the pasted URL is not from this login (state does not match); refused" in err
    assert keyring.get_password(*TOKENS) is None
    assert op.token_requests() == []  # the code was never exchanged


async def test_pasted_error_is_reported(tmp_path: Path) -> None:
    async with run_oidc_provider(denyConsent=True) as op, Cli(config(tmp_path, op), "--no-browser") as lg:
        url = (await lg.line_matching(r"(http://\S+/auth\?\S+)"))[1]
        await lg.paste(await authorize(url))
        rc, _, err = await lg.finish()
    assert rc == 1 and "the authorization server said access_denied" in err
    assert keyring.get_password(*TOKENS) is None


# ---------------------------------------------------------------- --device (RFC 8628)


async def test_device_login_polls_slows_down_and_stores_tokens(tmp_path: Path) -> None:
    async with (
        run_oidc_provider(deviceInterval=1, slowDownOnce=2) as op,
        Cli(config(tmp_path, op), "--device") as lg,
    ):
        code = (await lg.line_matching(r"^\s+(\S+)$"))[1]
        complete = (await lg.line_matching(r"or open (\S+) ,"))[1]
        assert code in complete
        # the user approves only after the broker polled and heard "pending" (and "slow down")
        for _ in range(300):
            if len(op.token_requests("device_code")) >= 2:
                break
            await asyncio.sleep(0.1)
        await approve_device(complete)
        rc, out, err = await lg.finish()
    assert rc == 0, err
    polls = op.token_requests("device_code")
    assert [p["error"] for p in polls] == ["authorization_pending", "slow_down", None]
    assert polls[-1]["status"] == 200 and all(p["resource"] == op.resource for p in polls)
    assert "checking every 1s" in out and "asked to slow down; checking every 6s" in out
    assert polls[2]["t"] - polls[1]["t"] >= 5.5  # the interval grew by 5 s after slow_down
    assert "logged in route 'mcp' at " + op.issuer in out
    stored = json.loads(keyring.get_password(*TOKENS) or "{}")
    assert stored["access_token"] and stored["refresh_token"]
    assert next(e for e in op.events if e["event"] == "device_authorization")["resource"] == op.resource


async def test_device_login_denied_ends_with_a_clear_message(op: OidcProvider, tmp_path: Path) -> None:
    async with Cli(config(tmp_path, op), "--device") as lg:
        complete = (await lg.line_matching(r"or open (\S+) ,"))[1]
        await approve_device(complete, deny=True)
        rc, _, err = await lg.finish()
    assert rc == 1
    assert "login failed: the login was denied at the authorization server (access_denied)" in err
    assert keyring.get_password(*TOKENS) is None


async def test_device_login_without_the_endpoint_names_no_browser(tmp_path: Path) -> None:
    async with run_oidc_provider(deviceFlow=False) as op, Cli(config(tmp_path, op), "--device") as lg:
        rc, _, err = await lg.finish()
    assert rc == 1
    assert "offers no device authorization (RFC 8628); use: agentcard-broker login mcp --no-browser" in err


async def test_pasted_redirect_from_another_issuer_is_refused(op: OidcProvider, tmp_path: Path) -> None:
    async with Cli(config(tmp_path, op), "--no-browser") as lg:
        url = (await lg.line_matching(r"(http://\S+/auth\?\S+)"))[1]
        landed = await authorize(url)
        await lg.paste(re.sub(r"iss=[^&]+", "iss=https%3A%2F%2Fevil.example", landed))
        rc, _, err = await lg.finish()
    assert rc == 1 and "wrong issuer (iss mismatch); refused" in err
    assert keyring.get_password(*TOKENS) is None and op.token_requests() == []


async def test_device_login_after_a_browser_login_registers_with_the_device_grant(
    op: OidcProvider, tmp_path: Path
) -> None:
    cfg = config(tmp_path, op)
    async with Cli(cfg, "--no-browser") as lg:
        url = (await lg.line_matching(r"(http://\S+/auth\?\S+)"))[1]
        await lg.paste(await authorize(url))
        assert (await lg.finish())[0] == 0
    first = op.token_requests("authorization_code")[0]["client_id"]
    async with Cli(cfg, "--device") as lg:
        complete = (await lg.line_matching(r"or open (\S+) ,"))[1]
        await approve_device(complete)
        rc, out, err = await lg.finish()
    assert rc == 0, err
    assert "registration does not allow the device grant; registering again" in out
    assert op.token_requests("device_code")[-1]["client_id"] != first
    # the harness: a refresh names the resource and rotates the refresh token
    stored = json.loads(keyring.get_password(*TOKENS) or "{}")
    client = json.loads(keyring.get_password("agentcard-broker", "mcp:oauth_client") or "{}")
    async with aiohttp.ClientSession() as s:
        form = {"grant_type": "refresh_token", "refresh_token": stored["refresh_token"],
                "client_id": client["client_id"], "resource": op.resource}  # fmt: skip
        async with s.post(client["token_endpoint"], data=form) as r:
            assert r.status == 200 and (await r.json())["refresh_token"] != stored["refresh_token"]
    [refresh] = op.token_requests("refresh_token")
    assert refresh["resource"] == op.resource and refresh["status"] == 200
