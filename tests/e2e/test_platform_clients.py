"""`clients`, `users` and `connect --per-user` as users run them: the CLI as a subprocess, the
state store a real SQLite file, its master key in the keyring file backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from broker import config as config_mod
from broker.auth.oauth.tokens import TokenSet
from broker.auth.per_user import UserGrants
from broker.auth.platform_clients import token_hash
from broker.auth.secret_store import KeyringStore
from broker.scrub import SecretSet
from broker.store import Grant
from broker.store.sqlite import SqliteStore, default_path
from tests.conftest import Upstream, write_config
from tests.e2e.conftest import DaemonProc, cli
from tests.mcp_upstream import run_mcp_upstream

AT = "at_FAKEaccess0123456789abcdefABCDEF"
RT = "rt_FAKErefresh0123456789abcdefABCDEF"


def per_user_doc(tmp_path: Path, upstream: str = "https://mcp.agentcard.sh/mcp") -> dict[str, Any]:
    return {
        "listen": ["127.0.0.1:8765"],
        "public_url": "https://broker.example.test",
        "allow_insecure_upstream": True,
        "state_dir": str(tmp_path / "state"),
        "clients": [{"name": "librechat"}],
        "log": {"level": "debug", "format": "json"},
        "routes": [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": upstream,
                "auth": {"type": "oauth", "per_user": True, "user_header": "X-User-ID"},
            }
        ],
    }


def state_bytes(tmp_path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((tmp_path / "state").glob("state.sqlite3*")))


async def test_clients_add_list_remove(tmp_path: Path) -> None:
    config = str(write_config(tmp_path / "config.yaml", per_user_doc(tmp_path)))
    rc, out, err = await cli("clients", "add", "librechat", "--config", config)
    assert rc == 0, err
    token = out.strip()
    assert out == token + "\n" and token.startswith("acb_")  # stdout is the token alone
    assert (out + err).count(token) == 1  # printed once
    assert "shown only now" in err and "Authorization: Bearer <token>" in err
    kept = state_bytes(tmp_path)
    assert token.encode() not in kept and token[4:].encode() not in kept
    assert token_hash(token).encode() in kept

    rc, out, err = await cli("clients", "add", "librechat", "--config", config)
    assert rc == 1 and "already has a token" in err and "clients remove librechat" in err
    assert out == ""
    rc, out, err = await cli("clients", "add", "openwebui", "--config", config)
    assert rc == 1 and f"no client named 'openwebui' under `clients:` in {config}" in err

    for args in (("clients", "list"), ("clients", "list", "--json")):
        rc, out, err = await cli(*args, "--config", config)
        assert rc == 0, err
        assert "librechat" in out
        assert token_hash(token) not in out + err and token not in out + err
    assert json.loads(out)[0]["name"] == "librechat" and json.loads(out)[0]["has_token"] is True

    rc, out, err = await cli("clients", "remove", "librechat", "--config", config)
    assert rc == 0, err
    assert "client 'librechat' removed" in out
    rc, out, err = await cli("clients", "remove", "librechat", "--config", config)
    assert rc == 1 and "no client named 'librechat' has a token" in err
    rc, out, err = await cli("clients", "remove", "--config", config)
    assert rc == 2 and "usage: agentcard-broker clients remove NAME" in err


async def test_users_list_and_revoke_tell_the_daemon(
    tmp_path: Path, upstream: Upstream, daemon_factory: Any
) -> None:
    d: DaemonProc = daemon_factory(per_user_doc(tmp_path, upstream.url + "/mcp"))
    await d.start()
    config = str(d.config)
    tokens = json.dumps({"access_token": AT, "refresh_token": RT})
    store = await SqliteStore.open(default_path(tmp_path / "state"), KeyringStore())
    try:
        await store.put_grant(Grant("mcp", "librechat", "alice", tokens, "dead", None, 1_800_000_000.0))
        await store.put_grant(Grant("mcp", "librechat", "bob", tokens, "dead"))
    finally:
        await store.close()

    rc, out, err = await cli("users", "--config", config)
    assert rc == 0, err
    assert out.splitlines()[0].split() == ["ROUTE", "CLIENT", "USER", "STATE", "EXPIRES", "LAST", "USED"]
    assert "alice" in out and "bob" in out and "2027-01-15T08:00:00Z" in out
    rc, doc, err = await cli("users", "mcp", "--json", "--config", config)
    assert rc == 0, err
    assert [u["user"] for u in json.loads(doc)] == ["alice", "bob"]
    for text in (out, doc, err):
        assert "FAKE" not in text  # no token bytes

    # this upstream is no authorization server: nothing is revoked there, the grant goes all the same
    rc, out, err = await cli("users", "revoke", "mcp", "librechat", "alice", "--config", config)
    assert rc == 0, err
    assert "forgot the grant of user 'alice' of client 'librechat' on route 'mcp'" in out
    assert "the running daemon picked it up" in out
    rc, out, err = await cli("users", "revoke", "mcp", "librechat", "alice", "--config", config)
    assert rc == 1 and "no grant for user 'alice'" in err
    rc, out, err = await cli("users", "--json", "--config", config)
    assert [u["user"] for u in json.loads(out)] == ["bob"]
    rc, out, err = await cli("users", "revoke", "mcp", "librechat", "--config", config)
    assert rc == 2 and "users revoke ROUTE CLIENT USER" in err


async def test_connect_per_user_prints_header_names_never_a_token(tmp_path: Path) -> None:
    config = str(write_config(tmp_path / "config.yaml", per_user_doc(tmp_path)))
    rc, token, err = await cli("clients", "add", "librechat", "--config", config)
    assert rc == 0, err
    rc, out, err = await cli("connect", "librechat", "--per-user", "--config", config)
    assert rc == 0, err
    assert "X-User-ID: '{{LIBRECHAT_USER_ID}}'" in out
    assert "Authorization: Bearer ${AGENTCARD_BROKER_TOKEN}" in out
    assert token.strip() not in out + err and "acb_" not in out
    rc, out, err = await cli("connect", "open-webui", "--per-user", "--config", config)
    assert rc == 0, err
    assert "ENABLE_FORWARD_USER_INFO_HEADERS=true" in out and "X-OpenWebUI-User-Id" in out
    assert token.strip() not in out + err
    rc, out, err = await cli("connect", "librechat", "--per-user", "--route", "nope", "--config", config)
    assert rc == 1 and "no route named 'nope'" in err


async def test_users_revoke_revokes_the_tokens_at_the_upstream_first(tmp_path: Path) -> None:
    async with run_mcp_upstream() as up:
        path = write_config(tmp_path / "config.yaml", per_user_doc(tmp_path, up.mcp_url))
        cfg = config_mod.load(path)
        route = cfg.route("mcp")
        assert route is not None
        store = await SqliteStore.open(default_path(tmp_path / "state"), KeyringStore())
        grants = UserGrants(route, cfg, store, KeyringStore(), SecretSet())
        try:
            record = await grants.client_record()  # registered at the upstream, kept in the keyring
            issued = up.provider._issue(record.client_id, [], up.mcp_url)
            tokens = TokenSet(issued.access_token, issued.refresh_token, None)
            await store.put_grant(Grant("mcp", "librechat", "alice", tokens.to_json(), "active"))
        finally:
            await grants.close()
            await store.close()
        assert issued.access_token in up.provider.access_tokens

        rc, out, err = await cli("users", "revoke", "mcp", "librechat", "alice", "--config", str(path))
        assert rc == 0, err
        assert "forgot the grant of user 'alice'" in out and "AgentCard was asked first" in out
        assert issued.access_token not in up.provider.access_tokens
        assert issued.refresh_token not in up.provider.refresh_tokens
        assert issued.access_token not in out + err and str(issued.refresh_token) not in out + err
        rc, out, err = await cli("users", "--json", "--config", str(path))
        assert rc == 0 and json.loads(out) == []
