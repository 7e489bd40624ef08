"""What `login` and `logout` say around the OAuth flow: the route they are given, the outcome.

The flow itself runs against a real MCP authorization server in tests/e2e/test_oauth_mcp.py.
Here: real stores (the keyring file backend, a 0600 file store), and for login only a refused
connection to the discard port, so no test waits on a browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keyring
import pytest

from broker import config as config_mod
from broker.auth.oauth import (
    LoginError,
    LoginResult,
    OAuthStore,
    TokenSet,
    login_summary,
    oauth_route,
    run_login,
    run_logout,
)
from broker.auth.secret_store import FileStore, KeyringStore
from broker.config import Config
from tests.conftest import api_config, write_config

ACCESS_TOKEN = "at_FAKEaccess0123456789abcdef"
REFRESH_TOKEN = "rt_FAKErefresh0123456789abcdef"
UNREACHABLE = "http://127.0.0.1:9"  # discard: connections are refused

ROUTES = [
    {"name": "mcp", "prefix": "/mcp", "upstream": UNREACHABLE + "/mcp", "auth": {"type": "oauth"}},
    {"name": "api", "prefix": "/", "upstream": UNREACHABLE, "auth": {"type": "api_key"}},
]


def make_config(tmp_path: Path, **top: Any) -> Config:
    return config_mod.load(
        write_config(tmp_path / "config.yaml", api_config(UNREACHABLE, routes=ROUTES, **top))
    )


class Said(list[str]):
    def __call__(self, text: str) -> None:
        self.append(text)


# ---------------------------------------------------------------- the route


def test_oauth_route_refuses_an_unknown_or_a_non_oauth_route(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    assert oauth_route(cfg, "mcp") is cfg.routes[0]
    with pytest.raises(LoginError) as unknown:
        oauth_route(cfg, "nope")
    assert str(unknown.value) == f"no route named 'nope' in {cfg.path} (routes: mcp, api)"
    with pytest.raises(LoginError) as not_oauth:
        oauth_route(cfg, "api")
    assert str(not_oauth.value) == "route 'api' uses api_key, not oauth; nothing to log in"


# ---------------------------------------------------------------- login


def test_login_summary_names_who_and_until_when_and_no_token(tmp_path: Path) -> None:
    route = make_config(tmp_path).routes[0]
    tokens = TokenSet(
        ACCESS_TOKEN, REFRESH_TOKEN, expires_at=1767225600.0, scope="cards read", subject="u_42"
    )
    lines = login_summary(route, LoginResult("https://auth.example", "c1", tokens))
    assert lines == [
        "logged in route 'mcp' at https://auth.example as u_42",
        "scopes: cards read; access token expires 2026-01-01T00:00:00+00:00; refresh token: yes",
    ]
    bare = TokenSet(ACCESS_TOKEN, None, expires_at=None)
    assert login_summary(route, LoginResult("https://auth.example", "c1", bare)) == [
        "logged in route 'mcp' at https://auth.example as client c1",
        "scopes: (none listed); access token expires no expiry given; refresh token: no",
    ]
    assert not any(secret in line for line in lines for secret in (ACCESS_TOKEN, REFRESH_TOKEN))


def test_run_login_refuses_a_non_oauth_route_before_any_network(tmp_path: Path) -> None:
    said = Said()
    with pytest.raises(LoginError) as caught:
        run_login(make_config(tmp_path), "api", open_browser=False, wait_s=1, say=said)
    assert str(caught.value) == "route 'api' uses api_key, not oauth; nothing to log in"
    assert said == []


def test_run_login_says_what_failed_with_one_prefix(tmp_path: Path) -> None:
    said = Said()
    with pytest.raises(LoginError) as caught:
        run_login(make_config(tmp_path), "mcp", open_browser=False, wait_s=1, say=said)
    assert str(caught.value).startswith("login failed: ")
    assert said == [f"discovering the authorization server for {UNREACHABLE}/mcp …"]
    assert keyring.get_password("agentcard-broker", "mcp:oauth_tokens") is None


# ---------------------------------------------------------------- logout


def test_run_logout_of_a_route_never_logged_in(tmp_path: Path) -> None:
    said = Said()
    assert run_logout(make_config(tmp_path), "mcp", said) == "route 'mcp' was not logged in"
    assert said == []


def test_run_logout_forgets_the_tokens(tmp_path: Path) -> None:
    # no client record: nothing to revoke at, so no network; the tokens still go
    OAuthStore("mcp", KeyringStore()).save_tokens(TokenSet(ACCESS_TOKEN, REFRESH_TOKEN, expires_at=None))
    assert keyring.get_password("agentcard-broker", "mcp:oauth_tokens") is not None
    said = Said()
    assert run_logout(make_config(tmp_path), "mcp", said) == "logged out route 'mcp'"
    assert keyring.get_password("agentcard-broker", "mcp:oauth_tokens") is None
    assert said == []


def test_run_logout_with_an_unreadable_store_says_so(tmp_path: Path) -> None:
    state = tmp_path / "state"
    secrets_file = state / "secrets.json"
    OAuthStore("mcp", FileStore(secrets_file)).save_tokens(TokenSet(ACCESS_TOKEN, None, expires_at=None))
    secrets_file.chmod(0o644)
    cfg = make_config(tmp_path, secret_store="file", state_dir=str(state))
    with pytest.raises(LoginError) as caught:
        run_logout(cfg, "mcp", Said())
    assert str(caught.value) == (
        f"logout failed: {secrets_file} must be owned by this user and mode 0600; "
        f"run: chmod 600 {secrets_file}"
    )
    assert ACCESS_TOKEN in secrets_file.read_text()  # nothing was deleted
    assert ACCESS_TOKEN not in str(caught.value)
