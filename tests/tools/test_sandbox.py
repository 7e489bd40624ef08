"""The sandbox (a local AgentCard stand-in) and the demo that uses it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import re
import secrets
import socket
import sys
from urllib.parse import parse_qs, urlsplit

import aiohttp
import httpx2
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


# ---------------------------------------------------------------- several users: the consent page's picker


async def _register(s: aiohttp.ClientSession, base: str, redirect: str) -> str:
    body = {"redirect_uris": [redirect], "token_endpoint_auth_method": "none", "client_name": "t"}
    async with s.post(f"{base}/register", json=body) as r:
        assert r.status == 201
        return str((await r.json())["client_id"])


async def _consent(
    s: aiohttp.ClientSession, box: sandbox.Sandbox, client_id: str, redirect: str
) -> tuple[URL, str, str]:
    """/authorize up to the consent page: its URL, its HTML, and the PKCE verifier."""
    verifier, challenge = _pkce()
    q = {
        "response_type": "code", "client_id": client_id, "redirect_uri": redirect, "state": "s1",
        "code_challenge": challenge, "code_challenge_method": "S256", "resource": box.mcp_url,
        "scope": "cards",
    }  # fmt: skip
    async with s.get(f"{box.base}/authorize", params=q, allow_redirects=False) as r:
        consent = URL(box.base).join(URL(r.headers["Location"]))
    async with s.get(consent) as r:
        assert r.status == 200
        return consent, await r.text(), verifier


async def _tokens(
    s: aiohttp.ClientSession,
    box: sandbox.Sandbox,
    client_id: str,
    redirect: str,
    location: str,
    verifier: str,
) -> dict[str, str]:
    code = parse_qs(urlsplit(location).query)["code"][0]
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect,
            "client_id": client_id, "code_verifier": verifier}  # fmt: skip
    async with s.post(f"{box.base}/token", data=form) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def _pick(s: aiohttp.ClientSession, consent: URL, page: str, user: str) -> aiohttp.ClientResponse:
    action = re.search(r"<form id='picker' method='post' action='([^']+)'", page)
    nxt = re.search(r"name='next' value='([^']+)'", page)
    assert action and nxt
    form = {"next": html.unescape(nxt.group(1)), "user": user}
    return await s.post(consent.join(URL(html.unescape(action.group(1)))), data=form, allow_redirects=False)


async def test_consent_picker_issues_tokens_for_the_user_picked() -> None:
    redirect = "http://127.0.0.1:9/callback"
    async with sandbox.running() as box, aiohttp.ClientSession() as s:
        client_id = await _register(s, box.base, redirect)
        subjects = {}
        for user in ("alice", "bob", "carol.typed@example.test", None):
            consent, page, verifier = await _consent(s, box, client_id, redirect)
            assert "id='pick-alice'" in page and "id='pick-bob'" in page and "name='user'" in page
            if user is None:  # nothing picked: the Continue link, the default user as before
                m = re.search(r"id='continue' href='([^']+)'", page)
                assert m
                location = html.unescape(m.group(1))
            else:
                async with await _pick(s, consent, page, user) as r:
                    assert r.status == 303
                    location = r.headers["Location"]
            assert location.startswith(redirect + "?")
            tokens = await _tokens(s, box, client_id, redirect, location, verifier)
            subjects[user] = box.auth.access_tokens[tokens["access_token"]].subject
            if user == "bob":  # a refreshed token is still bob's
                refresh = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                           "client_id": client_id}  # fmt: skip
                async with s.post(f"{box.base}/token", data=refresh) as r:
                    assert box.auth.user_of((await r.json())["access_token"]) == "bob"
        assert subjects == {
            "alice": "alice", "bob": "bob", "carol.typed@example.test": "carol.typed@example.test",
            None: sandbox.DEFAULT_USER,
        }  # fmt: skip


async def test_consent_picker_refuses_bad_names_codes_and_redirects() -> None:
    redirect = "http://127.0.0.1:9/callback"
    async with sandbox.running() as box, aiohttp.ClientSession() as s:
        client_id = await _register(s, box.base, redirect)
        consent, page, verifier = await _consent(s, box, client_id, redirect)
        for bad in ("", "a b", "<script>", "x" * 65, "-alice"):
            async with await _pick(s, consent, page, bad) as r:
                assert r.status == 400, bad
        async with s.post(consent, data={"next": f"{redirect}?code=nope&state=s1", "user": "alice"}) as r:
            assert r.status == 400  # no such code
        async with s.post(consent, data={"next": "https://evil.example/?code=x", "user": "alice"}) as r:
            assert r.status == 400
        async with await _pick(s, consent, page, "alice") as r:  # the refusals changed nothing
            tokens = await _tokens(s, box, client_id, redirect, r.headers["Location"], verifier)
        assert box.auth.user_of(tokens["access_token"]) == "alice"
        async with await _pick(s, consent, page, "bob") as r:  # a used code cannot be rebound
            assert r.status == 400


async def test_cards_are_recorded_under_the_user_whose_token_made_them() -> None:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    redirect = "http://127.0.0.1:9/callback"
    async with sandbox.running(key=KEY) as box, aiohttp.ClientSession() as s:
        client_id = await _register(s, box.base, redirect)
        access = {}
        for user in ("alice", "bob"):
            consent, page, verifier = await _consent(s, box, client_id, redirect)
            async with await _pick(s, consent, page, user) as r:
                location = r.headers["Location"]
            access[user] = (await _tokens(s, box, client_id, redirect, location, verifier))["access_token"]

        made = {}
        for user, amount in (("alice", 1500), ("bob", 2500)):  # MCP: the card tools
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {access[user]}"}, timeout=10)
            async with http, Client(streamable_http_client(box.mcp_url, http_client=http)) as agent:  # type: ignore[arg-type]
                result = await agent.call_tool("create_card", {"amount_cents": amount})
                assert not result.is_error and result.structured_content
                made[user] = result.structured_content["id"]
                listed = await agent.call_tool("list_cards", {})
                assert listed.structured_content
                assert [c["id"] for c in listed.structured_content["cards"]] == [made[user]]
        assert box.store.cards[made["alice"]]["owner"] == "alice"
        assert box.store.cards[made["bob"]]["owner"] == "bob"
        assert [c["user"] for c in box.mcp_seen if c["bearer"]][-1] == "bob"  # who the MCP endpoint saw

        # REST: a sandbox access token acts as its user, the sk_test_ key as the default user
        api = f"{box.base}/api/v1/cards"
        async with s.post(
            api, json={"spend_limit_cents": 700}, headers={"Authorization": f"Bearer {access['bob']}"}
        ) as r:
            assert r.status == 201 and (await r.json())["owner"] == "bob"
        async with s.get(api, headers={"Authorization": f"Bearer {access['bob']}"}) as r:
            assert {c["owner"] for c in (await r.json())["cards"]} == {"bob"}
        async with s.get(f"{api}/{made['alice']}", headers={"Authorization": f"Bearer {access['bob']}"}) as r:
            assert r.status == 404  # alice's card is not bob's to see
        async with s.post(
            api, json={"spend_limit_cents": 900}, headers={"Authorization": f"Bearer {KEY}"}
        ) as r:
            assert (await r.json())["owner"] == sandbox.DEFAULT_USER
        async with s.get(api, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert [c["spend_limit_cents"] for c in (await r.json())["cards"]] == [900]


async def test_demo_per_user_shows_each_user_their_own_grant() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "broker", "demo", "--per-user",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
    out, err = out_b.decode(), err_b.decode()
    assert proc.returncode == 0, out + err
    assert "SANDBOX" in out
    for user in ("alice", "bob"):
        assert re.search(
            rf"agent sent: +tools/list with Authorization: Bearer acb_\S+ \(\d+ chars\), X-User-ID: {user}",
            out,
        )
        assert re.search(rf"picked '{user}'; back: 'Connected'", out)
        assert re.search(
            rf"upstream received: Authorization: Bearer at_\S+ \(\d+ chars\), a token of {user} ", out
        )
        assert re.search(rf"card_\w+ under {user} \(created by {user}, with a token of {user}\)", out)
    assert (
        len(re.findall(r"-32042 URL elicitation: connect at http://127\.0\.0\.1:\d+/_broker/connect/", out))
        == 2
    )
    assert "alice's card is alice's, bob's is bob's" in out
    assert not re.search(r"acb_[\w-]{12,}", out + err)  # never a whole platform token
    assert not re.search(r"\b(at|rt)_[\w-]{12,}", out + err)  # never a whole sandbox token
