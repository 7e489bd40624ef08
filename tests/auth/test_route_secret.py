"""set_route_secret(): what `set-key` decides, stores and says, against real stores.

The keyring is the real package with its file backend (tests/conftest.py); the file store is a
real 0600 JSON file. No terminal: the value comes from a reader that records the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keyring
import pytest

from broker import config as config_mod
from broker.auth.route_secret import OutputLine, RouteSecretError, set_route_secret
from broker.auth.secret_store import FileStore
from broker.config import Config
from tests.conftest import LIVE_KEY, TEST_KEY, api_config, write_config

CLIENT_SECRET = "acs_FAKEclientSecret0123456789abcdef"
UNREACHABLE = "http://127.0.0.1:9"
KEYRING = "keyring (keyrings.alt.file.PlaintextKeyring)"


def cc_auth(secret: str = "keyring") -> dict[str, Any]:
    return {
        "type": "client_credentials",
        "token_url": UNREACHABLE + "/t",
        "client_id": "c1",
        "client_secret": secret,
    }


ROUTES = [
    {"name": "api", "prefix": "/", "upstream": UNREACHABLE, "auth": {"type": "api_key", "key": "keyring"}},
    {
        "name": "live",
        "prefix": "/live",
        "upstream": UNREACHABLE,
        "auth": {"type": "api_key", "key": "keyring", "allow_live": True},
    },
    {
        "name": "envkey",
        "prefix": "/env",
        "upstream": UNREACHABLE,
        "auth": {"type": "api_key", "key": "env:SOME_KEY"},
    },
    {"name": "platform", "prefix": "/api/v2", "upstream": UNREACHABLE, "auth": cc_auth()},
    {
        "name": "ccfile",
        "prefix": "/ccfile",
        "upstream": UNREACHABLE,
        "auth": cc_auth("file:/nonexistent/secret"),
    },
    {"name": "mcp", "prefix": "/mcp", "upstream": UNREACHABLE, "auth": {"type": "oauth"}},
    {
        "name": "mcpconf",
        "prefix": "/mcpconf",
        "upstream": UNREACHABLE,
        "auth": {"type": "oauth", "client_id": "abc", "client_secret": "keyring"},
    },
]


def make_config(tmp_path: Path, **top: Any) -> Config:
    return config_mod.load(
        write_config(tmp_path / "config.yaml", api_config(UNREACHABLE, routes=ROUTES, **top))
    )


class Reader:
    """Hands back `value` and records each prompt it was asked with."""

    def __init__(self, value: str) -> None:
        self.value = value
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.value


def stored(account: str) -> str | None:
    return keyring.get_password("agentcard-broker", account)


def refused(cfg: Config, route: str, value: str) -> RouteSecretError:
    with pytest.raises(RouteSecretError) as caught:
        set_route_secret(cfg, route, Reader(value))
    text = f"{caught.value} {caught.value.printed_before}"
    if len(value.strip()) > len("sk_test_"):  # a bare prefix is in the message by design
        assert value.strip() not in text
    return caught.value


# ---------------------------------------------------------------- API keys


def test_a_test_key_is_stored_and_its_mode_said(tmp_path: Path) -> None:
    reader = Reader(TEST_KEY + "\n")
    said = set_route_secret(make_config(tmp_path), "api", reader)
    assert reader.prompts == ["API key for route 'api' (input hidden): "]
    assert said == [OutputLine(f"stored a test-mode API key for route 'api' in {KEYRING}")]
    assert stored("api") == TEST_KEY  # the newline read with it is not part of the key


def test_a_live_key_on_a_route_without_allow_live_is_stored_with_a_warning(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    said = set_route_secret(cfg, "api", Reader(LIVE_KEY))
    assert said == [
        OutputLine(f"stored a live-mode API key for route 'api' in {KEYRING}"),
        OutputLine(
            "warning: this is a live (real money) key and route 'api' has allow_live: false; "
            "requests will be refused until you set routes[0].auth.allow_live: true",
            to_stderr=True,
        ),
    ]
    assert stored("api") == LIVE_KEY
    assert set_route_secret(cfg, "live", Reader(LIVE_KEY)) == [
        OutputLine(f"stored a live-mode API key for route 'live' in {KEYRING}")
    ]
    assert all(LIVE_KEY not in line.text for line in said)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "no API key given; nothing stored"),
        ("  \n", "no API key given; nothing stored"),
        ("sk_test_FAKE key", "the API key contains whitespace; nothing stored"),
        ("ghp_FAKEnotAnAgentCardKey0123", "that is not an AgentCard API key"),
        ("sk_test_", "that is not an AgentCard API key"),
        ("sk_live_", "that is not an AgentCard API key"),
    ],
    ids=["empty", "blank", "whitespace", "other-shape", "test-prefix-only", "live-prefix-only"],
)
def test_a_value_that_is_not_a_key_stores_nothing(tmp_path: Path, value: str, message: str) -> None:
    cfg = make_config(tmp_path)
    set_route_secret(cfg, "api", Reader(TEST_KEY))
    err = refused(cfg, "api", value)
    assert str(err).startswith(message)
    assert str(err).endswith("nothing stored")
    assert err.printed_before == ()
    assert stored("api") == TEST_KEY  # the earlier key is still there


# ---------------------------------------------------------------- client secrets


def test_a_client_secret_goes_under_its_own_account(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    reader = Reader(CLIENT_SECRET)
    said = set_route_secret(cfg, "platform", reader)
    assert reader.prompts == ["client secret for route 'platform' (input hidden): "]
    assert said == [OutputLine(f"stored the client secret for route 'platform' in {KEYRING}")]
    assert stored("platform:client_secret") == CLIENT_SECRET
    assert stored("platform") is None
    set_route_secret(cfg, "mcpconf", Reader(CLIENT_SECRET))  # a confidential oauth client
    assert stored("mcpconf:client_secret") == CLIENT_SECRET


def test_a_client_secret_without_acs_is_stored_with_a_note(tmp_path: Path) -> None:
    said = set_route_secret(make_config(tmp_path), "platform", Reader("FAKEsecretWithoutPrefix"))
    assert said == [
        OutputLine("note: AgentCard client secrets usually start with acs_", to_stderr=True),
        OutputLine(f"stored the client secret for route 'platform' in {KEYRING}"),
    ]
    assert stored("platform:client_secret") == "FAKEsecretWithoutPrefix"


def test_a_client_secret_is_not_held_to_the_api_key_shape(tmp_path: Path) -> None:
    err = refused(make_config(tmp_path), "platform", "acs_FAKE with space")
    assert str(err) == "the client secret contains whitespace; nothing stored"
    assert stored("platform:client_secret") is None


# ---------------------------------------------------------------- routes that take nothing here


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            "nope",
            "no route named 'nope' in {path} (routes: api, live, envkey, platform, ccfile, mcp, mcpconf)",
        ),
        ("mcp", "route 'mcp' (oauth) has no secret to store; it uses `login`"),
        (
            "envkey",
            "route 'envkey' reads its API key from env:SOME_KEY, not the secret store; "
            "change routes[2].auth to `keyring` to use set-key",
        ),
        (
            "ccfile",
            "route 'ccfile' reads its client secret from file:/nonexistent/secret, not the secret store; "
            "change routes[4].auth to `keyring` to use set-key",
        ),
    ],
)
def test_a_route_that_takes_no_secret_here_is_refused_before_asking(
    tmp_path: Path, route: str, message: str
) -> None:
    cfg = make_config(tmp_path)
    reader = Reader(TEST_KEY)
    with pytest.raises(RouteSecretError) as caught:
        set_route_secret(cfg, route, reader)
    assert str(caught.value) == message.format(path=cfg.path)
    assert reader.prompts == []  # nobody is asked to type a secret that would go nowhere
    assert stored(route) is None and stored(f"{route}:client_secret") is None


# ---------------------------------------------------------------- the file store


def test_secret_store_file_warns_and_writes_the_file_not_the_keyring(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = make_config(tmp_path, secret_store="file", state_dir=str(state))
    secrets_file = state / "secrets.json"
    said = set_route_secret(cfg, "api", Reader(TEST_KEY))
    assert said == [
        OutputLine(
            f"warning: secret_store is `file`: the secret goes into file ({secrets_file}), not the OS keyring"
        ),
        OutputLine(f"stored a test-mode API key for route 'api' in file ({secrets_file})"),
    ]
    assert FileStore(secrets_file).get("api") == TEST_KEY
    assert stored("api") is None
    assert secrets_file.stat().st_mode & 0o777 == 0o600


def test_a_store_that_refuses_keeps_what_was_said_before(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    secrets_file = state / "secrets.json"
    secrets_file.write_text("{}")
    secrets_file.chmod(0o644)  # readable by others: the file store refuses to use it
    cfg = make_config(tmp_path, secret_store="file", state_dir=str(state))

    err = refused(cfg, "platform", "FAKEsecretWithoutPrefix")

    assert err.printed_before == (
        OutputLine("note: AgentCard client secrets usually start with acs_", to_stderr=True),
        OutputLine(
            f"warning: secret_store is `file`: the secret goes into file ({secrets_file}), not the OS keyring"
        ),
    )
    assert str(err) == (
        f"could not store the client secret: {secrets_file} must be owned by this user and mode 0600; "
        f"run: chmod 600 {secrets_file}"
    )
    assert secrets_file.read_text() == "{}"
