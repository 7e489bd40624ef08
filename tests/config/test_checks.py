"""broker/config.py: reading config.yaml safely and naming every problem by its place and line."""

from __future__ import annotations

import copy
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from broker.config import (
    ApiKeyAuth,
    ClientCredentialsAuth,
    ConfigError,
    ConfigIssue,
    Listen,
    OAuthAuth,
    SecretRef,
    file_stamp,
    find_config,
    load,
)
from tests.conftest import LIVE_KEY, TEST_KEY, write_config

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
ACS_SECRET = "acs_FAKEclientSecret0123456789abcdef"

# A valid config written as text so that line numbers are known:
#   1 listen / 3 routes / 4 routes[0] / 8 routes[0].auth.type / 9 routes[1] / 12 routes[1].auth
VALID = """\
listen:
  - 127.0.0.1:8765
routes:
  - name: mcp
    prefix: /mcp
    upstream: https://mcp.agentcard.sh/mcp
    auth:
      type: oauth
  - name: api
    prefix: /
    upstream: https://api.agentcard.sh
    auth:
      type: api_key
      key: keyring
"""


def doc(**top: Any) -> dict[str, Any]:
    """A valid config document; keyword arguments add or replace top-level keys."""
    d: dict[str, Any] = {
        "listen": ["127.0.0.1:8765"],
        "routes": [
            {
                "name": "mcp",
                "prefix": "/mcp",
                "upstream": "https://mcp.agentcard.sh/mcp",
                "auth": {"type": "oauth"},
            },
            {
                "name": "api",
                "prefix": "/",
                "upstream": "https://api.agentcard.sh",
                "auth": {"type": "api_key", "key": "keyring"},
            },
        ],
    }
    d.update(copy.deepcopy(top))
    return d


def write_text(path: Path, text: str, mode: int = 0o600) -> Path:
    """Raw YAML (tags, anchors, broken syntax) that write_config's safe_dump cannot produce."""
    path.write_text(text)
    path.chmod(mode)
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value


def issues_at(err: ConfigError, place: str) -> list[ConfigIssue]:
    found = [i for i in err.issues if i.place == place]
    assert found, f"no issue at {place!r}; got {err.lines()}"
    return found


def assert_not_echoed(err: ConfigError, *values: str) -> None:
    rendered = [str(err), err.render(), *err.lines(), *(f"{i.place} {i.message}" for i in err.issues)]
    for value in values:
        for text in rendered:
            assert value not in text, f"config error echoed a secret: {text!r}"


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return tmp_path / "config.yaml"


# ---------------------------------------------------------------- the shipped example


def test_repo_config_yaml_loads(cfg_path: Path) -> None:
    shutil.copy(REPO_CONFIG, cfg_path)
    cfg_path.chmod(0o600)
    cfg = load(cfg_path)

    assert cfg.path == str(cfg_path)
    assert cfg.listen == (Listen("tcp", host="127.0.0.1", port=8765),)
    assert [(r.name, r.prefix, r.upstream) for r in cfg.routes] == [
        ("mcp", "/mcp", "https://mcp.agentcard.sh/mcp"),
        ("api", "/", "https://api.agentcard.sh"),
    ]
    mcp, api = cfg.routes
    assert isinstance(mcp.auth, OAuthAuth)
    assert mcp.auth.redirect_port == 8766
    assert mcp.auth.client_id is None
    assert api.auth == ApiKeyAuth(key=SecretRef("keyring"), allow_live=False)
    assert cfg.allowed_hosts == ("127.0.0.1", "localhost", "[::1]")
    assert cfg.allowed_origins == ()
    assert cfg.allowed_uids == (os.getuid(),)
    assert cfg.allow_remote is False
    assert cfg.allow_insecure_upstream is False
    assert cfg.secret_store == "keyring"
    assert (cfg.limits.max_body_bytes, cfg.limits.max_header_bytes) == (10485760, 32768)
    assert (cfg.timeouts.connect, cfg.timeouts.first_byte, cfg.timeouts.idle, cfg.timeouts.drain) == (
        10.0,
        60.0,
        300.0,
        30.0,
    )
    assert (cfg.log.level, cfg.log.format, cfg.log.audit) == ("info", "auto", True)
    key_line = REPO_CONFIG.read_text().splitlines().index("      key: keyring") + 1
    assert cfg.line_of("routes[1].auth.key") == key_line


def test_valid_text_config_remembers_lines(cfg_path: Path) -> None:
    cfg = load(write_text(cfg_path, VALID))
    assert cfg.line_of("routes[1]") == 9
    assert cfg.line_of("routes[1].auth.key") == 14
    assert cfg.route("api") is cfg.routes[1]
    assert cfg.route("nope") is None


def test_a_config_remembers_the_file_version_it_was_read_from(cfg_path: Path) -> None:
    # the daemon compares this stamp with the file's when its watcher starts: an edit made
    # after the read (during start-up's imports, say) is then applied, not taken as current
    cfg = load(write_text(cfg_path, VALID))
    assert cfg.stamp is not None and cfg.stamp == file_stamp(str(cfg_path))
    write_text(cfg_path, VALID + "\n# edited\n")
    assert file_stamp(str(cfg_path)) != cfg.stamp
    assert load(cfg_path) == cfg  # the stamp is not part of what the config says

    from broker.daemon import Runtime

    assert Runtime(cfg).config_stamp == cfg.stamp  # not the edited file's: the edit is pending


# ---------------------------------------------------------------- unknown keys and types


def test_unknown_top_level_key(cfg_path: Path) -> None:
    err = load_error(write_text(cfg_path, VALID + "bogus: 1\n"))
    (issue,) = issues_at(err, "bogus")
    assert issue.line == 15
    assert "unknown key" in issue.message
    assert "routes" in issue.message  # names what is allowed there
    assert f"{cfg_path}:15: bogus: unknown key" in err.lines()[0]


def test_unknown_key_inside_route_auth_names_place_and_line(cfg_path: Path) -> None:
    err = load_error(write_text(cfg_path, VALID + "      bogus: 1\n"))
    (issue,) = issues_at(err, "routes[1].auth.bogus")
    assert issue.line == 15
    assert "unknown key" in issue.message
    assert err.lines() == [f"{cfg_path}:15: routes[1].auth.bogus: {issue.message}"]


def test_unknown_key_inside_route(cfg_path: Path) -> None:
    text = VALID.replace("    prefix: /mcp\n", "    prefix: /mcp\n    upstreams: https://x.example\n")
    err = load_error(write_text(cfg_path, text))
    (issue,) = issues_at(err, "routes[0].upstreams")
    assert issue.line == 6
    assert "unknown key" in issue.message


def test_unknown_key_inside_limits(cfg_path: Path) -> None:
    err = load_error(write_text(cfg_path, "limits:\n  max_body_bytes: 10\n  max_bdy_bytes: 5\n" + VALID))
    (issue,) = issues_at(err, "limits.max_bdy_bytes")
    assert issue.line == 3
    assert "max_body_bytes" in issue.message  # the allowed keys are listed


def test_bad_type_limits_max_body_bytes(cfg_path: Path) -> None:
    err = load_error(write_text(cfg_path, 'limits:\n  max_body_bytes: "big"\n' + VALID))
    (issue,) = issues_at(err, "limits.max_body_bytes")
    assert issue.line == 2
    assert "whole number" in issue.message
    assert "string" in issue.message
    assert err.lines() == [f"{cfg_path}:2: limits.max_body_bytes: {issue.message}"]


@pytest.mark.parametrize(
    ("top", "place", "words"),
    [
        ({"allow_remote": "maybe"}, "allow_remote", "true or false"),
        ({"timeouts": {"connect": "soon"}}, "timeouts.connect", "number"),
        ({"timeouts": {"idle": -1}}, "timeouts.idle", "at least"),
        ({"limits": {"max_header_bytes": 10}}, "limits.max_header_bytes", "between"),
        ({"limits": {"max_body_bytes": True}}, "limits.max_body_bytes", "whole number"),
        ({"limits": []}, "limits", "mapping"),
        ({"allowed_hosts": "localhost"}, "allowed_hosts", "list"),
        ({"allowed_hosts": ["localhost", 5]}, "allowed_hosts[1]", "string"),
        ({"routes": {"name": "api"}}, "routes", "list"),
        ({"secret_store": "vault"}, "secret_store", "keyring"),
        ({"log": {"format": "xml"}}, "log.format", "json"),
        ({"allowed_origins": ["null"]}, "allowed_origins[0]", "origin"),
    ],
)
def test_bad_values_are_named_by_place(cfg_path: Path, top: dict[str, Any], place: str, words: str) -> None:
    err = load_error(write_config(cfg_path, doc(**top)))
    (issue,) = issues_at(err, place)
    assert words in issue.message
    assert issue.line is not None


def test_bad_type_inside_auth(cfg_path: Path) -> None:
    d = doc()
    d["routes"][0]["auth"]["scopes"] = "read"
    d["routes"][0]["auth"]["redirect_port"] = 70000
    err = load_error(write_config(cfg_path, d))
    assert "list" in issues_at(err, "routes[0].auth.scopes")[0].message
    assert "between" in issues_at(err, "routes[0].auth.redirect_port")[0].message


def test_unknown_auth_type(cfg_path: Path) -> None:
    d = doc()
    d["routes"][1]["auth"] = {"type": "basic"}
    err = load_error(write_config(cfg_path, d))
    assert "api_key" in issues_at(err, "routes[1].auth.type")[0].message


# ---------------------------------------------------------------- routes


def test_duplicate_route_names(cfg_path: Path) -> None:
    d = doc()
    d["routes"].append(
        {
            "name": "api",
            "prefix": "/other",
            "upstream": "https://api.agentcard.sh",
            "auth": {"type": "api_key"},
        }
    )
    err = load_error(write_config(cfg_path, d))
    (issue,) = issues_at(err, "routes[2].name")
    assert "duplicate route name" in issue.message
    assert [i.place for i in err.issues] == ["routes[2].name"]


def test_duplicate_prefixes_after_normalization(cfg_path: Path) -> None:
    d = doc()
    d["routes"].append(
        {
            "name": "mcp2",
            "prefix": "/mcp/",
            "upstream": "https://mcp.agentcard.sh/mcp",
            "auth": {"type": "oauth"},
        }
    )
    err = load_error(write_config(cfg_path, d))
    (issue,) = issues_at(err, "routes[2].prefix")
    assert "duplicate prefix" in issue.message
    assert "/mcp" in issue.message


def test_route_needs_auth(cfg_path: Path) -> None:
    d = doc()
    del d["routes"][1]["auth"]
    err = load_error(write_config(cfg_path, d))
    issue = issues_at(err, "routes[1].auth")[0]
    assert issue.line is not None  # points at the route when the key itself is missing


def test_policy_block_parses(cfg_path: Path) -> None:
    d = doc()
    d["routes"][1]["policy"] = {
        "allow": ["GET /api/v1/cards", "post /api/v1/cards/*"],
        "deny": ["GET /api/v1/cards/*/details"],
        "tools": {"allow": ["list_cards"], "deny": ["withdraw_wallet"]},
        "max_amount_cents": 5000,
        "budget": {"amount_cents": 20000, "per": "24h"},
        "rate": {"requests": 60, "per": "1m"},
        "require_test_mode": True,
    }
    p = load(write_config(cfg_path, d)).routes[1].policy
    assert p is not None
    assert p.allow is not None and [r.method for r in p.allow] == ["GET", "POST"]
    assert p.deny[0].segments == ("api", "v1", "cards", "*", "details")
    assert p.tools_allow == frozenset({"list_cards"}) and p.tools_deny == frozenset({"withdraw_wallet"})
    assert p.budget is not None and (p.budget.amount, p.budget.seconds) == (20000, 86400)
    assert p.rate is not None and (p.rate.amount, p.rate.seconds) == (60, 60)
    assert p.amount_fields == ("amount_cents", "spend_limit_cents", "amountCents", "spendLimitCents")
    assert p.require_test_mode and p.reads_body


def test_policy_errors_name_their_place(cfg_path: Path) -> None:
    d = doc()
    d["routes"][1]["policy"] = {
        "allow": ["FETCH /x", "GET no-slash"],
        "budget": {"amount_cents": 100, "per": "fortnight"},
        "rate": {"requests": 0, "per": "1m"},
        "tool": {},
    }
    err = load_error(write_config(cfg_path, d))
    for place in (
        "routes[1].policy.allow[0]",
        "routes[1].policy.allow[1]",
        "routes[1].policy.budget.per",
        "routes[1].policy.rate.requests",
        "routes[1].policy.tool",
    ):
        assert issues_at(err, place), place


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("/mcp/", "/mcp"),
        ("/api/v2", "/api/v2"),
        ("/api/v2/", "/api/v2"),
        ("/", "/"),
        ("/_brokerx", "/_brokerx"),
    ],
)
def test_prefix_normalization(cfg_path: Path, given: str, expected: str) -> None:
    d = doc()
    d["routes"][0]["prefix"] = given
    if expected == "/":
        d["routes"] = d["routes"][:1]
    cfg = load(write_config(cfg_path, d))
    assert cfg.routes[0].prefix == expected


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("/a/../b", ". or .."),
        ("/a/./b", ". or .."),
        ("/..", ". or .."),
        ("/_broker", "reserved"),
        ("/_broker/", "reserved"),
        ("/_broker/x", "reserved"),
        ("mcp", "starting with /"),
        ("/a//b", "plain path"),
        ("/a%2e", "plain path"),
        ("/a?x=1", "plain path"),
        ("/a\\b", "plain path"),
    ],
)
def test_bad_prefixes_are_refused(cfg_path: Path, prefix: str, words: str) -> None:
    d = doc()
    d["routes"][0]["prefix"] = prefix
    err = load_error(write_config(cfg_path, d))
    (issue,) = issues_at(err, "routes[0].prefix")
    assert words in issue.message


# ---------------------------------------------------------------- listen, remote, upstream


@pytest.mark.parametrize("addr", ["0.0.0.0:8765", "[::]:8765", "192.168.1.20:8765", "example.com:8765"])
def test_non_loopback_listen_is_refused(cfg_path: Path, addr: str) -> None:
    err = load_error(write_config(cfg_path, doc(listen=[addr])))
    (issue,) = issues_at(err, "listen[0]")
    assert "not a loopback address" in issue.message
    assert "allow_remote: true" in issue.message


def test_non_loopback_listen_allowed_with_allow_remote(cfg_path: Path) -> None:
    cfg = load(write_config(cfg_path, doc(listen=["0.0.0.0:8765"], allow_remote=True)))
    assert cfg.listen == (Listen("tcp", host="0.0.0.0", port=8765),)
    assert cfg.allow_remote is True


def test_listen_forms(cfg_path: Path, isolated_env: Path) -> None:
    listen = ["[::1]:8765", "unix:~/x.sock", "localhost:9000", "127.0.0.2:0"]
    cfg = load(write_config(cfg_path, doc(listen=listen)))
    assert cfg.listen == (
        Listen("tcp", host="::1", port=8765),
        Listen("unix", path=str(isolated_env / "x.sock")),
        Listen("tcp", host="localhost", port=9000),
        Listen("tcp", host="127.0.0.2", port=0),
    )
    assert [str(x) for x in cfg.listen] == [
        "[::1]:8765",
        f"unix:{isolated_env / 'x.sock'}",
        "localhost:9000",
        "127.0.0.2:0",
    ]


def test_listen_as_a_single_string(cfg_path: Path) -> None:
    cfg = load(write_config(cfg_path, doc(listen="127.0.0.1:9999")))
    assert cfg.listen == (Listen("tcp", host="127.0.0.1", port=9999),)


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        (["127.0.0.1:99999"], "between 0 and 65535"),
        (["127.0.0.1"], "HOST:PORT"),
        (["unix:"], "socket path"),
        ([], "non-empty list"),
        (["127.0.0.1:1", "127.0.0.1:1"], "listed twice"),
    ],
)
def test_bad_listen(cfg_path: Path, listen: list[str], words: str) -> None:
    err = load_error(write_config(cfg_path, doc(listen=listen)))
    assert any(words in i.message and i.place.startswith("listen") for i in err.issues), err.lines()


def test_http_upstream_refused_unless_insecure_allowed(cfg_path: Path) -> None:
    d = doc()
    d["routes"][1]["upstream"] = "http://127.0.0.1:9000"
    err = load_error(write_config(cfg_path, d))
    (issue,) = issues_at(err, "routes[1].upstream")
    assert "https://" in issue.message
    assert "allow_insecure_upstream" in issue.message

    cfg = load(write_config(cfg_path, {**d, "allow_insecure_upstream": True}))
    assert cfg.routes[1].upstream == "http://127.0.0.1:9000"


def test_http_token_url_refused_unless_insecure_allowed(cfg_path: Path) -> None:
    d = doc()
    d["routes"][1]["auth"] = {
        "type": "client_credentials",
        "token_url": "http://127.0.0.1:9000/token",
        "client_id": "abc",
        "client_secret": "env:PLATFORM_SECRET",
    }
    err = load_error(write_config(cfg_path, d))
    assert "https://" in issues_at(err, "routes[1].auth.token_url")[0].message

    cfg = load(write_config(cfg_path, {**d, "allow_insecure_upstream": True}))
    auth = cfg.routes[1].auth
    assert isinstance(auth, ClientCredentialsAuth)
    assert auth.client_secret == SecretRef("env", "PLATFORM_SECRET")


@pytest.mark.parametrize("upstream", ["ftp://api.agentcard.sh", "api.agentcard.sh", "https://", "https:///x"])
def test_upstream_must_be_absolute_https(cfg_path: Path, upstream: str) -> None:
    d = doc()
    d["routes"][1]["upstream"] = upstream
    err = load_error(write_config(cfg_path, d))
    assert issues_at(err, "routes[1].upstream")


@pytest.mark.parametrize(
    "upstream",
    ["https://agent:hunter2hunter2@api.agentcard.sh", "https://hunter2hunter2@api.agentcard.sh/v1"],
)
def test_upstream_with_userinfo_is_refused_without_echo(cfg_path: Path, upstream: str) -> None:
    d = doc()
    d["routes"][1]["upstream"] = upstream
    err = load_error(write_config(cfg_path, d))
    (issue,) = issues_at(err, "routes[1].upstream")
    assert "credentials" in issue.message
    assert_not_echoed(err, "hunter2hunter2")


def test_upstream_with_query_is_refused(cfg_path: Path) -> None:
    d = doc()
    d["routes"][1]["upstream"] = "https://api.agentcard.sh/?x=1"
    err = load_error(write_config(cfg_path, d))
    assert "query" in issues_at(err, "routes[1].upstream")[0].message


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


def test_several_problems_reported_together(cfg_path: Path) -> None:
    d = doc(bogus=1, listen=["0.0.0.0:8765"], limits={"max_body_bytes": "big"})
    d["routes"][1]["upstream"] = "http://api.agentcard.sh"
    d["routes"][1]["auth"]["key"] = TEST_KEY
    d["routes"].append(
        {"name": "mcp", "prefix": "/x", "upstream": "https://a.example", "auth": {"type": "oauth"}}
    )
    err = load_error(write_config(cfg_path, d))
    places = {i.place for i in err.issues}
    assert {
        "bogus",
        "listen[0]",
        "limits.max_body_bytes",
        "routes[1].upstream",
        "routes[1].auth.key",
        "routes[2].name",
    } <= places
    assert len(err.lines()) == len(err.issues) >= 6
    assert str(err).count("\n") == len(err.issues) - 1
    assert all(line.startswith(f"{cfg_path}:") for line in err.lines())
    assert all(i.line is not None for i in err.issues)
    assert_not_echoed(err, TEST_KEY)


# ---------------------------------------------------------------- YAML safety


def test_python_object_tag_refused_without_executing(cfg_path: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    text = (
        f'listen: !!python/object/apply:os.system ["touch {marker}"]\n'
        'x: !!python/object/apply:os.system ["echo hi"]\n'
        "y: !!python/name:os.system\n" + VALID[VALID.index("routes:") :]
    )
    err = load_error(write_text(cfg_path, text))
    assert not marker.exists()
    (issue,) = issues_at(err, "listen")
    assert issue.line == 1
    assert "tag" in issue.message
    assert "not allowed" in issue.message
    assert issues_at(err, "x")[0].line == 2
    assert issues_at(err, "y")[0].line == 3


@pytest.mark.parametrize("value", ["!!set {a, b}", "!!binary aGVsbG8=", "!!omap [a: 1]", "2020-01-01"])
def test_other_non_plain_tags_refused(cfg_path: Path, value: str) -> None:
    err = load_error(write_text(cfg_path, f"allowed_hosts: {value}\n" + VALID))
    assert "tag" in issues_at(err, "allowed_hosts")[0].message


def test_anchors_and_aliases_refused(cfg_path: Path) -> None:
    text = VALID.replace("    auth:\n      type: oauth\n", "    auth: &shared\n      type: oauth\n")
    text += "  - name: other\n    prefix: /other\n    upstream: https://a.example\n    auth: *shared\n"
    err = load_error(write_text(cfg_path, text))
    (issue,) = issues_at(err, "routes[2].auth")
    assert "anchors and aliases" in issue.message
    assert [i.place for i in err.issues] == ["routes[2].auth"]


def test_alias_issue_points_at_the_alias_line(cfg_path: Path) -> None:
    text = VALID.replace("    auth:\n      type: oauth\n", "    auth: &shared\n      type: oauth\n")
    text += "  - name: other\n    prefix: /other\n    upstream: https://a.example\n    auth: *shared\n"
    err = load_error(write_text(cfg_path, text))
    assert issues_at(err, "routes[2].auth")[0].line == 18


def test_alias_bomb_is_refused_quickly(cfg_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 20)]
    err = load_error(write_text(cfg_path, "\n".join(lines) + "\n" + VALID))
    assert any("anchors and aliases" in i.message for i in err.issues)


@pytest.mark.parametrize(
    ("broken", "line"),
    [
        (f"bad: {TEST_KEY}: oops\n", 16),
        (f'bad: "{TEST_KEY}\\q"\n', 16),
        (f"bad:\n\t- {TEST_KEY}\n", 17),
        (f"bad: [{TEST_KEY}\nmore: 1\n", 17),
    ],
)
def test_invalid_yaml_has_line_and_no_content(cfg_path: Path, broken: str, line: int) -> None:
    text = "# comment\n" + VALID + broken
    err = load_error(write_text(cfg_path, text))
    (issue,) = err.issues
    assert issue.message.startswith("not valid YAML")
    assert issue.line == line
    assert err.lines()[0].startswith(f"{cfg_path}:{line}: not valid YAML")
    assert_not_echoed(err, TEST_KEY, TEST_KEY[len("sk_test_") :])


def test_duplicate_yaml_keys(cfg_path: Path) -> None:
    text = "log: {level: info}\nlog: {level: debug}\n" + VALID + "      key: env:OTHER\n"
    err = load_error(write_text(cfg_path, text))
    (top,) = issues_at(err, "log")
    assert top.message == "duplicate key"
    assert top.line == 2
    (nested,) = issues_at(err, "routes[1].auth.key")
    assert nested.message == "duplicate key"
    assert nested.line == 17


def test_non_string_keys_refused(cfg_path: Path) -> None:
    err = load_error(write_text(cfg_path, "1: one\n" + VALID))
    assert any("plain strings" in i.message and i.line == 1 for i in err.issues)


# ---------------------------------------------------------------- file safety


@pytest.mark.parametrize("mode", [0o664, 0o620, 0o646, 0o666])
def test_group_or_world_writable_config_refused(cfg_path: Path, mode: int) -> None:
    write_config(cfg_path, doc())
    cfg_path.chmod(mode)
    err = load_error(cfg_path)
    (issue,) = err.issues
    assert "writable" in issue.message
    assert f"chmod go-w {cfg_path}" in issue.message


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o400])
def test_config_readable_by_others_is_fine(cfg_path: Path, mode: int) -> None:
    write_config(cfg_path, doc())
    cfg_path.chmod(mode)
    assert load(cfg_path).routes[1].name == "api"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_config_owned_by_someone_else_refused(cfg_path: Path) -> None:
    write_config(cfg_path, doc())
    os.chown(cfg_path, 54321, -1)
    err = load_error(cfg_path)
    assert any("owned by uid 54321" in i.message for i in err.issues)


def test_missing_config_and_directory(cfg_path: Path, tmp_path: Path) -> None:
    assert "not found" in load_error(cfg_path).issues[0].message
    assert "regular file" in load_error(tmp_path).issues[0].message


def test_not_utf8_config(cfg_path: Path) -> None:
    cfg_path.write_bytes(b"listen: ['\xff\xfe']\n")
    cfg_path.chmod(0o600)
    assert "cannot read" in load_error(cfg_path).issues[0].message


@pytest.mark.parametrize(
    "text",
    ["", "# nothing here yet\n", "listen: ['127.0.0.1:8765']\n"],
    ids=["empty", "comment", "no-routes"],
)
def test_config_without_routes_is_an_error_not_a_hang(cfg_path: Path, alarm: None, text: str) -> None:
    err = load_error(write_text(cfg_path, text))
    assert "routes" in [i.place for i in err.issues]


# ---------------------------------------------------------------- allowed_uids


def test_allowed_uids_self_and_numbers(cfg_path: Path) -> None:
    cfg = load(write_config(cfg_path, doc(allowed_uids=["self", 0, 4242, "self"])))
    assert cfg.allowed_uids == tuple(dict.fromkeys((os.getuid(), 0, 4242)))
    assert load(write_config(cfg_path, doc())).allowed_uids == (os.getuid(),)


@pytest.mark.parametrize("uid", ["nobody", -1, True, 1.5])
def test_allowed_uids_bad_entries(cfg_path: Path, uid: Any) -> None:
    err = load_error(write_config(cfg_path, doc(allowed_uids=["self", uid])))
    assert "numeric uid" in issues_at(err, "allowed_uids[1]")[0].message


def test_allowed_hosts_are_lowercased(cfg_path: Path) -> None:
    cfg = load(write_config(cfg_path, doc(allowed_hosts=["LocalHost", "127.0.0.1"])))
    assert cfg.allowed_hosts == ("localhost", "127.0.0.1")


# ---------------------------------------------------------------- find_config


@pytest.fixture
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


@pytest.fixture
def xdg_config(isolated_env: Path) -> Path:
    return Path(os.environ["XDG_CONFIG_HOME"]) / "agentcard-broker" / "config.yaml"


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_config(path, doc())
    return path


def test_find_config_explicit_wins(
    empty_cwd: Path, xdg_config: Path, isolated_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(xdg_config)
    _touch(empty_cwd / "config.yaml")
    monkeypatch.setenv("AGENTCARD_BROKER_CONFIG", str(xdg_config))
    assert find_config("~/elsewhere.yaml") == isolated_env / "elsewhere.yaml"
    assert find_config(str(empty_cwd / "x.yaml")) == empty_cwd / "x.yaml"


def test_find_config_env_before_user_dir(
    empty_cwd: Path, xdg_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(xdg_config)
    env_cfg = _touch(tmp_path / "env.yaml")
    monkeypatch.setenv("AGENTCARD_BROKER_CONFIG", str(env_cfg))
    assert find_config(None) == env_cfg


def test_find_config_env_is_never_skipped(
    empty_cwd: Path, xdg_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(xdg_config)
    monkeypatch.setenv("AGENTCARD_BROKER_CONFIG", str(tmp_path / "missing.yaml"))
    assert find_config(None) == tmp_path / "missing.yaml"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_CONFIG_HOME is the Linux user dir")
def test_find_config_xdg_before_cwd(empty_cwd: Path, xdg_config: Path) -> None:
    _touch(empty_cwd / "config.yaml")
    _touch(xdg_config)
    assert find_config(None) == xdg_config


def test_find_config_cwd_last(empty_cwd: Path, xdg_config: Path) -> None:
    _touch(empty_cwd / "config.yaml")
    assert not xdg_config.exists()
    found = find_config(None)
    assert found.resolve() == (empty_cwd / "config.yaml").resolve()
    assert load(found).routes[0].name == "mcp"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="XDG_CONFIG_HOME is the Linux user dir")
def test_find_config_none_names_every_place(empty_cwd: Path, xdg_config: Path) -> None:
    with pytest.raises(ConfigError) as info:
        find_config(None)
    text = str(info.value)
    assert str(xdg_config) in text
    assert str(Path.cwd() / "config.yaml") in text
    assert "--config" in text
    assert "no config file found" in text


def test_names_that_merely_contain_sk_test_are_not_secrets(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "routes:\n  - name: task_test_1\n    prefix: /\n    upstream: https://api.agentcard.sh\n"
        "    auth: {type: api_key}\n"
    )
    p.chmod(0o600)
    assert load(p).routes[0].name == "task_test_1"
