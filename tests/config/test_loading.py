"""broker/config/loading.py: the shipped example loads; a file others may edit, or unreadable, is
refused; a file that does not load still says where the daemon listens."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from broker.config import ApiKeyAuth, Listen, OAuthAuth, SecretRef, file_stamp, load, load_listen_only
from tests.config.documents import REPO_CONFIG, VALID, doc, load_error, write_text
from tests.conftest import write_config

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
    # SPEC: the shipped config denies the tools an agent must never use and holds card details
    assert mcp.policy is not None and mcp.policy.approve is not None
    assert mcp.policy.tools_deny == {"approve_request", "withdraw_wallet", "upgrade_plan", "set_mode"}
    assert mcp.policy.approve.tools == {"get_card_details"} and mcp.policy.approve.wait_s == 120
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


# ---------------------------------------------------------------- listen addresses of a broken file


def test_a_broken_file_still_gives_its_listen_addresses(cfg_path: Path, tmp_path: Path) -> None:
    sock = tmp_path / "b.sock"
    write_text(cfg_path, f"listen: ['127.0.0.1:9001', 'not an address', 'unix:{sock}']\nroutes: oops\n")
    assert "routes" in [i.place for i in load_error(cfg_path).issues]
    cfg = load_listen_only(str(cfg_path))
    assert cfg is not None
    assert cfg.path == str(cfg_path)
    assert cfg.listen == (Listen("tcp", host="127.0.0.1", port=9001), Listen("unix", path=str(sock)))
    assert cfg.routes == ()


def test_a_remote_address_is_kept_and_a_world_writable_file_is_read(cfg_path: Path) -> None:
    # only where to ask: nothing is bound, so neither allow_remote nor file safety applies
    write_text(cfg_path, "listen: ['192.0.2.7:9002']\nroutes: []\n")
    cfg_path.chmod(0o666)
    cfg = load_listen_only(str(cfg_path))
    assert cfg is not None and cfg.listen == (Listen("tcp", host="192.0.2.7", port=9002),)


@pytest.mark.parametrize(
    "content",
    [
        None,
        b"routes: oops\n",
        b"routes: [\n",
        b"just words\n",
        b"listen: ['\xff\xfe']\n",
    ],
    ids=["missing", "no-listen", "bad-yaml", "not-a-mapping", "not-utf8"],
)
def test_no_listen_list_to_read_gives_the_default_address(cfg_path: Path, content: bytes | None) -> None:
    if content is not None:
        cfg_path.write_bytes(content)
        cfg_path.chmod(0o600)
    cfg = load_listen_only(str(cfg_path))
    assert cfg is not None and cfg.listen == (Listen("tcp", host="127.0.0.1", port=8765),)


def test_a_single_address_and_a_fifo(cfg_path: Path, tmp_path: Path) -> None:
    write_text(cfg_path, "listen: 127.0.0.1:9003\nroutes: oops\n")
    cfg = load_listen_only(str(cfg_path))
    assert cfg is not None and cfg.listen == (Listen("tcp", host="127.0.0.1", port=9003),)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # nobody writes to it: reading it would wait for ever
    cfg = load_listen_only(str(fifo))
    assert cfg is not None and cfg.listen == (Listen("tcp", host="127.0.0.1", port=8765),)


def test_no_address_that_parses_gives_none(cfg_path: Path) -> None:
    write_text(cfg_path, "listen: ['garbage', 12]\nroutes: oops\n")
    assert load_listen_only(str(cfg_path)) is None
