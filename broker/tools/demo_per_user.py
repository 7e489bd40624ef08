"""`agentcard-broker demo --per-user`: a chat platform's per-user route, two end users, offline.

Owns: a throwaway setup (temporary config and state dir, a file secret store in it, a platform
client whose token the real `clients add` code makes), the sandbox, a broker whose per-user route
points at it (`public_url`: the broker's own http://127.0.0.1 port), and for alice then bob: the
connect link their agent's first call earns, that link followed by a scripted browser that picks
the user on the sandbox's consent page, and a card created through the broker by `mcp.Client`
sending the platform token and `X-User-ID`; printing what the agent sent, what the upstream
received (whose token) and under whom the sandbox recorded each card. Must never: touch the
user's keyring, config or the network beyond 127.0.0.1; print a token unmasked.
"""

from __future__ import annotations

import asyncio
import html
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from yarl import URL

from broker import logs
from broker.config import load
from broker.scrub import SecretSet
from broker.tools import Say
from broker.tools.demo import _free_port, mask

CLIENT = "demo-chat"
USERS = ("alice", "bob")
CONNECT_RE = re.compile(r"http://127\.0\.0\.1:\d+/_broker/connect/[A-Za-z0-9_-]{43}")


class DemoFailed(Exception):
    """A step did not go as it should; the message says which."""


async def run(say: Say) -> int:
    from broker.auth.platform_clients import add_client
    from broker.daemon import Daemon
    from broker.tools import sandbox

    with tempfile.TemporaryDirectory(prefix="agentcard-demo-") as tmp:
        state = Path(tmp)
        async with sandbox.running(say=say) as box:
            port = _free_port()
            public = f"http://127.0.0.1:{port}"
            doc = {
                "listen": [f"127.0.0.1:{port}"],  # known before the start: public_url names it
                "public_url": public,
                "allow_insecure_upstream": True,  # the sandbox, and public_url, are plain http on loopback
                "secret_store": "file",
                "state_dir": str(state / "state"),
                "log": {"level": "warning", "format": "json", "audit": False},
                "timeouts": {"drain": 1},
                "clients": [{"name": CLIENT}],
                "routes": [
                    {"name": "mcp", "prefix": "/mcp", "upstream": box.mcp_url,
                     "auth": {"type": "oauth", "per_user": True, "scopes": ["cards"],
                              "user_header": "X-User-ID"}},
                ],
            }  # fmt: skip
            cfg_path = state / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
            cfg_path.chmod(0o600)
            cfg = load(cfg_path)
            # `clients add`'s own code; it runs its own event loop, so off this one
            lines = await asyncio.to_thread(add_client, cfg, CLIENT)
            token = next(line.text for line in lines if not line.to_stderr)
            say(f"\n1. `agentcard-broker clients add {CLIENT}` made the platform's token {mask(token)}")
            say(f"   (kept as a hash in {state}, not your keyring)")

            secrets_held = SecretSet()
            logs.configure("warning", "json", secrets_held, stream=io.StringIO())  # quiet: we narrate
            daemon = await Daemon.start(cfg, secrets_held)
            try:
                say(f"2. the broker listens on {public}; route /mcp is per user: one AgentCard grant each")
                cards = {}
                for step, user in enumerate(USERS, start=3):
                    cards[user] = await _one_user(step, public, box, token, user, say)
                failed = _verdict(box, cards, say)
            except DemoFailed as exc:
                failed = [str(exc)]
            finally:
                await daemon.stop()
    if failed:
        say("\nFAILED: " + "; ".join(failed))
        return 1
    say("\ndone: each user connected their own sandbox account; the platform never held a grant.")
    say("next: README 'Chat platforms', agentcard-broker clients --help, agentcard-broker connect --per-user")
    return 0


def _agent(public: str, http: Any) -> Any:
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    transport = streamable_http_client(f"{public}/mcp", http_client=http)
    return Client(transport, mode="auto")


def _http(token: str, user: str) -> Any:
    import httpx2

    return httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}", "X-User-ID": user}, timeout=15)


async def _one_user(step: int, public: str, box: Any, token: str, user: str, say: Say) -> dict[str, Any]:
    say(f"\n{step}. {user}, in the chat, asks the agent for a card (mcp.Client via the platform):")
    say(f"   agent sent:        tools/list with Authorization: Bearer {mask(token)}, X-User-ID: {user}")
    link = await _connect_link(public, token, user)
    say(f"   agent got back:    -32042 URL elicitation: connect at {link}")
    said = await _browser(link, public, user)
    say(f"   {user}'s browser:  the link, Continue, AgentCard sandbox: picked {user!r}; back: {said!r}")

    seen_before = len(box.mcp_seen)
    args = {"amount_cents": 1500 if user == "alice" else 2500}
    async with _http(token, user) as http, _agent(public, http) as agent:
        result = await agent.call_tool("create_card", args)
    card = result.structured_content or {}
    say(f"   agent sent:        tools/call create_card {json.dumps(args)}, the same headers")
    calls = list(box.mcp_seen)[seen_before:]
    upstream = next((c for c in reversed(calls) if c["bearer"]), None)
    if result.is_error or upstream is None:
        raise DemoFailed(f"{user}'s create_card did not reach the sandbox with a token")
    whose = upstream["user"] or "nobody"
    if any(token in json.dumps(c["headers"]) or "x-user-id" in c["headers"] for c in calls):
        raise DemoFailed("the platform's token or user header reached the sandbox")
    say(
        f"   upstream received: Authorization: Bearer {mask(upstream['bearer'])}, a token of {whose}"
        " (no platform token, no X-User-ID)"
    )
    say(f"   agent got back:    {json.dumps(card)}")
    return {"card": card, "token_user": whose}


async def _connect_link(public: str, token: str, user: str) -> str:
    """The link the broker answers a user with no grant yet (the MCP client raises it)."""
    from mcp import MCPError

    try:
        async with _http(token, user) as http, _agent(public, http) as agent:
            await agent.list_tools()
    except BaseException as exc:  # noqa: BLE001 - the SDK may wrap it in a group
        for e in _leaves(exc):
            if isinstance(e, MCPError):
                m = CONNECT_RE.search(json.dumps(e.data) if e.data is not None else str(e))
                if m:
                    return m.group(0)
        raise DemoFailed(f"no connect link for {user}: {type(exc).__name__}: {exc}") from None
    raise DemoFailed(f"{user} was not asked to connect")


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _find(pattern: str, page: str, what: str) -> str:
    m = re.search(pattern, page)
    if not m:
        raise DemoFailed(f"no {what} on the page")
    return html.unescape(m.group(1))


async def _browser(link: str, public: str, user: str) -> str:
    """The end user's part: the connect page and its form, AgentCard's authorize and consent page
    (picking `user`), the broker's callback. The callback page's title."""
    nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    async with aiohttp.ClientSession() as s:
        async with s.get(link, headers=nav) as r:
            page = await r.text()
        action = _find(r"<form method='post' action='([^']+)'", page, "connect form")
        connect_id = _find(r"name='connect_id' value='([^']+)'", page, "connect id")
        own = {"Origin": public, "Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}
        async with s.post(action, data={"connect_id": connect_id}, headers=own, allow_redirects=False) as r:
            authorize = r.headers.get("Location", "")
        async with s.get(authorize, allow_redirects=False) as r:  # AgentCard: its consent page
            consent = URL(authorize).join(URL(r.headers.get("Location", "")))
        async with s.get(consent) as r:
            page = await r.text()
        picker = _find(r"<form id='picker' method='post' action='([^']+)'", page, "user picker")
        nxt = _find(r"name='next' value='([^']+)'", page, "next field")
        form = {"next": nxt, "user": user}
        async with s.post(consent.join(URL(picker)), data=form, allow_redirects=False) as r:
            callback = r.headers.get("Location", "")
        if not callback.startswith(f"{public}/_broker/callback?"):
            raise DemoFailed(f"the sandbox did not send {user}'s browser back to the broker")
        async with s.get(callback, headers=nav) as r:
            status, page = r.status, await r.text()
    title = _find(r"<h1[^>]*>([^<]*)</h1>", page, "title")
    if status != 200:
        raise DemoFailed(f"the broker's callback said {status} {title}")
    return title


def _verdict(box: Any, cards: dict[str, dict[str, Any]], say: Say) -> list[str]:
    """What the sandbox recorded, against what should be; the failures (none: all held)."""
    say(f"\n{3 + len(USERS)}. what the sandbox recorded:")
    failed = []
    for user, got in cards.items():
        cid = got["card"].get("id", "?")
        owner = box.store.cards.get(cid, {}).get("owner")
        say(f"   {cid} under {owner} (created by {user}, with a token of {got['token_user']})")
        if owner != user or got["token_user"] != user:
            failed.append(f"{user}'s card is recorded under {owner}")
    leaked = [c for c in box.store.cards.values() if c.get("owner") not in USERS]
    if leaked:
        failed.append(f"{len(leaked)} card(s) under another user")
    if not failed:
        say("   alice's card is alice's, bob's is bob's: each call used that user's own grant")
    return failed
