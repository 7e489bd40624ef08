"""Config documents the config tests vary, and ways to read the errors they give.

A valid config as text (so that line numbers are known) and as data (`doc()`, written with
tests.conftest.write_config), the shipped example, and helpers that find an issue by its place
or assert that no secret was echoed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from broker.config import ConfigError, ConfigIssue, load

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config.yaml"

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
