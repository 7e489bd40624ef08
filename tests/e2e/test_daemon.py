"""The daemon as users run it: `agentcard-broker run` in a subprocess, the CLI beside it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import keyring
import yaml
from aiohttp import web

from tests.conftest import LIVE_KEY, TEST_KEY, Upstream, api_config, assert_no_secret, store_key, write_config
from tests.e2e.conftest import CLI, DaemonProc, cli, free_port


async def get(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url, **kw) as r:
        return r.status, dict(r.headers), await r.read()


async def test_set_key_stores_and_prints_mode_never_the_key(
    tmp_path: Path, upstream: Upstream, daemon_factory: Any
) -> None:
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    rc, out, err = await cli(
        "set-key", "api", "--config", str(d.config), "--stdin", stdin=TEST_KEY.encode() + b"\n"
    )
    assert rc == 0, err
    assert "test-mode" in out
    assert_no_secret(out, err)
    assert keyring.get_password("agentcard-broker", "api") == TEST_KEY

    rc, out, err = await cli(
        "set-key", "api", "--config", str(d.config), "--stdin", stdin=b"not-a-key-123456789"
    )
    assert rc == 1
    assert "sk_test_" in err and "nothing stored" in err
    assert "not-a-key-123456789" not in out + err
    assert keyring.get_password("agentcard-broker", "api") == TEST_KEY  # the bad value changed nothing

    rc, out, err = await cli("set-key", "api", "--config", str(d.config), "--stdin", stdin=LIVE_KEY.encode())
    assert rc == 0
    assert "live-mode" in out
    assert "allow_live" in err
    assert_no_secret(out, err)

    rc, _, err = await cli("set-key", "nope", "--config", str(d.config), "--stdin", stdin=TEST_KEY.encode())
    assert rc == 1 and "no route named 'nope'" in err


async def test_check_names_the_fix_and_the_place(upstream: Upstream, daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    rc, out, err = await cli("check", "--config", str(d.config))
    assert rc == 1
    assert "routes[0].auth" in err
    assert "run: agentcard-broker set-key api" in err
    store_key(TEST_KEY)
    rc, out, err = await cli("check", "--config", str(d.config))
    assert rc == 0, err
    assert "test-mode key (keyring)  yes" in out
    rc, out, err = await cli("check", "--config", str(d.config), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["ok"] is True
    assert doc["routes"][0]["credential"] == "test-mode key (keyring)"
    assert_no_secret(out, err)

    bad = d.config.parent / "bad.yaml"
    bad.write_text(
        "listen: [0.0.0.0:8765]\nroutes:\n  - name: api\n    prefix: /\n    upstream: http://x\n"
        f"    auth: {{type: api_key, key: {TEST_KEY}}}\n    extra: 1\n"
    )
    bad.chmod(0o600)
    rc, out, err = await cli("check", "--config", str(bad))
    assert rc == 1
    assert f"{bad}:1: listen[0]:" in err
    assert f"{bad}:5: routes[0].upstream:" in err
    assert f"{bad}:6: routes[0].auth.key:" in err
    assert f"{bad}:7: routes[0].extra: unknown key" in err
    assert "Traceback" not in err
    assert_no_secret(out, err)


async def test_status_exits_1_when_not_running(upstream: Upstream, daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    rc, _out, err = await cli("status", "--config", str(d.config))
    assert rc == 1
    assert "not running" in err


async def test_run_forward_status_and_live_key_pickup(upstream: Upstream, daemon_factory: Any) -> None:
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    ready = await d.start()
    assert ready["listen"] == [f"127.0.0.1:{d.port}"]

    status, headers, body = await get(d.url + "/api/v1/cards")
    assert status == 503
    assert headers["X-Broker-Error"] == "no_credential"
    assert "agentcard-broker set-key api" in json.loads(body)["error"]["message"]
    assert upstream.seen == []

    # set-key while the daemon runs: used at once, no restart
    rc, out, err = await cli("set-key", "api", "--config", str(d.config), "--stdin", stdin=TEST_KEY.encode())
    assert rc == 0, err
    assert "the running daemon picked it up" in out
    status, headers, body = await get(
        d.url + "/api/v1/cards?limit=2", headers={"Authorization": "Bearer nope"}
    )
    assert status == 200
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}"
    assert upstream.seen[-1].raw_path == "/api/v1/cards?limit=2"

    rc, out, err = await cli("status", "--config", str(d.config), "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["routes"][0]["state"] == "ready"
    assert doc["routes"][0]["mode"] == "test"
    assert doc["routes"][0]["requests"] == 2
    rc, out, err = await cli("status", "--config", str(d.config))
    assert rc == 0
    assert "api" in out and "ready" in out and "test" in out

    # start-up's objects are frozen out of the collector's walks; pauses are timed
    status, _, body = await get(d.url + "/_broker/metrics")
    metrics = dict(
        line.rsplit(" ", 1) for line in body.decode().splitlines() if line.startswith("agentcard_broker_gc_")
    )
    assert int(metrics["agentcard_broker_gc_frozen_objects"]) > 10_000
    assert float(metrics['agentcard_broker_gc_pause_seconds_max{generation="0"}']) > 0
    assert 'agentcard_broker_gc_collections_total{generation="2"}' in metrics

    await d.stop()
    assert d.proc and d.proc.returncode == 0
    assert_no_secret(d.stderr)
    audit = [e for e in d.events() if e.get("event") == "request"]
    assert [a["status"] for a in audit] == [503, 200]


async def test_status_right_after_set_key_shows_the_new_credential(
    upstream: Upstream, daemon_factory: Any
) -> None:
    """`set-key` tells the running daemon, which reads the store before it answers: a `status`
    asked next shows the new key, with no agent request in between to trigger a read."""
    platform = {
        "name": "platform",
        "prefix": "/api/v2",
        "upstream": upstream.url + "/api/v2",
        "auth": {
            "type": "client_credentials",
            "token_url": upstream.url + "/api/v2/oauth/token",
            "client_id": "test_client_1",
            "client_secret": "keyring",
        },
    }
    api = {"name": "api", "prefix": "/", "upstream": upstream.url, "auth": {"type": "api_key"}}
    d: DaemonProc = daemon_factory(api_config(upstream.url, routes=[api, platform]))
    await d.start()

    async def states() -> dict[str, tuple[str, str | None]]:
        rc, out, err = await cli("status", "--config", str(d.config), "--json")
        assert rc == 0, err
        return {r["name"]: (r["state"], r["mode"]) for r in json.loads(out)["routes"]}

    assert await states() == {"api": ("no_credential", None), "platform": ("no_credential", None)}
    rc, out, err = await cli("set-key", "api", "--config", str(d.config), "--stdin", stdin=TEST_KEY.encode())
    assert rc == 0, err
    assert "the running daemon picked it up" in out
    assert await states() == {"api": ("ready", "test"), "platform": ("no_credential", None)}
    rc, out, err = await cli(
        "set-key", "platform", "--config", str(d.config), "--stdin", stdin=b"acs_FAKEclientSecret0123456789"
    )
    assert rc == 0, err
    assert await states() == {"api": ("ready", "test"), "platform": ("ready", None)}
    assert upstream.seen == []  # no token was minted, no request forwarded: the store was read
    assert_no_secret(d.stderr)


async def test_sigterm_drains_in_flight_requests(upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        started.set()
        await asyncio.sleep(1.0)
        return web.json_response({"done": True})

    upstream.handlers["/slow"] = slow
    d: DaemonProc = daemon_factory(api_config(upstream.url))
    await d.start()
    in_flight = asyncio.create_task(get(d.url + "/slow"))
    await asyncio.wait_for(started.wait(), 5)
    d.signal(signal.SIGTERM)
    status, _, body = await in_flight
    assert status == 200
    assert json.loads(body) == {"done": True}
    assert await d.wait() == 0
    names = [e.get("event") for e in d.events()]
    assert "broker.stopping" in names and "broker.stopped" in names


async def test_sighup_reload_and_invalid_edit_keeps_old_config(
    upstream: Upstream, daemon_factory: Any
) -> None:
    store_key(TEST_KEY)
    store_key(TEST_KEY + "v2", "v2")
    doc = api_config(upstream.url)
    d: DaemonProc = daemon_factory(doc)
    await d.start()
    status, _, _ = await get(d.url + "/v2/x")
    assert upstream.seen[-1].raw_path == "/v2/x"  # the catch-all route, before the reload
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}"

    new = yaml.safe_load(d.config.read_text())
    new["routes"].insert(
        0, {"name": "v2", "prefix": "/v2", "upstream": upstream.url + "/base", "auth": {"type": "api_key"}}
    )
    d.config.write_text(yaml.safe_dump(new))
    mark = len(d.events())
    d.signal(signal.SIGHUP)
    await d.wait_for_event("config.reloaded", after=mark)
    status, _, _ = await get(d.url + "/v2/x")
    assert status == 200
    assert upstream.seen[-1].raw_path == "/base/x"
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}v2"

    # an invalid edit: refused, logged, shown by status; the old config stays in force
    d.config.write_text(d.config.read_text() + "bogus_key: 1\n")
    mark = len(d.events())
    d.signal(signal.SIGHUP)
    ev = await d.wait_for_event("config.rejected", after=mark)
    assert any("bogus_key: unknown key" in line for line in ev["errors"])
    status, _, _ = await get(d.url + "/v2/y")
    assert status == 200
    assert upstream.seen[-1].raw_path == "/base/y"
    _rc, out, _ = await cli("status", "--config", str(d.config), "--json")
    assert "bogus_key" in json.loads(out)["config"]["error"]


async def test_run_refuses_bad_config_with_exit_78(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "routes:\n  - name: api\n    prefix: /\n    upstream: https://a.example\n"
        f"    auth: {{type: api_key, key: {TEST_KEY}}}\n"
    )
    cfg.chmod(0o600)
    rc, out, err = await cli("run", "--config", str(cfg))
    assert rc == 78
    assert "routes[0].auth.key" in err
    assert_no_secret(out, err)
    cfg.chmod(0o666)
    rc, out, err = await cli("run", "--config", str(cfg))
    assert rc == 78
    assert "chmod go-w" in err


FAIL_ONE_IMPORT = """
import importlib.abc, sys

class FailOnce(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "broker.auth.api_key":  # imported when run builds the route's credential
            sys.meta_path.remove(self)
            raise ImportError("a module imported inside run is missing", name=name)
        return None

sys.meta_path.insert(0, FailOnce())
from broker.cli import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


async def test_an_import_error_inside_run_is_not_a_second_start(upstream: Upstream, tmp_path: Path) -> None:
    """Only the import of the optional uvloop falls back to asyncio: an ImportError from inside
    the daemon is a fault that ends `run`, not a reason to start the daemon again."""
    cfg = write_config(
        tmp_path / "c.yaml", {**api_config(upstream.url), "listen": [f"127.0.0.1:{free_port()}"]}
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FAIL_ONE_IMPORT, str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr
    lines: list[str] = []
    try:
        while line := await asyncio.wait_for(proc.stderr.readline(), 30):
            lines.append(line.decode())
            assert "broker.ready" not in lines[-1], "the daemon was started again:\n" + "".join(lines)
        rc = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = "".join(lines)
    assert rc == 1, err
    assert err.count("ImportError: a module imported inside run is missing") == 1, err


async def test_port_in_use_is_a_clear_error(upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    first: DaemonProc = daemon_factory(api_config(upstream.url))
    await first.start()
    doc = yaml.safe_load(first.config.read_text())
    second_cfg = first.config.parent / "second.yaml"
    second_cfg.write_text(yaml.safe_dump(doc))
    second_cfg.chmod(0o600)
    second = DaemonProc(second_cfg, first.port)
    second.proc = await asyncio.create_subprocess_exec(
        "agentcard-broker", "run", "--config", str(second_cfg), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(second.proc.communicate(), 20)
    assert second.proc.returncode == 1
    assert "broker.listen_failed" in err.decode()
    assert f"127.0.0.1:{first.port}" in err.decode()


async def test_unix_socket_listener(tmp_path: Path, upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    sock = tmp_path / "run" / "broker.sock"
    doc = api_config(upstream.url)
    d: DaemonProc = daemon_factory(doc)
    raw = yaml.safe_load(d.config.read_text())
    raw["listen"] = [f"unix:{sock}", f"127.0.0.1:{free_port()}"]
    d.config.write_text(yaml.safe_dump(raw))
    ready = await d.start()
    assert f"unix:{sock}" in ready["listen"]
    assert (sock.stat().st_mode & 0o777) == 0o600
    conn = aiohttp.UnixConnector(path=str(sock))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://localhost/api/v1/cards") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}"
    rc, _out, err = await cli("status", "--config", str(d.config), "--json")
    assert rc == 0, err
    await d.stop()
    # a path that is not a socket is never replaced
    sock.write_text("precious")
    d2 = DaemonProc(d.config, 0)
    d2.proc = await asyncio.create_subprocess_exec(
        "agentcard-broker", "run", "--config", str(d.config), stderr=asyncio.subprocess.PIPE
    )
    _, err_b = await asyncio.wait_for(d2.proc.communicate(), 20)
    assert d2.proc.returncode == 1
    assert "not a socket" in err_b.decode()
    assert sock.read_text() == "precious"


async def test_streams_200mb_through_the_daemon(upstream: Upstream, daemon_factory: Any) -> None:
    store_key(TEST_KEY)
    size = 200 * 1024 * 1024
    chunk = bytes(range(256)) * 256

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        for _ in range(size // len(chunk)):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    upstream.handlers["/big"] = download
    d: DaemonProc = daemon_factory(api_config(upstream.url, log={"level": "info", "format": "json"}))
    ready = await d.start()
    total = 0
    async with aiohttp.ClientSession() as s, s.get(d.url + "/big") as r:
        assert r.status == 200
        async for part in r.content.iter_chunked(1 << 20):
            total += len(part)
    assert total == size
    audit = await d.wait_for_event("request")
    assert audit["bytes_out"] == size
    assert ready["pid"] > 0


async def test_warns_when_its_log_file_sits_in_the_watched_config_dir(
    tmp_path: Path, upstream: Upstream
) -> None:
    """Every line written beside config.yaml wakes the file watcher: say so once, at start."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    elsewhere = tmp_path / "logs"
    elsewhere.mkdir()
    for log_path, warned in ((conf_dir / "broker.log", True), (elsewhere / "broker.log", False)):
        port = free_port()
        cfg = write_config(
            conf_dir / "config.yaml", {**api_config(upstream.url), "listen": [f"127.0.0.1:{port}"]}
        )
        with log_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *CLI, "run", "--config", str(cfg), stderr=err, stdout=asyncio.subprocess.DEVNULL
            )
        try:
            events: list[dict[str, Any]] = []
            for _ in range(300):  # the watcher starts just after ready
                events = [
                    json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")
                ]
                names = [e.get("event") for e in events]
                if "broker.ready" in names and (not warned or "config.watch_busy_dir" in names):
                    break
                await asyncio.sleep(0.05)
            if not warned:
                await asyncio.sleep(0.5)  # time enough for a warning that should not come
                events = [
                    json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")
                ]
            found = [e for e in events if e.get("event") == "config.watch_busy_dir"]
            assert "broker.ready" in [e.get("event") for e in events]
            assert len(found) == (1 if warned else 0), log_path.read_text()
            if warned:
                assert found[0]["log_file"] == "broker.log"
        finally:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
