"""The sandbox (a local AgentCard stand-in) and the demo that uses it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import socket
import sys
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from yarl import URL

from broker.tools import ToolError, run_demo, run_sandbox, sandbox

KEY = "sk_test_FAKEsandboxKey000000000000"


async def test_rest_cards_test_keys_only() -> None:
    async with sandbox.running(key=KEY) as box, aiohttp.ClientSession() as s:
        api = f"{box.base}/api/v1"
        async with s.get(
            f"{api}/cards", headers={"Authorization": "Bearer sk_live_FAKE000000000000000000"}
        ) as r:
            assert r.status == 401
            assert (await r.json())["error"] == "the sandbox accepts sk_test_ keys only"
        auth = {"Authorization": f"Bearer {KEY}"}
        async with s.post(f"{api}/cards", json={"spend_limit_cents": 2500}, headers=auth) as r:
            assert r.status == 201
            card = await r.json()
            assert r.headers["X-AgentCard-Sandbox"] == "test"
            assert int(r.headers["RateLimit-Limit"]) > int(r.headers["RateLimit-Remaining"]) >= 0
        assert card["mode"] == "test" and card["spend_limit_cents"] == 2500
        async with s.get(f"{api}/cards/{card['id']}/details", headers=auth) as r:
            details = await r.json()
        assert details["pan"] == "4242424242424242" and details["mode"] == "test"
        async with s.delete(f"{api}/cards/{card['id']}", headers=auth) as r:
            assert (await r.json())["status"] == "closed"
        async with s.get(f"{api}/cards/nope", headers=auth) as r:
            assert r.status == 404 and "error" in await r.json()
        async with s.post(f"{api}/cards", data=b"{oops", headers=auth) as r:
            assert r.status == 400


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


async def test_oauth_requires_pkce_and_rotates_refresh_tokens() -> None:
    redirect = "http://127.0.0.1:9/callback"
    async with sandbox.running() as box, aiohttp.ClientSession() as s:
        async with s.post(
            f"{box.base}/register",
            json={"redirect_uris": [redirect], "token_endpoint_auth_method": "none", "client_name": "t"},
        ) as r:
            assert r.status == 201
            client_id = (await r.json())["client_id"]

        async def code() -> tuple[str, str]:
            verifier, challenge = _pkce()
            q = {
                "response_type": "code", "client_id": client_id, "redirect_uri": redirect, "state": "s1",
                "code_challenge": challenge, "code_challenge_method": "S256", "resource": box.mcp_url,
            }  # fmt: skip
            async with s.get(f"{box.base}/authorize", params=q, allow_redirects=False) as r:
                consent = URL(box.base).join(URL(r.headers["Location"]))
            async with s.get(consent) as r:
                page = await r.text()
            assert "sandbox" in page.lower()  # the consent page says what it is
            back = re.search(r"id='continue' href='([^']+)'", page)
            assert back
            return parse_qs(urlsplit(back.group(1).replace("&amp;", "&")).query)["code"][0], verifier

        token_url = f"{box.base}/token"
        c, _verifier = await code()
        form = {
            "grant_type": "authorization_code",
            "code": c,
            "redirect_uri": redirect,
            "client_id": client_id,
        }
        async with s.post(token_url, data=form) as r:  # no code_verifier
            assert r.status == 400
        c, verifier = await code()
        async with s.post(token_url, data={**form, "code": c, "code_verifier": "wrong" * 10}) as r:
            assert r.status == 400
        c, verifier = await code()
        async with s.post(token_url, data={**form, "code": c, "code_verifier": verifier}) as r:
            assert r.status == 200
            first = await r.json()
        refresh = {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": client_id,
        }
        async with s.post(token_url, data=refresh) as r:
            assert r.status == 200
            second = await r.json()
        assert second["refresh_token"] != first["refresh_token"]
        async with s.post(token_url, data=refresh) as r:  # the old one again
            assert r.status == 400
            assert (await r.json())["error"] == "invalid_grant"


async def test_demo_runs_offline_and_shows_masked_credentials() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "demo", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 120)
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, err
    assert "SANDBOX" in out
    assert re.search(r"upstream received: POST /api/v1/cards with Authorization: Bearer sk_test_\w{2}…", out)
    assert "credentials in what the agent received: NONE" in out
    assert re.search(r"agent got back: +201 .*\"mode\":\"test\"", out)
    assert "tools/call create_card" in out
    assert not re.search(r"sk_test_\w{12,}", out + err)  # never a whole key
    assert not re.search(r"\b(at|rt)_[\w-]{12,}", out + err)  # never a whole token


# ---------------------------------------------------------------- the entry points the CLI calls


def test_run_sandbox_on_a_busy_port_says_which(alarm: None) -> None:
    said: list[str] = []
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ToolError, match=rf"^cannot listen on 127.0.0.1:{port}: Address already in use$"):
            run_sandbox(port, said.append)
    assert said == []  # no banner for a sandbox that never started


def test_sandbox_and_demo_say_they_need_the_extra(monkeypatch: pytest.MonkeyPatch, alarm: None) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now fails, as when not installed
    said: list[str] = []
    hint = r"^this needs the sandbox extra: pip install 'agentcard-broker\[sandbox\]'$"
    with pytest.raises(ToolError, match=hint):
        run_sandbox(0, said.append)
    with pytest.raises(ToolError, match=hint):
        run_demo(said.append)
    assert said == []
