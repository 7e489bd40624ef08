"""broker/config/locations.py: where the config is looked for, in order, and what is said if nowhere."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from broker.config import ConfigError, find_config, load
from tests.config.documents import doc
from tests.conftest import write_config

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
