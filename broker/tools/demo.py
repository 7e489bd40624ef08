"""`agentcard-broker demo`: the broker doing its job in one command, offline, in under a minute.

Owns: a throwaway setup (temporary config and state dir, a file secret store in it, a random
`sk_test_` key), the sandbox, a broker wired to it, the OAuth login driven like a browser, and
an agent's REST and MCP calls, printing what the agent sent, what the upstream received (the
credential masked) and what the agent got back. Must never: touch the user's keyring, config or
the network beyond 127.0.0.1; print a credential unmasked.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from yarl import URL

from broker import logs
from broker.auth.secret_store import FileStore
from broker.config import load
from broker.scrub import SecretSet
from broker.tools import Say


def mask(value: str) -> str:
    """`sk_test_ab…yz (32 chars)`: enough to recognise, never enough to use."""
    if len(value) <= 14:
        return "*" * len(value)
    head = value[: value.index("_", 3) + 3] if value.startswith("sk_") else value[:5]
    return f"{head}…{value[-2:]} ({len(value)} chars)"


def _show_headers(headers: Any, secret_values: list[str]) -> str:
    shown = []
    for k, v in headers.items():
        if k.lower() in ("authorization",):
            token = v.split(" ", 1)[-1]
            v = (
                f"Bearer {mask(token)}"
                if token in secret_values or token.startswith(("sk_", "at_"))
                else "Bearer ?"
            )
        shown.append(f"{k}: {v}")
    return ", ".join(shown) or "(none)"


async def _browser(url: str) -> None:
    """The user's part of the login: open the URL, pass the sandbox's consent page, come back."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url, allow_redirects=False) as r:
            location = r.headers["Location"]
        if "/sandbox/consent" in location:
            async with s.get(URL(url).join(URL(location))) as r:
                page = await r.text()
            m = re.search(r"id='continue' href='([^']+)'", page)
            assert m, "the consent page has no continue link"
            location = m.group(1).replace("&amp;", "&")
        async with s.get(location) as r:
            await r.read()


async def run(say: Say) -> int:
    from mcp import Client

    from broker.auth.oauth import login
    from broker.daemon import Daemon
    from broker.tools import sandbox

    key = "sk_test_demo" + secrets.token_hex(12)
    with tempfile.TemporaryDirectory(prefix="agentcard-demo-") as tmp:
        state = Path(tmp)
        async with sandbox.running(key=key, say=say) as box:
            doc = {
                "listen": ["127.0.0.1:0"],
                "allow_insecure_upstream": True,  # the sandbox speaks plain http on loopback
                "secret_store": "file",
                "state_dir": str(state / "state"),
                "log": {"level": "warning", "format": "json", "audit": False},
                "timeouts": {"drain": 1},
                "routes": [
                    {"name": "mcp", "prefix": "/mcp", "upstream": box.mcp_url,
                     "auth": {"type": "oauth", "scopes": ["cards"], "redirect_port": _free_port()}},
                    {"name": "api", "prefix": "/", "upstream": box.base, "auth": {"type": "api_key"}},
                ],
            }  # fmt: skip
            cfg_path = state / "config.yaml"
            cfg_path.write_text(yaml.safe_dump(doc, sort_keys=False))
            cfg_path.chmod(0o600)
            cfg = load(cfg_path)
            store = FileStore(cfg.state_path() / "secrets.json")
            store.set("api", key)
            say(
                f"\n1. a throwaway test key {mask(key)} is stored for route 'api' ({state}, not your keyring)"
            )

            secrets_held = SecretSet()
            logs.configure("warning", "json", secrets_held, stream=io.StringIO())  # quiet: we narrate
            daemon = await Daemon.start(cfg, secrets_held)
            url = f"http://{daemon.rt.listen_addresses[0]}"
            try:
                say(f"2. the broker listens on {url} (agents get no credential at all)")
                say("3. logging in to the sandbox's MCP server with OAuth (PKCE), as `login` does:")
                route = cfg.route("mcp")
                assert route is not None
                grabbed: asyncio.Queue[str] = asyncio.Queue()

                def relay(text: str) -> None:
                    for line in text.splitlines():
                        if "/authorize?" in line:
                            grabbed.put_nowait(line.strip())

                flow = asyncio.create_task(login(cfg, route, store, open_browser=False, wait_s=30, say=relay))
                await _browser(await asyncio.wait_for(grabbed.get(), 15))
                result = await flow
                tokens = result.tokens
                say(f"   logged in at {result.issuer}; token {mask(tokens.access_token)} stays in the broker")
                daemon.rt.credentials["mcp"].invalidate()

                held = [key, tokens.access_token, tokens.refresh_token or ""]
                await _rest(url, box, held, say)
                await _mcp(url, box, held, say, Client)
            finally:
                await daemon.stop()
    say("\ndone: the agent did real work through the broker and never saw a key or a token.")
    say("next: agentcard-broker set-key api, agentcard-broker login mcp, agentcard-broker connect --help")
    return 0


async def _rest(url: str, box: Any, held: list[str], say: Say) -> None:
    say("\n4. an agent creates a card over REST:")
    body = {"cardholder_id": "ch_sandbox", "spend_limit_cents": 2500}
    say(f"   agent sent:        POST {url}/api/v1/cards {json.dumps(body)} (no Authorization header)")
    async with aiohttp.ClientSession() as s, s.post(f"{url}/api/v1/cards", json=body) as r:
        answer = await r.text()
        status, agent_headers = r.status, dict(r.headers)
    seen = box.rest.seen[-1]
    say(f"   upstream received: {seen['method']} {seen['path']} with "
        f"{_show_headers({'Authorization': seen['headers'].get('authorization', '')}, held)}")  # fmt: skip
    say(f"   agent got back:    {status} {answer}")
    leaked = [v for v in held if v and (v in answer or v in json.dumps(agent_headers))]
    say(f"   credentials in what the agent received: {'NONE' if not leaked else 'LEAKED'}")
    if leaked or status != 201:
        raise RuntimeError("the REST step did not go as it should")


async def _mcp(url: str, box: Any, held: list[str], say: Say, client_cls: Any) -> None:
    say("\n5. an agent uses the MCP server through the broker (mcp.Client, no token):")
    async with client_cls(f"{url}/mcp", mode="auto") as agent:
        tools = await agent.list_tools()
        say(f"   agent sent:        tools/list -> got {', '.join(t.name for t in tools.tools)}")
        result = await agent.call_tool("create_card", {"amount_cents": 1500})
        say('   agent sent:        tools/call create_card {"amount_cents": 1500}')
        access = box.auth.access_tokens
        say(f"   upstream received: Authorization: Bearer {mask(next(iter(access)))} (the broker's token)"
            if access else "   upstream received: (no token?)")  # fmt: skip
        say(f"   agent got back:    {json.dumps(result.structured_content)}")
        text = json.dumps(result.structured_content)
        if result.is_error or any(v and v in text for v in held):
            raise RuntimeError("the MCP step did not go as it should")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
