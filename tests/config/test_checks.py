"""broker/config/checks.py: every rule of the config file, each problem named by its place and line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from broker.config import Checker, ClientCredentialsAuth, ConfigIssue, Listen, SecretRef, load, parse_listen
from tests.config.documents import VALID, assert_not_echoed, doc, issues_at, load_error, write_text
from tests.conftest import TEST_KEY, write_config

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


def test_names_that_merely_contain_sk_test_are_not_secrets(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(
        "routes:\n  - name: task_test_1\n    prefix: /\n    upstream: https://api.agentcard.sh\n"
        "    auth: {type: api_key}\n"
    )
    p.chmod(0o600)
    assert load(p).routes[0].name == "task_test_1"


def test_checker_alone_reads_a_listen_address_as_the_cli_status_fallback_does() -> None:
    # `agentcard-broker status` reads the listen addresses of a broken config this way
    issues: list[ConfigIssue] = []
    assert parse_listen("127.0.0.1:9000", "listen", True, Checker({}, issues)) == Listen(
        "tcp", host="127.0.0.1", port=9000
    )
    assert parse_listen("nowhere", "listen", True, Checker({}, issues)) is None
    (issue,) = issues
    assert (issue.place, issue.line) == ("listen", None)
    assert "HOST:PORT" in issue.message
