"""broker/config/checks.py and issues.py: no literal secret in a config file, and none echoed in an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.config import SecretRef, load
from tests.config.documents import VALID, assert_not_echoed, doc, issues_at, load_error, write_text
from tests.conftest import LIVE_KEY, TEST_KEY, write_config

ACS_SECRET = "acs_FAKEclientSecret0123456789abcdef"

# ---------------------------------------------------------------- literal secrets


def _set(d: dict[str, Any], where: tuple[Any, ...], value: Any) -> None:
    node: Any = d
    for k in where[:-1]:
        node = node[k]
    node[where[-1]] = value


@pytest.mark.parametrize(
    ("where", "value", "place"),
    [
        (("routes", 1, "auth", "key"), TEST_KEY, "routes[1].auth.key"),
        (("routes", 1, "auth", "key"), LIVE_KEY, "routes[1].auth.key"),
        (("routes", 0, "auth", "client_secret"), ACS_SECRET, "routes[0].auth.client_secret"),
        (("routes", 1, "auth", "key"), "hunter2-not-a-reference", "routes[1].auth.key"),
        (("routes", 0, "auth", "client_secret"), "plainclientsecret99", "routes[0].auth.client_secret"),
        (("log", "level"), LIVE_KEY, "log.level"),
        (("allowed_hosts",), ["localhost", LIVE_KEY], "allowed_hosts[1]"),
        (("routes", 1, "upstream"), f"https://api.agentcard.sh/{LIVE_KEY}", "routes[1].upstream"),
        (("routes", 0, "auth", "client_id"), ACS_SECRET, "routes[0].auth.client_id"),
        (("routes", 0, "auth", "scopes"), ["read", TEST_KEY], "routes[0].auth.scopes[1]"),
    ],
)
def test_literal_secret_refused_and_never_echoed(
    cfg_path: Path, where: tuple[Any, ...], value: Any, place: str
) -> None:
    d = doc(log={"level": "info"})
    _set(d, where, value)
    err = load_error(write_config(cfg_path, d))
    issue = issues_at(err, place)[0]
    assert "literal secret" in issue.message
    assert "set-key" in issue.message  # tells the user where secrets go instead
    assert issue.line is not None
    secret = value[-1] if isinstance(value, list) else value
    assert_not_echoed(err, secret)
    if secret.startswith(("sk_", "acs_")):
        assert_not_echoed(err, secret.split("_", 2)[-1] if secret.startswith("sk_") else secret[4:])


@pytest.mark.parametrize("ref", ["keyring", "env:AGENTCARD_API_KEY", "file:~/agentcard.key"])
def test_secret_references_are_accepted(cfg_path: Path, isolated_env: Path, ref: str) -> None:
    d = doc()
    d["routes"][1]["auth"]["key"] = ref
    cfg = load(write_config(cfg_path, d))
    key = cfg.routes[1].auth.key  # type: ignore[union-attr]
    expected = {
        "keyring": SecretRef("keyring"),
        "env:AGENTCARD_API_KEY": SecretRef("env", "AGENTCARD_API_KEY"),
        "file:~/agentcard.key": SecretRef("file", str(isolated_env / "agentcard.key")),
    }[ref]
    assert key == expected


def test_bad_env_reference(cfg_path: Path) -> None:
    d = doc()
    d["routes"][1]["auth"]["key"] = "env:1-not a name"
    err = load_error(write_config(cfg_path, d))
    assert "environment variable" in issues_at(err, "routes[1].auth.key")[0].message


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(f"log:\n  level: {LIVE_KEY}\n" + VALID, id="log-level"),
        pytest.param(f"secret_store: {LIVE_KEY}\n" + VALID, id="secret-store"),
        pytest.param(f"allowed_uids: [{LIVE_KEY}]\n" + VALID, id="allowed-uids"),
        pytest.param(f"allowed_origins: [{LIVE_KEY}]\n" + VALID, id="allowed-origins"),
        pytest.param(VALID.replace("type: oauth", f"type: {LIVE_KEY}"), id="auth-type"),
        pytest.param(
            f"listen: [{LIVE_KEY}]\n" + VALID[VALID.index("routes:") :],
            id="listen-value",
        ),
        pytest.param(
            f"listen: ['{LIVE_KEY}:8765']\n" + VALID[VALID.index("routes:") :],
            id="listen-host",
        ),
        pytest.param(
            VALID.replace("name: mcp", f"name: {LIVE_KEY}").replace("name: api", f"name: {LIVE_KEY}"),
            id="duplicate-route-name",
        ),
        pytest.param(
            VALID.replace("prefix: /mcp", f"prefix: /{LIVE_KEY}").replace(
                "prefix: /\n", f"prefix: /{LIVE_KEY}/\n"
            ),
            id="duplicate-prefix",
        ),
        pytest.param(f"{LIVE_KEY}: 1\n" + VALID, id="as-a-key"),
        pytest.param(
            f"x: *{LIVE_KEY}\n" + VALID,
            id="undefined-alias-name",
        ),
        pytest.param(f"x: !{LIVE_KEY} 1\n" + VALID, id="local-tag"),
    ],
)
def test_live_key_anywhere_is_never_echoed(cfg_path: Path, text: str) -> None:
    err = load_error(write_text(cfg_path, text))
    assert err.issues
    assert_not_echoed(err, LIVE_KEY, LIVE_KEY[len("sk_live_") :])
