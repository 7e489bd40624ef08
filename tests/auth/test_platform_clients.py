"""Platform clients and their users as the command line manages them: a real SQLite store in
tmp_path, its master key in the keyring file backend."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from broker.auth import platform_clients as pc
from broker.auth.secret_store import KeyringStore
from broker.config import Config, Listen, OAuthAuth, PlatformClient, Route
from broker.store import Grant
from broker.store.sqlite import SqliteStore

AT = "at_FAKEaccess0123456789abcdefABCDEF"
RT = "rt_FAKErefresh0123456789abcdefABCDEF"


def make_config(tmp_path: Path, clients: tuple[str, ...] = ("librechat",), store: str = "sqlite") -> Config:
    route = Route("mcp", "/mcp", "https://mcp.example.test/mcp", OAuthAuth(per_user=True))
    return Config(
        path=str(tmp_path / "config.yaml"),
        listen=(Listen("tcp", "127.0.0.1", 8765),),
        routes=(route,),
        public_url="https://broker.example.test",
        store=store,
        clients=tuple(PlatformClient(n) for n in clients),
        state_dir=str(tmp_path / "state"),
    )


def state_bytes(cfg: Config) -> bytes:
    """Every byte the store keeps: the database file and its WAL beside it."""
    return b"".join(p.read_bytes() for p in sorted(cfg.state_path().glob("state.sqlite3*")))


async def put_grants(cfg: Config, *grants: Grant) -> None:
    store = await SqliteStore.open(pc.state_file(cfg), KeyringStore())
    try:
        for g in grants:
            await store.put_grant(g)
    finally:
        await store.close()


async def client_for(cfg: Config, token: str) -> str | None:
    store = await SqliteStore.open(pc.state_file(cfg), KeyringStore())
    try:
        return await store.client_for_token_hash(pc.token_hash(token))
    finally:
        await store.close()


def test_tokens_are_random_prefixed_and_hashed_with_sha256() -> None:
    a, b = pc.new_token(), pc.new_token()
    assert a != b
    assert a.startswith("acb_") and len(a) == len("acb_") + 43  # 32 random bytes, base64url
    assert pc.token_hash(a) == hashlib.sha256(a.encode()).hexdigest()
    assert len(pc.token_hash(a)) == 64


def test_add_shows_the_token_once_and_the_store_keeps_only_its_hash(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    said = pc.add_client(cfg, "librechat")
    on_stdout = [line.text for line in said if not line.to_stderr]
    assert len(on_stdout) == 1  # the token alone, so `$(agentcard-broker clients add x)` is the token
    token = on_stdout[0]
    assert token.startswith("acb_")
    everything = "\n".join(line.text for line in said)
    assert everything.count(token) == 1
    assert "shown only now" in everything and "Authorization: Bearer <token>" in everything

    kept = state_bytes(cfg)
    assert token.encode() not in kept and token[4:].encode() not in kept
    assert pc.token_hash(token).encode() in kept
    assert asyncio.run(client_for(cfg, token)) == "librechat"  # what the request walk will look up
    assert asyncio.run(client_for(cfg, pc.new_token())) is None


def test_add_refuses_a_name_not_in_the_config_and_a_second_add(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    with pytest.raises(pc.PlatformClientError) as exc:
        pc.add_client(cfg, "openwebui")
    text = str(exc.value)
    assert "no client named 'openwebui' under `clients:`" in text
    assert cfg.path in text and "- name: openwebui" in text
    assert not pc.state_file(cfg).exists()  # a refused add creates nothing

    token = next(line.text for line in pc.add_client(cfg, "librechat") if not line.to_stderr)
    with pytest.raises(pc.PlatformClientError, match=r"already has a token.*clients remove librechat"):
        pc.add_client(cfg, "librechat")
    assert [r.name for r in pc.list_clients(cfg)] == ["librechat"]
    assert asyncio.run(client_for(cfg, token)) == "librechat"  # the refused add replaced nothing


def test_list_shows_names_and_times_never_hashes(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, clients=("librechat", "openwebui"))
    assert pc.list_clients(cfg) == [
        pc.ClientRow("librechat", None, True),
        pc.ClientRow("openwebui", None, True),
    ]
    assert not pc.state_file(cfg).exists()  # listing creates no store and no master key

    token = next(line.text for line in pc.add_client(cfg, "librechat") if not line.to_stderr)
    rows = pc.list_clients(cfg)
    assert [(r.name, r.created_at is not None) for r in rows] == [("librechat", True), ("openwebui", False)]
    doc = json.dumps(pc.clients_doc(rows))
    table = "\n".join("  ".join(row) for row in pc.clients_table(rows))
    for shown in (doc, table):
        assert "librechat" in shown and "openwebui" in shown
        assert pc.token_hash(token) not in shown and token not in shown
    assert pc.clients_doc(rows)[0]["created_at"].endswith("Z")
    assert "no token yet: agentcard-broker clients add openwebui" in table

    # a client dropped from the config keeps its row, marked as refused
    dropped = make_config(tmp_path, clients=())
    assert pc.clients_table(pc.list_clients(dropped))[1][2] == "not under `clients:` in the config: refused"


def test_remove_then_a_second_remove_fails(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    with pytest.raises(pc.PlatformClientError, match="no client named 'librechat' has a token"):
        pc.remove_client(cfg, "librechat")  # no store yet
    assert not pc.state_file(cfg).exists()
    token = next(line.text for line in pc.add_client(cfg, "librechat") if not line.to_stderr)
    assert pc.remove_client(cfg, "librechat") == "client 'librechat' removed: its token no longer works"
    assert asyncio.run(client_for(cfg, token)) is None
    with pytest.raises(pc.PlatformClientError, match="no client named 'librechat' has a token"):
        pc.remove_client(cfg, "librechat")
    # added again: a new token, the old one still dead
    again = next(line.text for line in pc.add_client(cfg, "librechat") if not line.to_stderr)
    assert again != token and asyncio.run(client_for(cfg, token)) is None


def test_users_lists_grants_without_their_tokens(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert pc.list_users(cfg, None) == []  # no store yet
    tokens = json.dumps({"access_token": AT, "refresh_token": RT})
    asyncio.run(
        put_grants(
            cfg,
            Grant("mcp", "librechat", "u-1", tokens, "active", 1_900_000_000.0, 1_800_000_000.0),
            Grant("mcp", "librechat", "u\x1b[2J", tokens, "dead"),
            Grant("old", "librechat", "u-9", tokens, "active"),  # a route since dropped from the config
        )
    )
    everyone = pc.list_users(cfg, None)
    assert [(g.route, g.user, g.state) for g in everyone] == [
        ("mcp", "u\x1b[2J", "dead"),  # the store's order: by route, client, user
        ("mcp", "u-1", "active"),
        ("old", "u-9", "active"),
    ]
    doc = json.dumps(pc.users_doc(everyone))
    table = pc.users_table(everyone)
    text = "\n".join("  ".join(row) for row in table)
    for shown in (doc, text):
        assert AT not in shown and RT not in shown and "FAKE" not in shown
    assert table[0] == ["ROUTE", "CLIENT", "USER", "STATE", "EXPIRES", "LAST USED"]
    assert table[2] == ["mcp", "librechat", "u-1", "active", "2030-03-17T17:46:40Z", "2027-01-15T08:00:00Z"]
    assert table[1] == ["mcp", "librechat", "u\\x1b[2J", "dead", "-", "-"]  # no escape reaches a terminal
    assert pc.users_doc(everyone)[0]["expires_at"] is None

    assert [g.user for g in pc.list_users(cfg, "mcp")] == ["u\x1b[2J", "u-1"]
    assert [g.user for g in pc.list_users(cfg, "old")] == ["u-9"]  # still listed, still revocable
    with pytest.raises(pc.PlatformClientError, match=r"no route named 'nope' in .*\(routes: mcp\)"):
        pc.list_users(cfg, "nope")


def test_revoke_forgets_the_grant_and_a_second_revoke_fails(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    with pytest.raises(pc.PlatformClientError, match="no grant for user 'u-1'"):
        pc.revoke_user(cfg, "mcp", "librechat", "u-1")
    tokens = json.dumps({"access_token": AT, "refresh_token": RT})
    asyncio.run(
        put_grants(
            cfg,
            Grant("old", "librechat", "u-1", tokens, "active"),
            Grant("old", "librechat", "u-2", tokens, "active"),
        )
    )
    said = pc.revoke_user(cfg, "old", "librechat", "u-1")
    assert said[0].text.startswith("forgot the grant of user 'u-1' of client 'librechat' on route 'old'")
    assert said[1].to_stderr and said[1].text.startswith(
        "upstream revocation was not attempted: 'old' is not a per-user route in the config"
    )  # a dropped route leaves no OAuth client to revoke with (tests/e2e: a per-user route revokes)
    assert all(AT not in line.text and RT not in line.text for line in said)
    assert [g.user for g in pc.list_users(cfg, None)] == ["u-2"]  # only that user
    with pytest.raises(pc.PlatformClientError, match="no route named 'old'"):
        pc.revoke_user(cfg, "old", "librechat", "u-1")
    with pytest.raises(
        pc.PlatformClientError, match="no grant for user 'u-1' of client 'librechat' on route 'mcp'"
    ):
        pc.revoke_user(cfg, "mcp", "librechat", "u-1")
