"""`connect HOST`: snippets for each agent host, and --write merges that keep what was there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TEST_KEY, store_key

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "config.yaml"
    shutil.copy(REPO / "config.yaml", p)
    p.chmod(0o600)
    store_key(TEST_KEY)  # a stored key must never show up in any snippet
    return p


@pytest.mark.parametrize(
    ("host", "expect"),
    [
        ("claude-desktop", '"stdio"'),
        ("claude-code", "claude mcp add --transport http agentcard http://127.0.0.1:8765/mcp"),
        ("cursor", '"url": "http://127.0.0.1:8765/mcp"'),
        ("vscode", '"type": "http"'),
        ("open-webui", "MCP (Streamable HTTP)"),
        ("librechat", "type: streamable-http"),
        ("env", "export AGENTCARD_BASE_URL=http://127.0.0.1:8765"),
    ],
)
def test_snippets(cfg: Path, host: str, expect: str) -> None:
    r = run("connect", host, "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert expect in r.stdout
    assert TEST_KEY not in r.stdout and "sk_" not in r.stdout


def test_unknown_host(cfg: Path) -> None:
    r = run("connect", "emacs", "--config", str(cfg))
    assert r.returncode == 1
    assert "claude-desktop" in r.stderr


@pytest.mark.parametrize(
    ("host", "existing", "path"),
    [
        (
            "claude-desktop",
            {"mcpServers": {"files": {"command": "npx", "args": ["x"]}}, "theme": "dark"},
            ["mcpServers"],
        ),
        ("cursor", {"mcpServers": {"github": {"url": "https://example.test/mcp"}}}, ["mcpServers"]),
        ("vscode", {"servers": {"other": {"type": "stdio", "command": "x"}}, "inputs": []}, ["servers"]),
    ],
)
def test_write_merges_json_and_keeps_a_backup(
    cfg: Path, tmp_path: Path, host: str, existing: dict[str, object], path: list[str]
) -> None:
    target = tmp_path / "host" / "config.json"
    target.parent.mkdir()
    original = json.dumps(existing, indent=4)
    target.write_text(original)
    r = run("connect", host, "--write", "--file", str(target), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    merged = json.loads(target.read_text())
    servers = merged[path[0]]
    for name, value in existing[path[0]].items():  # type: ignore[attr-defined]
        assert servers[name] == value  # what the user had is still there
    assert "agentcard" in servers
    for key in existing:
        assert key in merged
    backups = list(target.parent.glob("config.json.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == original
    assert TEST_KEY not in target.read_text()
    again = run("connect", host, "--write", "--file", str(target), "--config", str(cfg))
    assert again.returncode == 0
    assert json.loads(target.read_text()) == merged  # idempotent: one entry, not two


def test_write_librechat_yaml_and_new_files(cfg: Path, tmp_path: Path) -> None:
    target = tmp_path / "librechat.yaml"
    target.write_text("version: 1.2.1\nmcpServers:\n  fs:\n    command: npx\n")
    r = run("connect", "librechat", "--write", "--file", str(target), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(target.read_text())
    assert doc["version"] == "1.2.1"
    assert doc["mcpServers"]["fs"] == {"command": "npx"}
    assert doc["mcpServers"]["agentcard"] == {"type": "streamable-http", "url": "http://127.0.0.1:8765/mcp"}
    fresh = tmp_path / "new" / "mcp.json"
    r = run("connect", "cursor", "--write", "--file", str(fresh), "--config", str(cfg))
    assert r.returncode == 0
    assert json.loads(fresh.read_text()) == {
        "mcpServers": {"agentcard": {"url": "http://127.0.0.1:8765/mcp"}}
    }


def test_write_refuses_a_broken_file_and_leaves_it(cfg: Path, tmp_path: Path) -> None:
    target = tmp_path / "broken.json"
    target.write_text("{ not json")
    r = run("connect", "cursor", "--write", "--file", str(target), "--config", str(cfg))
    assert r.returncode == 1
    assert "left untouched" in r.stderr
    assert target.read_text() == "{ not json"
    r = run("connect", "claude-code", "--write", "--config", str(cfg))
    assert r.returncode == 1 and "without --write" in r.stderr
