"""Credential.check(): what each credential class tells `agentcard-broker check` about itself,
and check_credentials(), which asks every route of a config and places each problem in the file.

Real stores (the keyring file backend, a 0600 file store), real config files; no network: the
upstreams named below are never contacted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keyring
import pytest

from broker import config as config_mod
from broker.auth import RouteCheck, check_credentials, make_credential
from broker.auth.base import Credential, CredentialCheck
from broker.auth.oauth import OAuthStore, TokenSet
from broker.auth.secret_store import FileStore, KeyringStore, SecretStore
from broker.scrub import SecretSet
from tests.conftest import LIVE_KEY, TEST_KEY, api_config, store_key, write_config

CLIENT_SECRET = "acs_FAKEclientSecret0123456789abcdef"
ACCESS_TOKEN = "at_FAKEaccess0123456789abcdef"
REFRESH_TOKEN = "rt_FAKErefresh0123456789abcdef"
UNREACHABLE = "http://127.0.0.1:9"  # discard: nothing would answer, and nothing is asked


def credential(tmp_path: Path, auth: dict[str, Any], store: SecretStore | None = None) -> Credential:
    route = {"name": "r1", "prefix": "/", "upstream": UNREACHABLE, "auth": auth}
    cfg = config_mod.load(write_config(tmp_path / "config.yaml", api_config(UNREACHABLE, routes=[route])))
    return make_credential(cfg.routes[0], store or KeyringStore(), SecretSet())


def checked(cred: Credential) -> CredentialCheck:
    """cred.check(), which must leave what the daemon would show alone and say no secret."""
    before = (cred.state, cred.reason, cred.mode, cred.expires_at)
    found = cred.check()
    assert (cred.state, cred.reason, cred.mode, cred.expires_at) == before
    for secret in (TEST_KEY, LIVE_KEY, CLIENT_SECRET, ACCESS_TOKEN, REFRESH_TOKEN):
        assert secret not in f"{found.stored} {found.problem}"
    return found


# ---------------------------------------------------------------- api_key


def test_api_key_missing_names_set_key(tmp_path: Path) -> None:
    cred = credential(tmp_path, {"type": "api_key", "key": "keyring"})
    found = checked(cred)
    assert found.stored == "no key"
    assert found.problem is not None
    assert "nothing stored for route 'r1'" in found.problem
    assert found.problem.endswith("; run: agentcard-broker set-key r1")


def test_api_key_test_mode_is_fine_and_check_leaves_the_state_alone(tmp_path: Path) -> None:
    store_key(TEST_KEY, route="r1")
    cred = credential(tmp_path, {"type": "api_key", "key": "keyring"})
    found = checked(cred)
    assert found == CredentialCheck("test-mode key (keyring)", None)
    assert cred.reason == "not read yet"  # only prepare() reads the key into the credential


def test_api_key_live_without_allow_live_is_a_problem(tmp_path: Path) -> None:
    store_key(LIVE_KEY, route="r1")
    found = checked(credential(tmp_path, {"type": "api_key", "key": "keyring"}))
    assert found.stored == "live key"
    assert found.problem is not None and "allow_live is false" in found.problem
    allowed = checked(credential(tmp_path, {"type": "api_key", "key": "keyring", "allow_live": True}))
    assert allowed == CredentialCheck("live-mode key (keyring)", None)


def test_api_key_not_an_agentcard_key(tmp_path: Path) -> None:
    store_key("ghp_FAKEnotAnAgentCardKey0123", route="r1")
    found = checked(credential(tmp_path, {"type": "api_key", "key": "keyring"}))
    assert found.stored == "not an AgentCard key"
    assert found.problem == "expected sk_test_ or sk_live_; run: agentcard-broker set-key r1"
    assert "ghp_FAKE" not in found.problem


def test_api_key_from_env_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cred = credential(tmp_path, {"type": "api_key", "key": "env:R1_KEY"})
    found = checked(cred)
    assert found.problem == ("environment variable R1_KEY is not set; set R1_KEY in the broker's environment")
    monkeypatch.setenv("R1_KEY", TEST_KEY)
    assert checked(cred) == CredentialCheck("test-mode key (env:R1_KEY)", None)


# ---------------------------------------------------------------- client_credentials


def cc_auth(secret: str = "keyring") -> dict[str, Any]:
    return {
        "type": "client_credentials",
        "token_url": UNREACHABLE + "/oauth/token",
        "client_id": "test_client_1",
        "client_secret": secret,
    }


def test_client_credentials_missing_then_present(tmp_path: Path) -> None:
    cred = credential(tmp_path, cc_auth())
    found = checked(cred)
    assert found.stored == "no client secret"
    assert found.problem is not None
    assert "nothing stored for route 'r1:client_secret'" in found.problem
    assert found.problem.endswith("; run: agentcard-broker set-key r1")
    keyring.set_password("agentcard-broker", "r1:client_secret", CLIENT_SECRET)
    found = checked(cred)
    assert found == CredentialCheck("client secret present", None)
    assert cred.refreshes == 0  # type: ignore[attr-defined]  # nothing minted: no network


def test_client_credentials_secret_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(CLIENT_SECRET)
    secret_file.chmod(0o644)
    cred = credential(tmp_path, cc_auth(f"file:{secret_file}"))
    found = checked(cred)
    assert found.stored == "no client secret"
    assert found.problem is not None and "must be mode 0600" in found.problem
    secret_file.chmod(0o600)
    assert checked(cred) == CredentialCheck("client secret present", None)


# ---------------------------------------------------------------- oauth


def oauth_auth() -> dict[str, Any]:
    return {"type": "oauth", "scopes": ["cards"], "redirect_port": 8766}


def test_oauth_never_logged_in_names_login(tmp_path: Path) -> None:
    cred = credential(tmp_path, oauth_auth())
    found = checked(cred)
    assert found == CredentialCheck("not logged in", "run: agentcard-broker login r1")


def test_oauth_logged_in_shows_scopes_and_a_dead_grant_is_a_problem(tmp_path: Path) -> None:
    store = KeyringStore()
    cred = credential(tmp_path, oauth_auth(), store)
    tokens = TokenSet(ACCESS_TOKEN, REFRESH_TOKEN, expires_at=None, scope="cards read")
    OAuthStore("r1", store).save_tokens(tokens)
    found = checked(cred)
    assert found == CredentialCheck("logged in (scopes: cards read)", None)
    dead = TokenSet("-", None, expires_at=None, dead="the authorization server refused the refresh token")
    OAuthStore("r1", store).save_tokens(dead)
    found = checked(cred)
    assert found.stored == "login ended"
    assert found.problem == (
        "the authorization server refused the refresh token; run: agentcard-broker login r1"
    )


def test_oauth_unreadable_store_says_why(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    store = FileStore(path)
    store.set("r1:oauth_tokens", TokenSet(ACCESS_TOKEN, REFRESH_TOKEN, expires_at=None).to_json())
    cred = credential(tmp_path, oauth_auth(), store)
    assert checked(cred).stored.startswith("logged in")
    path.chmod(0o644)
    found = checked(cred)
    assert found.stored == "store unreadable"
    assert found.problem is not None and "must be owned by this user and mode 0600" in found.problem


# ---------------------------------------------------------------- every route of a config


def test_check_credentials_rows_and_problems_placed_in_the_file(tmp_path: Path) -> None:
    routes = [
        {
            "name": "api",
            "prefix": "/",
            "upstream": UNREACHABLE,
            "auth": {"type": "api_key", "key": "keyring"},
        },
        {"name": "platform", "prefix": "/api/v2", "upstream": UNREACHABLE, "auth": cc_auth()},
        {"name": "mcp", "prefix": "/mcp", "upstream": UNREACHABLE, "auth": oauth_auth()},
    ]
    path = write_config(tmp_path / "config.yaml", api_config(UNREACHABLE, routes=routes))
    cfg = config_mod.load(path)
    store_key(TEST_KEY, route="api")
    keyring.set_password("agentcard-broker", "platform:client_secret", CLIENT_SECRET)

    found = check_credentials(cfg)

    assert found.secret_store == "keyring (keyrings.alt.file.PlaintextKeyring)"
    assert found.routes == (
        RouteCheck("api", "/", "api_key", "test-mode key (keyring)", None),
        RouteCheck("platform", "/api/v2", "client_credentials", "client secret present", None),
        RouteCheck("mcp", "/mcp", "oauth", "not logged in", "run: agentcard-broker login mcp"),
    )
    line = cfg.line_of("routes[2].auth")
    assert line is not None
    assert found.problems == (f"{path}:{line}: routes[2].auth: route 'mcp': run: agentcard-broker login mcp",)
    for secret in (TEST_KEY, CLIENT_SECRET):
        assert secret not in repr(found)


def test_check_credentials_reads_the_file_store_the_config_names(tmp_path: Path) -> None:
    state = tmp_path / "state"
    route = {"name": "api", "prefix": "/", "upstream": UNREACHABLE, "auth": {"type": "api_key"}}
    doc = api_config(UNREACHABLE, routes=[route], secret_store="file", state_dir=str(state))
    cfg = config_mod.load(write_config(tmp_path / "config.yaml", doc))
    store_key(TEST_KEY, route="api")  # in the keyring, which this config does not use

    found = check_credentials(cfg)
    assert found.secret_store == f"file ({state / 'secrets.json'})"
    assert found.routes[0].credential == "no key"
    assert len(found.problems) == 1 and "set-key api" in found.problems[0]

    FileStore(state / "secrets.json").set("api", LIVE_KEY)
    found = check_credentials(cfg)
    assert found.routes[0].credential == "live key"
    assert "allow_live is false" in found.problems[0]
    assert LIVE_KEY not in repr(found)
