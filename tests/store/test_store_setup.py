"""Setting a shared store up: `set-key store` keeps the Redis password, a store that cannot open
answers `store_unavailable` naming the fix (never the password), and a reload after the fix
opens it. Real redis-server with a password, real keyring file backend, in-process daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keyring
import pytest

from broker import config as config_mod
from broker.auth.route_secret import RouteSecretError, set_route_secret
from tests.conftest import BrokerFactory, write_config
from tests.redis_server import RedisServer

PASSWORD = "FAKEredisPassw0rd-for-tests"


def doc_for(url: str, password: str = "keyring", **extra: Any) -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:0"],
        "store": {"url": url, "password": password},
        "routes": [
            {
                "name": "api",
                "prefix": "/api",
                "upstream": "http://127.0.0.1:9",
                "auth": {"type": "api_key", "key": "env:NO_SUCH_KEY_HERE"},
                "policy": {"rate": {"requests": 5, "per": "1m"}},
            }
        ],
        "allow_insecure_upstream": True,
        **extra,
    }


@pytest.fixture
def locked_redis(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path / "redis", password=PASSWORD)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_set_key_store_keeps_the_redis_password(tmp_path: Path) -> None:
    cfg = config_mod.load(write_config(tmp_path / "c.yaml", doc_for("redis://127.0.0.1:1/0")))
    said = set_route_secret(cfg, "store", lambda prompt: PASSWORD + "\n")
    assert keyring.get_password("agentcard-broker", "store:redis_password") == PASSWORD
    assert all(PASSWORD not in line.text for line in said)
    assert "Redis password" in said[-1].text


@pytest.mark.parametrize(
    ("store", "words"),
    [
        ("sqlite", "is not Redis"),
        ({"url": "redis://127.0.0.1:1/0", "password": "env:REDIS_PW"}, "from env:REDIS_PW"),
        ({"url": "redis://127.0.0.1:1/0"}, "nowhere"),
    ],
)
def test_set_key_store_refuses_where_it_would_not_be_read(tmp_path: Path, store: Any, words: str) -> None:
    doc = doc_for("redis://127.0.0.1:1/0") | {"store": store}
    cfg = config_mod.load(write_config(tmp_path / "c.yaml", doc))
    asked: list[str] = []
    with pytest.raises(RouteSecretError, match=words):
        set_route_secret(cfg, "store", lambda prompt: asked.append(prompt) or PASSWORD)
    assert asked == []  # refused before asking
    assert keyring.get_password("agentcard-broker", "store:redis_password") is None


async def test_missing_password_refuses_then_set_key_and_reload_serve(
    make_broker: BrokerFactory, locked_redis: RedisServer
) -> None:
    b = await make_broker(doc_for(locked_redis.url))
    async with b.request("GET", "/api/x") as r:
        body = await r.json()
        assert r.status == 503 and r.headers["X-Broker-Error"] == "store_unavailable"
    assert "agentcard-broker set-key store" in body["error"]["message"]
    async with b.request("GET", "/_broker/status") as r:
        store = (await r.json())["store"]
    assert store["ok"] is False and "set-key store" in store["error"]
    async with b.request("GET", "/_broker/metrics") as r:
        assert "agentcard_broker_store_up 0\n" in await r.text()
    # the password, now stored, and a reload: the store opens and the route counts in Redis
    keyring.set_password("agentcard-broker", "store:redis_password", PASSWORD)
    await b.daemon.rt.reload("test")
    await b.daemon.rt.check_store()
    async with b.request("GET", "/api/x") as r:
        assert r.headers.get("X-Broker-Error") != "store_unavailable"  # on to the (absent) key
    async with b.request("GET", "/_broker/status") as r:
        assert (await r.json())["store"]["ok"] is True
    async with b.request("GET", "/_broker/metrics") as r:
        assert "agentcard_broker_store_up 1\n" in await r.text()


async def test_a_wrong_password_is_a_clear_refusal_without_the_password(
    make_broker: BrokerFactory, locked_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_PW", "FAKEwrongPassw0rd")
    b = await make_broker(doc_for(locked_redis.url, password="env:REDIS_PW"))
    await b.daemon.rt.check_store()
    async with b.request("GET", "/api/x") as r:
        text = await r.text()
        assert r.status == 503 and r.headers["X-Broker-Error"] == "store_unavailable"
    assert "refused the login" in text and "FAKEwrongPassw0rd" not in text and PASSWORD not in text


async def test_a_peer_that_echoes_is_not_taken_for_redis(tmp_path: Path) -> None:
    """What a client socket connected to itself does (TCP simultaneous open on a port Redis has
    left): every byte sent comes back. That is not a healthy store, and nothing is stored there."""
    import asyncio

    from broker.auth.secret_store import FileStore
    from broker.config import RedisSettings
    from broker.store import StoreError
    from broker.store.base import Grant
    from broker.store.redis import RedisStore

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = await RedisStore.open(
        RedisSettings(f"redis://127.0.0.1:{port}/0"), FileStore(tmp_path / "s.json")
    )
    try:
        with pytest.raises(StoreError, match=r"PONG|PING"):
            await store.ping()
        with pytest.raises(StoreError):
            await store.put_grant(Grant("mcp", "c", "u", '{"access_token": "at_FAKE"}', "active"))
    finally:
        await store.close()
        server.close()


async def test_check_reaches_the_store_and_names_the_fix(tmp_path: Path, locked_redis: RedisServer) -> None:
    from tests.e2e.conftest import cli

    path = write_config(tmp_path / "c.yaml", doc_for(locked_redis.url))
    code, out, err = await cli("check", "--config", str(path))
    assert code == 1
    assert f"state store: redis {locked_redis.url}: a problem" in out
    assert "store:" in err and "agentcard-broker set-key store" in err
    code, out, err = await cli("set-key", "store", "--stdin", "--config", str(path), stdin=PASSWORD.encode())
    assert code == 0, (out, err)
    code, out, err = await cli("check", "--config", str(path), "--json")
    doc = json.loads(out)
    assert doc["store"] == {"place": f"redis {locked_redis.url}", "problem": None}
    # what is left is the route's own key (an env: reference this test never sets)
    assert code == 1 and [p for p in doc["problems"] if ": store:" in p] == [], doc["problems"]
    assert PASSWORD not in out + err
