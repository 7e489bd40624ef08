"""DaemonClient: the command line's questions to a real daemon, over TCP and a unix socket.

The client is synchronous (a command asks once and exits), so the tests call it in a thread
while the daemon under test serves on this event loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from broker import config as config_mod
from broker.admin.client import DaemonClient
from tests.conftest import (
    TEST_KEY,
    BrokerFactory,
    Upstream,
    api_config,
    assert_no_secret,
    store_key,
    write_config,
)
from tests.e2e.conftest import DaemonProc, free_port


def client_for(path: Path, doc: dict[str, Any], timeout: float = 3.0) -> DaemonClient:
    return DaemonClient(config_mod.load(write_config(path, doc)), timeout=timeout)


def api_state(doc: dict[str, Any] | None) -> tuple[str, str | None]:
    assert doc is not None
    (route,) = [r for r in doc["routes"] if r["name"] == "api"]
    return route["state"], route["mode"]


async def test_status_and_reload_over_tcp(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    port = free_port()
    doc = api_config(upstream.url, listen=[f"127.0.0.1:{port}"])
    await make_broker(doc)
    client = client_for(tmp_path / "c.yaml", doc)
    assert str(client.address) == f"127.0.0.1:{port}"

    status = await asyncio.to_thread(client.status)
    assert status is not None
    assert status["pid"] == os.getpid()  # the daemon in this process answered
    assert status["listen"] == [f"127.0.0.1:{port}"]
    assert api_state(status) == ("no_credential", None)

    store_key(TEST_KEY)  # as set-key does, behind the daemon's back
    assert await asyncio.to_thread(client.reload) == {"reloaded": True, "config": {"error": None}}
    status = await asyncio.to_thread(client.status)
    assert api_state(status) == ("ready", "test")  # the reload re-read the store before answering
    assert upstream.seen == []  # asking the daemon forwards nothing
    assert_no_secret(repr(status))


async def test_the_host_header_is_one_the_guard_admits(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    port = free_port()
    doc = api_config(upstream.url, listen=[f"127.0.0.1:{port}"], allowed_hosts=["broker.test"])
    await make_broker(doc)
    assert await asyncio.to_thread(client_for(tmp_path / "c.yaml", doc).status) is not None
    # the same daemon refuses a client whose config names another host: an error is not an answer
    other = {**doc, "allowed_hosts": ["elsewhere.test"]}
    assert await asyncio.to_thread(client_for(tmp_path / "o.yaml", other).status) is None


async def test_status_and_reload_over_a_unix_socket(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path: Path
) -> None:
    sock = tmp_path / "run" / "broker.sock"
    doc = api_config(upstream.url, listen=[f"unix:{sock}", f"127.0.0.1:{free_port()}"])
    await make_broker(doc)
    client = client_for(tmp_path / "c.yaml", doc)
    assert str(client.address) == f"unix:{sock}"
    status = await asyncio.to_thread(client.status)
    assert status is not None and status["pid"] == os.getpid()
    assert status["listen"][0] == f"unix:{sock}"
    store_key(TEST_KEY)
    assert await asyncio.to_thread(client.reload) is not None
    assert api_state(await asyncio.to_thread(client.status)) == ("ready", "test")


async def test_a_daemon_that_is_not_running_answers_none(upstream: Upstream, tmp_path: Path) -> None:
    tcp = client_for(tmp_path / "t.yaml", api_config(upstream.url, listen=[f"127.0.0.1:{free_port()}"]))
    unix = client_for(tmp_path / "u.yaml", api_config(upstream.url, listen=[f"unix:{tmp_path}/none.sock"]))
    for client in (tcp, unix):
        assert client.status() is None
        assert client.reload() is None


async def test_a_listener_that_never_answers_times_out(upstream: Upstream, tmp_path: Path) -> None:
    with socket.socket() as quiet:  # the kernel accepts the connection; nobody ever answers
        quiet.bind(("127.0.0.1", 0))
        quiet.listen()
        port = quiet.getsockname()[1]
        client = client_for(tmp_path / "c.yaml", api_config(upstream.url, listen=[f"127.0.0.1:{port}"]), 0.3)
        started = time.monotonic()
        assert client.status() is None
        assert time.monotonic() - started < 2


async def test_something_else_on_the_address_is_not_the_daemon(upstream: Upstream, tmp_path: Path) -> None:
    async def not_found(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "no such page"}, status=404)

    async def html(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    upstream.handlers["/_broker/status"] = not_found
    upstream.handlers["/_broker/reload"] = html
    client = client_for(tmp_path / "c.yaml", api_config(upstream.url, listen=[f"127.0.0.1:{upstream.port}"]))
    assert await asyncio.to_thread(client.status) is None
    assert await asyncio.to_thread(client.reload) is None
    assert [(s.method, s.raw_path) for s in upstream.seen] == [
        ("GET", "/_broker/status"),
        ("POST", "/_broker/reload"),
    ]

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        other = client_for(tmp_path / "s.yaml", api_config(upstream.url, listen=[f"127.0.0.1:{port}"]))
        assert await asyncio.to_thread(other.status) is None


async def test_a_daemon_in_another_process_over_its_unix_socket(upstream: Upstream, tmp_path: Path) -> None:
    """As the command line meets it: `agentcard-broker run` started apart, asked on its socket."""
    sock = tmp_path / "run" / "broker.sock"
    doc = api_config(upstream.url, listen=[f"unix:{sock}"])
    path = write_config(tmp_path / "config.yaml", doc)
    d = DaemonProc(path, 0)
    ready = await d.start()
    try:
        assert ready["listen"] == [f"unix:{sock}"]
        client = DaemonClient(config_mod.load(path))
        status = await asyncio.to_thread(client.status)
        assert status is not None
        assert d.proc is not None and status["pid"] == d.proc.pid
        assert api_state(status) == ("no_credential", None)
        store_key(TEST_KEY)
        reloaded = await asyncio.to_thread(client.reload)
        assert reloaded == {"reloaded": True, "config": {"error": None}}
        assert api_state(await asyncio.to_thread(client.status)) == ("ready", "test")
        # a config error is reported by reload, while the daemon keeps serving the old config
        path.write_text(yaml.safe_dump({**doc, "bogus_key": 1}))
        reloaded = await asyncio.to_thread(client.reload)
        assert reloaded is not None and reloaded["reloaded"] is False
        assert "bogus_key" in reloaded["config"]["error"]
        assert api_state(await asyncio.to_thread(client.status)) == ("ready", "test")
    finally:
        await d.stop()
    assert d.proc.returncode == 0
    assert await asyncio.to_thread(client.status) is None  # stopped: nothing answers on the socket
    assert_no_secret(d.stderr)
