"""A daemon that lives for months: systemd notify, live reload under load, drain, peers, hardening."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.conftest import TEST_KEY, Upstream, api_config, store_key
from tests.e2e.conftest import DaemonProc, cli, free_port

can_switch_uid = os.geteuid() == 0 and shutil.which("setpriv") is not None
needs_root = pytest.mark.skipif(not can_switch_uid, reason="needs root and setpriv to act as another uid")


async def get(url: str, **kw: Any) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, await r.read()


def slow_handler(started: asyncio.Event, delay: float) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        started.set()
        await asyncio.sleep(delay)
        return web.json_response({"slow": True})

    return handler


async def test_systemd_notify_ready_watchdog_stopping(
    tmp_path: Path, upstream: Upstream, daemon_factory: Any
) -> None:
    store_key(TEST_KEY)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    messages: list[str] = []

    async def collect() -> None:
        while True:
            messages.append((await loop.sock_recv(sock, 4096)).decode())

    collector = asyncio.create_task(collect())
    try:
        d: DaemonProc = daemon_factory(api_config(upstream.url))
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"}
        ready = await d.start(env=env)
        assert ready["systemd_notify"] is True
        for _ in range(100):
            if sum("WATCHDOG=1" in m for m in messages) >= 3:
                break
            await asyncio.sleep(0.05)
        first = messages[0].splitlines()
        assert "READY=1" in first
        assert f"MAINPID={d.proc.pid if d.proc else 0}" in first
        assert any(line.startswith("STATUS=serving on 127.0.0.1:") for line in first)
        assert sum("WATCHDOG=1" in m for m in messages) >= 3  # pinged every WATCHDOG_USEC/2
        # the daemon really serves once READY=1 was sent
        status, _ = await get(d.url + "/_broker/health")
        assert status == 200
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
        await asyncio.sleep(0.05)
        assert any("STOPPING=1" in m for m in messages)
        ready_at = next(i for i, m in enumerate(messages) if "READY=1" in m)
        stopping_at = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
        assert ready_at < stopping_at
    finally:
        collector.cancel()
        sock.close()


async def _edit_and_reload(d: DaemonProc, how: str, doc: dict[str, Any]) -> None:
    mark = len(d.events())
    if how == "rename":  # what editors do: write a new file, rename it over the old one
        tmp = d.config.with_name(".config.yaml.swp")
        tmp.write_text(yaml.safe_dump(doc))
        tmp.chmod(0o600)
        os.replace(tmp, d.config)
    else:
        d.config.write_text(yaml.safe_dump(doc))
        d.signal(signal.SIGHUP)
    await d.wait_for_event("config.reloaded", after=mark)


@pytest.mark.parametrize("how", ["rename", "sighup"])
async def test_reload_with_requests_in_flight(how: str, upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    store_key(TEST_KEY + "new", "new")
    started = asyncio.Event()
    upstream.handlers["/slow"] = slow_handler(started, 0.8)
    doc = api_config(upstream.url)
    d: DaemonProc = daemon_factory(doc)
    await d.start()
    in_flight = [asyncio.create_task(get(d.url + "/slow")) for _ in range(8)]
    await asyncio.wait_for(started.wait(), 5)

    new = yaml.safe_load(d.config.read_text())
    new["routes"].insert(
        0, {"name": "new", "prefix": "/new", "upstream": upstream.url + "/v9", "auth": {"type": "api_key"}}
    )
    await _edit_and_reload(d, how, new)
    results = await asyncio.gather(*in_flight)
    assert [s for s, _ in results] == [200] * 8  # nothing in flight was dropped
    status, _ = await get(d.url + "/new/cards")
    assert status == 200
    assert upstream.seen[-1].raw_path == "/v9/cards"
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}new"
    status, _ = await get(d.url + "/other")
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}"  # the old route's key kept


@pytest.mark.parametrize("when", ["before_the_watcher", "after_the_watcher"])
async def test_an_edit_in_place_is_applied_without_a_signal(
    when: str, upstream: Upstream, daemon_factory: Any
) -> None:
    # before: an edit in the second between ready and the watcher starting, found by the stamp
    # comparison the watcher makes as it starts; after: an in-place write, found by its event.
    # Each is waited for less than WATCH_FALLBACK_S: the 5 s stamp comparison would find both.
    store_key(TEST_KEY)
    store_key(TEST_KEY + "new", "new")
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    await d.start()
    if when == "after_the_watcher":
        await asyncio.sleep(2.0)  # WATCH_AFTER_S is 1 s
    mark = len(d.events())
    new = yaml.safe_load(d.config.read_text())
    new["routes"].insert(
        0, {"name": "new", "prefix": "/new", "upstream": upstream.url + "/v9", "auth": {"type": "api_key"}}
    )
    d.config.write_text(yaml.safe_dump(new))
    ev = await d.wait_for_event("config.reloaded", timeout=3.5, after=mark)
    assert ev["reason"] == "file_changed" and ev["routes"][0] == "new"
    status, _ = await get(d.url + "/new/cards")
    assert status == 200
    assert upstream.seen[-1].raw_path == "/v9/cards"


async def test_invalid_edit_by_rename_keeps_old_config(upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    await d.start()
    mark = len(d.events())
    tmp = d.config.with_name("next.yaml")
    tmp.write_text(d.config.read_text().replace("routes:", "routes: oops\nrouting:"))
    tmp.chmod(0o600)
    os.replace(tmp, d.config)
    ev = await d.wait_for_event("config.rejected", after=mark)
    assert ev["kept"] == "previous config"
    status, _ = await get(d.url + "/still/works")
    assert status == 200
    rc, out, _ = await cli("status", "--config", str(d.config))
    assert rc == 0
    assert "config error" in out


async def test_changed_listen_rebinds(upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    await d.start()
    old_port, new_port = d.port, free_port()
    doc = yaml.safe_load(d.config.read_text())
    doc["listen"] = [f"127.0.0.1:{new_port}"]
    await _edit_and_reload(d, "sighup", doc)
    status, _ = await get(f"http://127.0.0.1:{new_port}/x")
    assert status == 200
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(f"http://127.0.0.1:{old_port}/x")
    d.port = new_port
    rc, out, _ = await cli("status", "--config", str(d.config), "--json")
    assert rc == 0
    assert f"127.0.0.1:{new_port}" in out


async def test_drain_deadline_closes_long_streams(upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    opened = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        opened.set()
        for i in range(600):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.1)
        return resp

    upstream.handlers["/events"] = endless
    d: DaemonProc = daemon_factory(api_config(upstream.url, timeouts={"drain": 1}))
    await d.start()
    got: list[bytes] = []

    async def listen() -> None:
        async with aiohttp.ClientSession() as s, s.get(d.url + "/events") as r:
            async for chunk in r.content.iter_any():
                got.append(chunk)

    reader = asyncio.create_task(listen())
    await asyncio.wait_for(opened.wait(), 5)
    await asyncio.sleep(0.3)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    d.signal(signal.SIGTERM)
    assert await d.wait(15) == 0
    elapsed = loop.time() - t0
    assert 0.8 <= elapsed < 8, elapsed  # waited for the drain deadline, then closed the stream
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        await asyncio.wait_for(reader, 5)
    assert b"data: 0\n\n" in b"".join(got)


async def test_second_sigterm_exits_at_once(upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    started = asyncio.Event()
    upstream.handlers["/slow"] = slow_handler(started, 20)
    d: DaemonProc = daemon_factory(api_config(upstream.url, timeouts={"drain": 30}))
    await d.start()
    task = asyncio.create_task(get(d.url + "/slow"))
    await asyncio.wait_for(started.wait(), 5)
    d.signal(signal.SIGTERM)
    await d.wait_for_event("broker.stopping")
    d.signal(signal.SIGTERM)
    assert await d.wait(5) == 1
    task.cancel()


async def test_hardening_applied(upstream: Upstream, daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    ready = await d.start()
    if sys.platform.startswith("linux"):
        assert ready["hardening"] == {"umask_077": True, "no_core_dumps": True, "not_dumpable": True}
        limits = Path(f"/proc/{ready['pid']}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"]


@pytest.fixture
def request_cleanup() -> Iterator[Callable[[Path], None]]:
    paths: list[Path] = []
    yield paths.append
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=0", "--clear-groups", sys.executable, "-c"]
CLIENT = """
import sys, json, socket, http.client
kind, target = sys.argv[1], sys.argv[2]
if kind == "unix":
    class C(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX); self.sock.connect(target)
    conn = C("localhost")
else:
    conn = http.client.HTTPConnection("127.0.0.1", int(target))
try:
    host = "localhost" if kind == "unix" else f"127.0.0.1:{target}"
    conn.request("GET", "/api/v1/cards", headers={"Host": host})
    r = conn.getresponse()
    print(json.dumps({"status": r.status, "error": r.getheader("X-Broker-Error")}))
except OSError as e:
    print(json.dumps({"status": None, "oserror": e.errno}))
"""


async def as_other_uid(kind: str, target: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        *AS_NOBODY, CLIENT, kind, target, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    import json

    result: dict[str, Any] = json.loads(out)
    return result


@needs_root
async def test_other_users_refused_on_tcp_and_unix(
    upstream: Upstream, daemon_factory: Any, request_cleanup: Any
) -> None:
    store_key(TEST_KEY)
    # pytest's tmp dirs are 0700: the other uid must be able to reach the socket's directory
    run_dir = Path(tempfile.mkdtemp(prefix="acb-sock-"))
    run_dir.chmod(0o755)
    request_cleanup(run_dir)
    sock = run_dir / "broker.sock"
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    doc = yaml.safe_load(d.config.read_text())
    doc["listen"] = [f"127.0.0.1:{d.port}", f"unix:{sock}"]
    doc["socket_mode"] = "0660"  # group root may connect: only the uid check stands in the way
    d.config.write_text(yaml.safe_dump(doc))
    await d.start()
    assert (sock.stat().st_mode & 0o777) == 0o660

    tcp = await as_other_uid("tcp", str(d.port))
    assert tcp == {"status": 403, "error": "peer_not_allowed"}
    unix = await as_other_uid("unix", str(sock))
    assert unix == {"status": 403, "error": "peer_not_allowed"}
    assert upstream.seen == []
    # this user is let in on both
    status, _ = await get(d.url + "/api/v1/cards")
    assert status == 200
    conn = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://localhost/api/v1/cards") as r:
        assert r.status == 200

    # with the default 0600 socket another uid cannot even connect
    doc["socket_mode"] = "0600"
    doc["listen"] = [f"127.0.0.1:{d.port}", f"unix:{run_dir / 'b2.sock'}"]
    await _edit_and_reload(d, "sighup", doc)
    blocked = await as_other_uid("unix", str(run_dir / "b2.sock"))
    assert blocked["status"] is None and blocked["oserror"] == 13  # EACCES
    # allowing the uid in the config lets it through
    doc["allowed_uids"] = ["self", 65534]
    await _edit_and_reload(d, "sighup", doc)
    assert (await as_other_uid("tcp", str(d.port)))["status"] == 200
