"""`agentcard-broker approvals` / `approve ID` / `deny ID` as real subprocesses against a daemon.

The daemon runs in this process (its listen port and state dir fixed in the config, so the
command finds it and its admin key); the agent is an aiohttp client whose call is held.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from broker.admin.approvals_cli import lines
from tests.conftest import TEST_KEY, Broker, BrokerFactory, Upstream, store_key, write_config
from tests.e2e.conftest import CLI, cli, free_port
from tests.test_approvals import approve_doc, no_desktop, notified, pending, send

__all__ = ["no_desktop"]  # the autouse fixture: no real desktop notification from these tests


async def held_broker(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path, **approve: Any
) -> tuple[Broker, str]:
    store_key(TEST_KEY)
    doc = approve_doc(upstream.url, tmp_path, {"approve": {"above_cents": 1000, "wait": "20s", **approve}})
    b = await make_broker(doc)
    notified(b)
    return b, str(write_config(tmp_path / "cli.yaml", doc))


async def test_list_approve_and_deny_from_the_command_line(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    b, config = await held_broker(make_broker, upstream, tmp_path)
    code, out, _ = await cli("approvals", "--config", config)
    assert (code, out.strip()) == (0, "no requests wait for approval")

    agent = asyncio.create_task(send(b, "POST", "/api/v1/cards", b'{"amount_cents": 2500}'))
    (held,) = await pending(b)
    code, out, _ = await cli("approvals", "--config", config)
    assert code == 0
    header, row = out.splitlines()[:2]
    assert header.split() == ["ID", "ROUTE", "USER", "TOOL/PATH", "AMOUNT", "REASONS", "EXPIRES", "IN"]
    assert row.startswith(held.id) and "POST /api/v1/cards" in row and "$25.00" in row
    assert "amount 2500 over 1000" in row
    code, out, _ = await cli("approvals", "--json", "--config", config)
    assert [a["id"] for a in json.loads(out)["pending"]] == [held.id]

    code, out, err = await cli("approve", held.id.lower(), "--config", config)  # typed in lower case
    assert code == 0, err
    assert out.startswith(f"approved {held.id}: POST /api/v1/cards ($25.00)")
    assert await agent == (200, {"ok": True, "path": "/api/v1/cards", "method": "POST"})
    assert held.decided_by == "cli"
    code, _, err = await cli("approve", held.id, "--config", config)  # once only
    assert code == 1 and "already approved" in err

    agent = asyncio.create_task(send(b, "POST", "/api/v1/cards", b'{"amount_cents": 2500}'))
    (again,) = await pending(b)
    code, out, _ = await cli("deny", again.id, "--config", config)
    assert code == 0 and out.startswith(f"denied {again.id}")
    status, answer = await agent
    assert status == 403 and answer["error"]["code"] == "approval_denied"
    assert len(upstream.seen) == 1

    code, _, err = await cli("approve", "NOSUCH22", "--config", config)
    assert code == 1 and "no approval" in err


async def test_a_passkey_approval_is_refused_on_the_command_line(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    b, config = await held_broker(make_broker, upstream, tmp_path, require_passkey=True)
    agent = asyncio.create_task(send(b, "POST", "/api/v1/cards", b'{"amount_cents": 2500}'))
    (held,) = await pending(b)
    code, out, err = await cli("approve", held.id, "--config", config)
    assert code == 1 and out == ""
    assert "needs a passkey: approve it in the dashboard (agentcard-broker dashboard)" in err
    assert held.state == "pending" and upstream.seen == []
    code, _, _ = await cli("deny", held.id, "--config", config)  # denying never needs one
    assert code == 0
    assert (await agent)[1]["error"]["code"] == "approval_denied"


async def test_not_running_an_unreadable_key_and_watch(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    nobody = approve_doc(upstream.url, tmp_path / "none", {"approve": {"above_cents": 1}})
    nobody["listen"] = [f"127.0.0.1:{free_port()}"]
    config = str(write_config(tmp_path / "nobody.yaml", nobody))
    for args in (("approvals",), ("approve", "ABCDEFGH"), ("deny", "ABCDEFGH")):
        code, _, err = await cli(*args, "--config", config)
        assert code == 1 and "agentcard-broker is not running" in err

    b, config = await held_broker(make_broker, upstream, tmp_path)
    key = tmp_path / "state" / "admin.key"
    key.chmod(0o644)  # a key others could read is not used
    code, _, err = await cli("approve", "ABCDEFGH", "--config", config)
    assert code == 1 and "cannot read the daemon's admin key" in err
    key.chmod(0o600)

    agent = asyncio.create_task(send(b, "POST", "/api/v1/cards", b'{"amount_cents": 2500}'))
    (held,) = await pending(b)
    proc = await asyncio.create_subprocess_exec(
        *CLI, "approvals", "--watch", "--config", config, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readuntil(b"Ctrl-C to stop)\n"), 30)
    assert held.id.encode() in first
    b.daemon.rt.approvals.decide(held.id, False, "dashboard")
    second = await asyncio.wait_for(proc.stdout.readuntil(b"Ctrl-C to stop)\n"), 30)
    assert b"no requests wait for approval" in second  # it refreshed
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert (await agent)[0] == 403


def test_the_table_shows_no_control_characters() -> None:
    doc = {
        "pending": [
            {
                "id": "ABCDEFGH",
                "route": "mcp",
                "client": "librechat",
                "user": "alice",
                "method": "POST",
                "path": "/mcp",
                "tools": ["evil\x1b]0;pwned\x07tool"],
                "amount_cents": None,
                "reasons": ["tool evil"],
                "expires_at": 1060.0,
                "require_passkey": True,
            }
        ]
    }
    out = "\n".join(lines(doc, now=1000.0))
    assert "\x1b" not in out and "\x07" not in out
    assert "ABCDEFGH (passkey)" in out and "librechat/alice" in out and "60s" in out
