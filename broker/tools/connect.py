"""`agentcard-broker connect HOST`: the snippet that points an agent host at the broker.

Owns: what each host needs (an HTTP MCP URL, or the `stdio` command for hosts that only start
local commands), where each host keeps its config, and merging our entry into that file with
a backup of the old one. Must never: write a secret (there is none to write: the broker holds
them all), or drop an entry the user already had.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ENTRY = "agentcard"


@dataclass(frozen=True)
class HostPlan:
    host: str
    title: str
    text: str  # what to print: a snippet or the steps
    file: Path | None = None  # where --write merges it
    fmt: str = ""  # json | yaml
    key: tuple[str, ...] = ()  # the mapping our entry goes under
    entry: dict[str, Any] | None = None


def _home() -> Path:
    return Path.home()


def claude_desktop_file() -> Path:
    if sys.platform == "darwin":
        return _home() / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
    if sys.platform.startswith("win"):
        return Path(os.environ.get("APPDATA", _home())) / "Claude" / "claude_desktop_config.json"
    return (
        Path(os.environ.get("XDG_CONFIG_HOME") or _home() / ".config")
        / "Claude"
        / "claude_desktop_config.json"
    )


HOSTS = ("claude-desktop", "claude-code", "cursor", "vscode", "open-webui", "librechat", "env")


def plan(host: str, mcp_url: str, rest_url: str, stdio_cmd: list[str]) -> HostPlan:
    if host == "claude-desktop":
        entry = {"command": stdio_cmd[0], "args": stdio_cmd[1:]}
        return _json_plan(host, "Claude Desktop", claude_desktop_file(), ("mcpServers",), entry)
    if host == "cursor":
        return _json_plan(host, "Cursor", _home() / ".cursor" / "mcp.json", ("mcpServers",), {"url": mcp_url})
    if host == "vscode":
        entry = {"type": "http", "url": mcp_url}
        return _json_plan(
            host, "VS Code (this workspace)", Path.cwd() / ".vscode" / "mcp.json", ("servers",), entry
        )
    if host == "librechat":
        entry = {"type": "streamable-http", "url": mcp_url}
        text = yaml.safe_dump({"mcpServers": {ENTRY: entry}}, sort_keys=False)
        return HostPlan(
            host,
            "LibreChat (librechat.yaml)",
            text,
            Path.cwd() / "librechat.yaml",
            "yaml",
            ("mcpServers",),
            entry,
        )
    if host == "claude-code":
        text = f"claude mcp add --transport http {ENTRY} {mcp_url}\n"
        return HostPlan(host, "Claude Code (run this)", text)
    if host == "open-webui":
        text = (
            "In Open WebUI: Admin Settings -> External Tools -> add a server of type\n"
            f'"MCP (Streamable HTTP)" with URL {mcp_url} and authentication "None".\n'
            "(When Open WebUI runs in Docker, use the host's address the container can reach,\n"
            "and add that name to allowed_hosts in the broker's config.)\n"
        )
        return HostPlan(host, "Open WebUI", text)
    if host == "env":
        text = f"export AGENTCARD_BASE_URL={rest_url}\nunset AGENTCARD_API_KEY   # the broker adds the key\n"
        return HostPlan(host, "REST clients (environment)", text)
    raise ValueError(f"unknown host {host!r}; one of: {', '.join(HOSTS)}")


def _json_plan(host: str, title: str, file: Path, key: tuple[str, ...], entry: dict[str, Any]) -> HostPlan:
    doc: dict[str, Any] = {}
    cursor = doc
    for k in key:
        cursor = cursor.setdefault(k, {})
    cursor[ENTRY] = entry
    return HostPlan(host, title, json.dumps(doc, indent=2) + "\n", file, "json", key, entry)


def merge(p: HostPlan, file: Path) -> Path | None:
    """Merge our entry into `file`, keeping everything else. Returns the backup's path (None if new)."""
    assert p.entry is not None
    existing: Any = {}
    backup = None
    if file.exists():
        text = file.read_text(encoding="utf-8")
        try:
            existing = (
                (json.loads(text) if text.strip() else {})
                if p.fmt == "json"
                else (yaml.safe_load(text) or {})
            )
        except (ValueError, yaml.YAMLError) as exc:
            raise ValueError(
                f"{file} is not valid {p.fmt.upper()} ({type(exc).__name__}); left untouched"
            ) from None
        if not isinstance(existing, dict):
            raise ValueError(f"{file} does not hold a {p.fmt.upper()} object; left untouched")
        backup = file.with_name(f"{file.name}.bak-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.copy2(file, backup)
    cursor = existing
    for k in p.key:
        nxt = cursor.get(k)
        if nxt is None:
            nxt = cursor[k] = {}
        if not isinstance(nxt, dict):
            raise ValueError(f"{file}: `{k}` is not an object; left untouched")
        cursor = nxt
    cursor[ENTRY] = p.entry
    out = (
        json.dumps(existing, indent=2) + "\n"
        if p.fmt == "json"
        else yaml.safe_dump(existing, sort_keys=False)
    )
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(out, encoding="utf-8")
    if file.exists():
        shutil.copymode(file, tmp)
    tmp.replace(file)
    return backup
