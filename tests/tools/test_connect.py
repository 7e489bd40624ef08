"""`connect HOST`: snippets for each agent host, and --write merges that keep what was there."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from broker import config as config_mod
from broker.config import ApiKeyAuth, Config, Listen, OAuthAuth, PlatformClient, Route
from broker.tools import ToolError, connect
from tests.conftest import TEST_KEY, store_key, write_config

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


# ---------------------------------------------------------------- the functions behind the command


def config_with(tmp_path: Path, listen: list[str]) -> Config:
    """The repository's config.yaml (routes mcp on /mcp and api on /) listening on `listen`."""
    doc = yaml.safe_load((REPO / "config.yaml").read_text())
    return config_mod.load(write_config(tmp_path / "c.yaml", {**doc, "listen": listen}))


def test_plan_for_a_config_uses_its_tcp_address_and_the_route(tmp_path: Path) -> None:
    cfg = config_with(tmp_path, ["unix:/tmp/not-used.sock", "127.0.0.1:9911"])
    assert connect.plan_for(cfg, "cursor", "mcp").entry == {"url": "http://127.0.0.1:9911/mcp"}
    assert connect.plan_for(cfg, "cursor", "api").entry == {"url": "http://127.0.0.1:9911"}
    assert "AGENTCARD_BASE_URL=http://127.0.0.1:9911\n" in connect.plan_for(cfg, "env", "mcp").text
    desktop = connect.plan_for(cfg, "claude-desktop", "mcp").entry
    assert desktop is not None
    assert desktop["args"][-4:] == ["stdio", "mcp", "--config", str((tmp_path / "c.yaml").resolve())]

    only_unix = config_with(tmp_path, ["unix:/tmp/not-used.sock"])
    with pytest.raises(ToolError, match="no TCP listen address; use `connect claude-desktop`"):
        connect.plan_for(only_unix, "cursor", "mcp")
    assert connect.plan_for(only_unix, "claude-desktop", "mcp").file is not None  # stdio needs no TCP
    with pytest.raises(ToolError, match="unknown host 'emacs'; one of: claude-desktop, "):
        connect.plan_for(cfg, "emacs", "mcp")


def test_preview_names_the_file_and_how_to_merge(tmp_path: Path, isolated_env: Path) -> None:
    cfg = config_with(tmp_path, ["127.0.0.1:9911"])
    cursor = connect.preview(connect.plan_for(cfg, "cursor", "mcp"))
    snippet = json.dumps({"mcpServers": {"agentcard": {"url": "http://127.0.0.1:9911/mcp"}}}, indent=2)
    assert cursor == (
        f"# Cursor: {isolated_env}/.cursor/mcp.json\n{snippet}\n"
        "# to merge it into that file (with a backup): agentcard-broker connect cursor --write\n"
    )
    code = connect.preview(connect.plan_for(cfg, "claude-code", "mcp"))
    assert code.splitlines() == [
        "# Claude Code (run this)",
        "claude mcp add --transport http agentcard http://127.0.0.1:9911/mcp",
    ]


def test_write_reports_and_refuses_with_tool_errors(tmp_path: Path, isolated_env: Path) -> None:
    cfg = config_with(tmp_path, ["127.0.0.1:9911"])
    desktop = connect.plan_for(cfg, "claude-desktop", "mcp")
    target = isolated_env / "desktop.json"
    assert connect.write(desktop, Path("~/desktop.json")) == [  # ~ is the user's home
        f"added `agentcard` to {target}",
        "restart Claude Desktop to load it",
    ]
    first, restart = connect.write(desktop, target)
    assert first.startswith(f"added `agentcard` to {target} (the previous file is at {target}.bak-")
    assert restart == "restart Claude Desktop to load it"
    assert json.loads(target.read_text())["mcpServers"]["agentcard"] == desktop.entry

    cursor = connect.plan_for(cfg, "cursor", "mcp")
    assert connect.write(cursor) == [f"added `agentcard` to {isolated_env}/.cursor/mcp.json"]  # its own file
    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    with pytest.raises(ToolError, match=r"^not written: .*broken.json is not valid JSON .*left untouched"):
        connect.write(cursor, broken)
    assert broken.read_text() == "{ not json"
    with pytest.raises(ToolError, match="keeps no config file this command can edit; run it without --write"):
        connect.write(connect.plan_for(cfg, "claude-code", "mcp"))


# ---------------------------------------------------------------- --per-user: chat platforms


def per_user_config(tmp_path: Path, auth: OAuthAuth, clients: tuple[str, ...] = ("librechat",)) -> Config:
    api = Route("api", "/", "https://api.example.test", ApiKeyAuth())
    return Config(
        path=str(tmp_path / "c.yaml"),
        listen=(Listen("tcp", "127.0.0.1", 9911),),
        routes=(Route("mcp", "/mcp", "https://mcp.example.test/mcp", auth), api),
        public_url="https://broker.example.test",
        clients=tuple(PlatformClient(n) for n in clients),
    )


def test_per_user_librechat_sends_the_user_header_and_a_token_reference(tmp_path: Path) -> None:
    auth = OAuthAuth(per_user=True, user_header="X-Chat-User", user_label_header="X-Chat-Email")
    plan = connect.plan_for(per_user_config(tmp_path, auth), "librechat", "mcp", per_user=True)
    assert plan.entry == {
        "type": "streamable-http",
        "url": "http://127.0.0.1:9911/mcp",
        "headers": {
            "X-Chat-User": "{{LIBRECHAT_USER_ID}}",  # the route's own user_header
            "Authorization": "Bearer ${AGENTCARD_BROKER_TOKEN}",  # LibreChat fills it from its .env
            "X-Chat-Email": "{{LIBRECHAT_USER_EMAIL}}",
        },
    }
    text = connect.preview(plan)
    assert yaml.safe_load(text)["mcpServers"]["agentcard"] == plan.entry  # the printed YAML is that entry
    assert "X-Chat-User: '{{LIBRECHAT_USER_ID}}'" in text
    assert "AGENTCARD_BROKER_TOKEN=<the token `agentcard-broker clients add librechat` printed>" in text
    assert "agentcard-broker connect librechat --per-user --write" in text
    assert "acb_" not in text and "note:" not in text

    target = tmp_path / "librechat.yaml"
    target.write_text("version: 1.2.1\n")
    connect.write(plan, target)
    assert yaml.safe_load(target.read_text()) == {"version": "1.2.1", "mcpServers": {"agentcard": plan.entry}}


def test_per_user_open_webui_forwards_user_info_headers(tmp_path: Path) -> None:
    auth = OAuthAuth(per_user=True, user_header="x-openwebui-user-id")
    cfg = per_user_config(tmp_path, auth, clients=("open_webui",))
    text = connect.preview(connect.plan_for(cfg, "open-webui", "mcp", per_user=True))
    assert "ENABLE_FORWARD_USER_INFO_HEADERS=true" in text
    assert "X-OpenWebUI-User-Id" in text
    assert "URL             http://127.0.0.1:9911/mcp" in text
    assert "Bearer, with the token `agentcard-broker clients add open_webui` printed" in text
    assert "Authorization: Bearer <token>" in text
    assert "acb_" not in text and "note:" not in text and "--write" not in text

    # a route reading another header, a platform missing from `clients:`: said, not guessed
    other = per_user_config(tmp_path, OAuthAuth(per_user=True), clients=("librechat",))
    text = connect.preview(connect.plan_for(other, "open-webui", "mcp", per_user=True))
    assert "note: route 'mcp' reads the user from X-User-ID, which Open WebUI does not send" in text
    assert "set `user_header: X-OpenWebUI-User-Id`" in text
    assert f"note: {other.path} names no client 'open-webui'" in text
    assert "clients add open-webui" in text


def test_per_user_is_refused_where_it_does_not_apply(tmp_path: Path) -> None:
    cfg = per_user_config(tmp_path, OAuthAuth())  # an oauth route with one shared login
    with pytest.raises(ToolError) as exc:
        connect.plan_for(cfg, "librechat", "mcp", per_user=True)
    assert str(exc.value).startswith(
        "route 'mcp' is not a per-user route: its one oauth credential is shared"
    )
    assert "`per_user: true`" in str(exc.value) and "without --per-user" in str(exc.value)
    with pytest.raises(ToolError, match="route 'api' is not a per-user route: its one api_key credential"):
        connect.plan_for(cfg, "open-webui", "api", per_user=True)
    with pytest.raises(ToolError, match=r"no route named 'nope' in .*\(routes: mcp, api\)"):
        connect.plan_for(cfg, "librechat", "nope", per_user=True)
    with pytest.raises(ToolError, match=r"--per-user is for chat platforms .*: librechat, open-webui"):
        connect.plan_for(per_user_config(tmp_path, OAuthAuth(per_user=True)), "cursor", "mcp", per_user=True)
