"""The files for running replicas (docs/deploy.md): the systemd template unit, and deploy/ (the
compose file, the replicas' config, nginx, Redis's ACL), each checked by what reads it: systemd,
the broker's own config loader, and a real redis-server with the ACL the compose file gives it."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
import yaml

from broker import config as config_mod
from broker.auth.secret_store import KeyringStore
from broker.config import RedisSettings, SecretRef
from broker.store.base import ConnectRecord, Grant
from broker.store.redis import RedisStore
from tests.redis_server import _free_port, redis_server_binary
from tests.service.test_units import needs_systemd, verify

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
TEMPLATE = REPO / "systemd" / "agentcard-broker@.service"
USER_UNIT = REPO / "systemd" / "agentcard-broker.service"
REPLICAS = ("broker-1", "broker-2", "broker-3")
TOKENS = '{"access_token": "at_FAKEaccess0123", "refresh_token": "rt_FAKErefresh0123"}'


def compose() -> dict[str, Any]:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def deploy_config(tmp_path: Path) -> config_mod.Config:
    """deploy/config.yaml through the broker's loader (a copy: the loader wants it 0600 and ours)."""
    path = tmp_path / "config.yaml"
    shutil.copy(DEPLOY / "config.yaml", path)
    path.chmod(0o600)
    return config_mod.load(path)


# ---------------------------------------------------------------- systemd: several replicas on one host


@needs_systemd
@pytest.mark.parametrize("name", ["agentcard-broker@.service", "agentcard-broker@8765.service"])
def test_template_unit_verifies(tmp_path: Path, name: str) -> None:
    home = tmp_path / "h"
    exe = home / ".local" / "bin" / "agentcard-broker"  # what %h/.local/bin/agentcard-broker names
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / name  # the template itself, and one instance of it (%i = 8765)
    shutil.copy(TEMPLATE, unit)
    r = verify(unit, home, user=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def _section(text: str, name: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("["):
            inside = line == f"[{name}]"
        elif inside and line and not line.startswith("#"):
            lines.append(line)
    return lines


def test_template_unit_runs_each_replica_as_the_user_unit_runs_the_broker() -> None:
    """Same notify, watchdog, restart and sandboxing lines as the user unit (a change there must
    come here too); only the config file and the per-instance directories differ."""
    template, user = TEMPLATE.read_text(), USER_UNIT.read_text()
    per_instance = ("ExecStart=", "StateDirectory=", "RuntimeDirectory=")
    shared = [line for line in _section(user, "Service") if not line.startswith(per_instance)]
    assert [line for line in _section(template, "Service") if not line.startswith(per_instance)] == shared
    exec_start = next(line for line in _section(user, "Service") if line.startswith("ExecStart="))
    assert exec_start.endswith("/config.yaml")
    assert exec_start.replace("/config.yaml", "/replica-%i.yaml") in _section(template, "Service")
    for key in ("StateDirectory", "RuntimeDirectory"):  # systemd removes a RuntimeDirectory on stop
        assert f"{key}=agentcard-broker/replica-%i" in _section(template, "Service")
    assert _section(template, "Install") == _section(user, "Install")
    assert "%i" in next(line for line in _section(template, "Unit") if line.startswith("Description="))


# ---------------------------------------------------------------- deploy/: compose, config, nginx


def test_compose_file_runs_three_replicas_of_one_image_beside_redis_and_nginx() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {*REPLICAS, "redis", "proxy"}
    replica = services["broker-1"]
    assert all(services[name] == replica for name in REPLICAS)
    assert (DEPLOY / replica["build"]["context"] / replica["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    )
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    config_in_container = re.search(r"AGENTCARD_BROKER_CONFIG=(\S+)", dockerfile)
    assert config_in_container, "the Dockerfile names the config every command finds"
    assert f"./config.yaml:{config_in_container.group(1)}:ro" in replica["volumes"]
    # every file the services mount from deploy/ is there (secrets/ and certs/ are the operator's)
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./") and source not in ("./certs", "./acme"):
                assert (DEPLOY / source).is_file(), source
    for service in services.values():
        assert set(service.get("secrets", [])) <= set(doc["secrets"])
    assert "redis_admin_password" not in replica["secrets"]  # Redis's administrator, not the broker
    # only nginx is published; Redis shares a network with the replicas alone, and it has no way out
    assert [name for name, s in services.items() if "ports" in s] == ["proxy"]
    assert services["redis"]["networks"] == ["store"]
    assert doc["networks"]["store"] == {"internal": True}
    assert {name for name, s in services.items() if "store" in s["networks"]} == {*REPLICAS, "redis"}
    entry = services["redis"]["entrypoint"]
    assert entry[-1] == "/usr/local/bin/redis-entrypoint.sh"
    assert "./redis-entrypoint.sh:/usr/local/bin/redis-entrypoint.sh:ro" in services["redis"]["volumes"]


def test_deploy_config_loads_and_agrees_with_compose_and_nginx(tmp_path: Path) -> None:
    cfg = deploy_config(tmp_path)
    doc = compose()
    replica, proxy = doc["services"]["broker-1"], doc["services"]["proxy"]
    assert cfg.store == "redis" and cfg.redis is not None
    # the Redis it names is the compose service, with the ACL user and key prefix Redis is given
    assert re.fullmatch(r"redis://redis:\d+/0", cfg.redis.url)
    entrypoint = (DEPLOY / "redis-entrypoint.sh").read_text()
    assert cfg.redis.username == "broker" and "user broker on " in entrypoint
    assert f"PREFIX=${{BROKER_KEY_PREFIX:-{cfg.redis.prefix}}}" in entrypoint
    # the secrets it reads are the docker secrets the replicas get
    for ref in (cfg.redis.password, cfg.redis.master_key):
        assert ref is not None and ref.kind == "file"
        assert ref.name.startswith("/run/secrets/")
        assert ref.name.removeprefix("/run/secrets/") in replica["secrets"]
    # listening beyond loopback, with a state dir that is the container's tmpfs
    assert cfg.allow_remote and [str(x) for x in cfg.listen] == ["0.0.0.0:8765"]
    assert cfg.secret_store == "file"
    assert any(t.startswith(f"{cfg.state_dir}:uid=10001") for t in replica["tmpfs"])
    # the Host names: the CLI inside a replica sends the first; the platform calls nginx's alias
    assert cfg.allowed_hosts[0] == "127.0.0.1"
    (alias,) = proxy["networks"]["platform"]["aliases"]
    assert alias in cfg.allowed_hosts
    assert cfg.clients and cfg.public_url == "https://broker.example.com"
    # nginx: the public site is public_url's host; the internal one listens on the replicas' port
    # (a replica admits Host only as NAME:ITS_OWN_PORT) under the alias; the upstreams are the replicas
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert f"server_name {cfg.public_url.removeprefix('https://')};" in nginx
    assert f"listen {cfg.listen[0].port};\n    server_name {alias};" in nginx
    assert re.findall(r"server (\S+) resolve", nginx) == [f"{name}:{cfg.listen[0].port}" for name in REPLICAS]
    # compose waits for the drain (timeouts.drain) and 15 s more, as the systemd units do
    assert replica["stop_grace_period"] == f"{int(cfg.timeouts.drain) + 15}s"


# ---------------------------------------------------------------- Redis: the ACL lets the broker do its work


class AclRedis:
    """redis-server started the way the compose file starts it: through deploy/redis-entrypoint.sh,
    which writes the ACL file from the two password files. Here the image's own entrypoint is a
    shim that runs this machine's redis-server."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.broker_pw, self.admin_pw = tmp / "redis_password", tmp / "redis_admin_password"
        self.broker_pw.write_text("pw_FAKEbroker0123456789abcdef\n")  # a newline, as `openssl rand` writes
        self.admin_pw.write_text("pw_FAKEadmin0123456789abcdef\n")
        for f in (self.broker_pw, self.admin_pw):
            f.chmod(0o600)
        self.acl = tmp / "run" / "users.acl"
        bin_dir, self.data = tmp / "bin", tmp / "data"
        bin_dir.mkdir()
        self.data.mkdir()
        shim = bin_dir / "docker-entrypoint.sh"
        shim.write_text(f'#!/bin/sh\nshift\nexec {redis_server_binary()} "$@"\n')  # $1 is `redis-server`
        shim.chmod(0o755)
        env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "REDIS_PASSWORD_FILE": str(self.broker_pw),
            "REDIS_ADMIN_PASSWORD_FILE": str(self.admin_pw),
            "REDIS_ACL_FILE": str(self.acl),
        }
        # fmt: off
        args = ["sh", str(DEPLOY / "redis-entrypoint.sh"),
                "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data),
                "--save", "", "--daemonize", "no", "--logfile", "redis.log"]
        # fmt: on
        self.process = subprocess.Popen(args, env=env, cwd=self.data, stdin=subprocess.DEVNULL)
        self.admin = redis_sync.Redis(port=self.port, password=self.admin_pw.read_text().strip())
        deadline = time.monotonic() + 10
        while True:
            try:
                self.admin.ping()
                return
            except redis_sync.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log = self.data / "redis.log"
                    self.stop()
                    pytest.fail(f"redis did not start: {log.read_text() if log.exists() else ''}")
                time.sleep(0.01)

    def stop(self) -> None:
        self.admin.close()
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[AclRedis]:
    server = AclRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()


async def exercise(store: RedisStore) -> None:
    """Every call of the store and of the shared counters, each once, as replicas make them."""
    await store.ping()
    assert await store.add_client("librechat", "a" * 64)
    assert await store.client_for_token_hash("a" * 64) == "librechat"
    assert [c.name for c in await store.list_clients()] == ["librechat"]
    await store.put_grant(Grant("mcp", "librechat", "alice", tokens=TOKENS, state="active", expires_at=2e9))
    got = await store.get_grant("mcp", "librechat", "alice")
    assert got is not None and got.tokens == TOKENS
    await store.touch_grant("mcp", "librechat", "alice", time.time())
    assert await store.replace_grant(replace(got, state="dead"), got.version)
    assert [g.state for g in await store.list_grants()] == ["dead"]
    assert await store.count_grants("mcp") == {"dead": 1}
    await store.put_connect("cn_FAKE0123456789", ConnectRecord("mcp", "librechat", "bob", "Bob"), 60)
    assert await store.take_connect("cn_FAKE0123456789") is not None
    assert await store.acquire_lease("refresh:alice", "replica-1", 5)
    await store.release_lease("refresh:alice", "replica-1")
    assert await store.put_doc("registration:mcp", '{"client_id": "c1"}', only_new=True)
    assert await store.get_doc("registration:mcp") == '{"client_id": "c1"}'
    assert await store.delete_doc("registration:mcp")
    spend = await store.reserve_budget("mcp|librechat|alice", 300, 1000, 3600)
    assert spend.ok
    await store.refund_budget("mcp|librechat|alice", spend.entry)
    assert await store.budget_used("mcp|librechat|alice", 3600) == 0
    assert await store.hit_rate("mcp|librechat|alice", 60, 60) == 0.0
    assert await store.delete_grant("mcp", "librechat", "alice")
    assert await store.remove_client("librechat")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sh and sha256sum, as in the image")
def test_redis_acl_lets_the_store_do_all_its_work_and_nothing_else(
    acl_redis: AclRedis, tmp_path: Path
) -> None:
    # the ACL file holds hashes: neither password is in it
    acl = acl_redis.acl.read_text()
    for pw in (acl_redis.broker_pw, acl_redis.admin_pw):
        assert pw.read_text().strip() not in acl
    master_key = tmp_path / "master_key"
    master_key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    master_key.chmod(0o600)
    settings = RedisSettings(
        f"redis://127.0.0.1:{acl_redis.port}/0",
        username="broker",
        password=SecretRef("file", str(acl_redis.broker_pw)),
        master_key=SecretRef("file", str(master_key)),
    )

    async def run() -> None:
        store = await RedisStore.open(settings, KeyringStore())
        try:
            await exercise(store)
            acl_redis.admin.script_flush()  # as after a Redis restart: the scripts are loaded again
            await exercise(store)
        finally:
            await store.close()

    asyncio.run(run())
    # nothing the broker sent was refused; CLIENT SETINFO (the client naming itself, Redis 7.2+)
    # may be, and the client ignores that
    refused = [e for e in acl_redis.admin.acl_log() if e["object"] != "client|setinfo"]
    assert refused == []
    # and the broker's user can do nothing else: no other command, no other key, no admin
    broker = redis_sync.Redis(
        port=acl_redis.port, username="broker", password=acl_redis.broker_pw.read_text().strip()
    )
    try:
        for command in (broker.flushall, lambda: broker.config_get("*"), lambda: broker.get("other-app:key")):
            with pytest.raises(redis_sync.exceptions.NoPermissionError):
                command()
    finally:
        broker.close()
    with pytest.raises(redis_sync.exceptions.AuthenticationError):
        redis_sync.Redis(port=acl_redis.port, password=acl_redis.broker_pw.read_text().strip()).ping()
    config = acl_redis.admin.config_get("maxmemory-policy") | acl_redis.admin.config_get("appendonly")
    assert config == {"maxmemory-policy": "noeviction", "appendonly": "yes"}
