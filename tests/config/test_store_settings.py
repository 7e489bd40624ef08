"""broker/config/store_settings.py: `store:` as sqlite, a Redis URL, or the mapping form; every
problem named by its place and line, and no URL or secret echoed back."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import RedisSettings, SecretRef, load
from tests.config.documents import VALID, assert_not_echoed, issues_at, load_error, write_text


def store_issue(cfg_path: Path, store_text: str, place: str = "store") -> str:
    err = load_error(write_text(cfg_path, f"store: {store_text}\n" + VALID))
    (issue,) = issues_at(err, place)
    assert issue.line is not None and issue.line <= 1 + store_text.count("\n") + 1, err.lines()
    return issue.message


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "rediss://cache.example.com:6380/1", "redis://[::1]:6379", "redis://r"],
)
def test_redis_url_short_form(cfg_path: Path, url: str) -> None:
    cfg = load(write_text(cfg_path, f"store: {url}\n" + VALID))
    assert (cfg.store, cfg.redis) == ("redis", RedisSettings(url))


def test_sqlite_has_no_redis_settings(cfg_path: Path) -> None:
    cfg = load(write_text(cfg_path, "store: sqlite\n" + VALID))
    assert (cfg.store, cfg.redis) == ("sqlite", None)


def test_mapping_form(cfg_path: Path) -> None:
    text = (
        "store:\n  url: rediss://redis.internal:6380/2\n  password: env:REDIS_PASSWORD\n"
        "  username: broker\n  ca_file: /etc/ssl/redis-ca.pem\n"
        "  master_key: file:/run/secrets/master_key\n  prefix: acb-prod\n"
    )
    cfg = load(write_text(cfg_path, text + VALID))
    assert cfg.redis == RedisSettings(
        "rediss://redis.internal:6380/2",
        password=SecretRef("env", "REDIS_PASSWORD"),
        username="broker",
        ca_file="/etc/ssl/redis-ca.pem",
        master_key=SecretRef("file", "/run/secrets/master_key"),
        prefix="acb-prod",
    )


def test_mapping_defaults(cfg_path: Path) -> None:
    cfg = load(write_text(cfg_path, "store: {url: 'redis://r:6379/0', password: keyring}\n" + VALID))
    assert cfg.redis is not None
    assert cfg.redis.password == SecretRef("keyring")
    assert (cfg.redis.master_key, cfg.redis.prefix, cfg.redis.username) == (None, "agentcard-broker", None)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2pass@redis:6379/0",
        "redis://broker:hunter2pass@redis:6379/0",
        "rediss://hunter2pass@redis:6380/0",
    ],
)
def test_password_in_url_refused_and_not_echoed(cfg_path: Path, url: str) -> None:
    err = load_error(write_text(cfg_path, f"store: {url}\n" + VALID))
    (issue,) = issues_at(err, "store")
    assert "must not carry a user name or password" in issue.message
    assert "password: keyring" in issue.message
    assert_not_echoed(err, "hunter2pass")


def test_literal_password_refused(cfg_path: Path) -> None:
    err = load_error(write_text(cfg_path, "store: {url: 'redis://r/0', password: hunter2pass}\n" + VALID))
    assert issues_at(err, "store.password")
    assert_not_echoed(err, "hunter2pass")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("redis://r:99999/0", "port from 1 to 65535"),
        ("redis://r:0/0", "port from 1 to 65535"),
        ("redis://r:abc/0", "port from 1 to 65535"),
        ("redis://r/abc", "database number"),
        ("redis://r/0?password=hunter2pass", "query string"),
        ("redis://r/0#frag", "query string"),
        ("'redis://'", "must name a host"),
        ("'redis://bad_host!/0'", "must name a host"),
        ("'redis://r /0'", "spaces or control"),
        ("unix:///run/redis.sock", "redis:// or rediss://"),
        ("http://r:6379", "redis:// or rediss://"),
    ],
)
def test_bad_urls(cfg_path: Path, value: str, words: str) -> None:
    message = store_issue(cfg_path, value)
    assert words in message
    assert "hunter2pass" not in message


@pytest.mark.parametrize(
    ("text", "place", "words"),
    [
        ("{password: keyring}", "store.url", "is required"),
        ("{url: 'redis://r/0', ca_file: /x.pem}", "store.ca_file", "only applies to rediss://"),
        ("{url: 'rediss://r/0', ca_file: 5}", "store.ca_file", "path of a PEM CA bundle"),
        ("{url: 'redis://r/0', prefix: 'a b'}", "store.prefix", "1-64 of letters"),
        ("{url: 'redis://r/0', prefix: ''}", "store.prefix", "1-64 of letters"),
        ("{url: 'redis://r/0', username: 'x y'}", "store.username", "letters, digits"),
        ("{url: 'redis://r/0', master_key: 'vault:x'}", "store.master_key", "literal secret"),
        ("{url: 'redis://r/0', tls: true}", "store.tls", ""),
    ],
)
def test_bad_mapping(cfg_path: Path, text: str, place: str, words: str) -> None:
    message = store_issue(cfg_path, text, place)
    assert words in message
