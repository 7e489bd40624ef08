"""Shared test peers: a recording upstream on 127.0.0.1, an in-process broker, raw HTTP.

Everything here is real: aiohttp servers and clients on loopback, the real keyring package
with its file backend (keyrings.alt) in a per-test data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import keyring
import pytest
import yaml
from aiohttp import web
from keyrings.alt.file import PlaintextKeyring
from multidict import CIMultiDict

from broker import config as config_mod
from broker import logs
from broker.daemon import Daemon
from broker.scrub import SecretSet

TEST_KEY = "sk_test_FAKEkey0123456789abcdefABCDEF"
LIVE_KEY = "sk_live_FAKEkey0123456789abcdefABCDEF"
FILE_BACKEND = "keyrings.alt.file.PlaintextKeyring"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own HOME, XDG dirs and keyring file; nothing leaks between tests."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var, sub in (("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state"), ("XDG_CONFIG_HOME", "config")):
        d = home / sub
        d.mkdir(mode=0o700)
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", FILE_BACKEND)
    monkeypatch.delenv("AGENTCARD_BROKER_CONFIG", raising=False)
    monkeypatch.delenv("AGENTCARD_API_KEY", raising=False)
    keyring.set_keyring(PlaintextKeyring())
    yield home


class Blocked(Exception):
    """Raised by the alarm fixture; not an OSError, so no `except OSError` swallows it."""


@contextlib.contextmanager
def blocked_after(seconds: float) -> Iterator[None]:
    """Raise Blocked in the main thread once `seconds` have passed inside the block."""

    def on_alarm(signum: int, frame: object) -> None:
        raise Blocked(f"blocked for {seconds:g} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def alarm() -> Iterator[None]:
    """Turn a hang (a loop that never ends, an open() that blocks) into a failure after 0.5 s."""
    with blocked_after(0.5):
        yield


def store_key(value: str, route: str = "api") -> None:
    keyring.set_password("agentcard-broker", route, value)


# ---------------------------------------------------------------- upstream


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sse_events(events: list[bytes], gap: float = 0.0, linger: float = 0.0) -> Handler:
    """An upstream handler streaming `events` as text/event-stream, each followed by a `gap` s
    pause, then staying open `linger` s more before it ends."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in events:
            await resp.write(event)
            await asyncio.sleep(gap)
        await asyncio.sleep(linger)
        await resp.write_eof()
        return resp

    return handler


@dataclass
class Upstream:
    """A real aiohttp server that records what it received; handlers per exact path."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    streaming: set[str] = field(default_factory=set)  # paths whose handler reads the body itself
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        body = b"" if path in self.streaming else await request.read()
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body))
        handler = self.handlers.get(path)
        if handler is not None:
            return await handler(request)
        return web.json_response({"ok": True, "path": request.raw_path, "method": request.method})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


# ---------------------------------------------------------------- broker


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


def api_config(upstream_url: str, **top: Any) -> dict[str, Any]:
    auth = top.pop("auth", {"type": "api_key", "key": "keyring"})
    routes = top.pop("routes", [{"name": "api", "prefix": "/", "upstream": upstream_url, "auth": auth}])
    doc: dict[str, Any] = {
        "listen": ["127.0.0.1:0"],
        "allow_insecure_upstream": True,
        "log": {"level": "debug", "format": "json"},
        "routes": routes,
    }
    doc.update(top)
    return doc


@dataclass
class Broker:
    daemon: Daemon
    log_buffer: io.StringIO
    session: aiohttp.ClientSession

    @property
    def port(self) -> int:
        return int(self.daemon.rt.listen_addresses[0].rsplit(":", 1)[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logs(self) -> str:
        return self.log_buffer.getvalue()

    def log_events(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.logs.splitlines() if line.startswith("{")]

    def request(self, method: str, path: str, **kw: Any) -> Any:
        return self.session.request(method, self.url + path, **kw)


BrokerFactory = Callable[..., Awaitable[Broker]]


@pytest.fixture
async def make_broker(tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    started: list[Broker] = []

    async def factory(doc: dict[str, Any]) -> Broker:
        path = write_config(tmp_path / f"config{len(started)}.yaml", doc)
        cfg = config_mod.load(path)
        secrets = SecretSet()
        buf = io.StringIO()
        log_setup = logs.configure(cfg.log.level, cfg.log.format, secrets, stream=buf)
        daemon = await Daemon.start(cfg, secrets, log_setup=log_setup)
        b = Broker(daemon, buf, aiohttp.ClientSession(auto_decompress=False))
        started.append(b)
        return b

    yield factory
    for b in started:
        await b.session.close()
        await b.daemon.stop()


@pytest.fixture
async def broker(make_broker: BrokerFactory, upstream: Upstream) -> Broker:
    store_key(TEST_KEY)
    return await make_broker(api_config(upstream.url))


async def raw_http(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the server closes or answers fully."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), timeout) if length else b""
        return head + body
    finally:
        writer.close()


def assert_no_secret(*texts: str | bytes, secrets: tuple[str, ...] = (TEST_KEY, LIVE_KEY)) -> None:
    for t in texts:
        s = t.decode("utf-8", "replace") if isinstance(t, bytes) else t
        for secret in secrets:
            assert secret not in s, "a secret leaked"
            assert secret[8:] not in s, "the secret part of a key leaked"
