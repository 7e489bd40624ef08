"""`agentcard-broker connect HOST`: the snippet that points an agent host at the broker.

Owns: what each host needs (an HTTP MCP URL on the config's first TCP listen address, or the
`stdio` command for hosts that only start local commands), where each host keeps its config,
what `connect` prints, and merging our entry into that file with a backup of the old one.
Must never: write a secret (there is none to write: the broker holds them all), or drop an
entry the user already had.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from broker.service.units import broker_command
from broker.tools import ToolError

if TYPE_CHECKING:
    from broker.config import Config

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
    raise ToolError(f"unknown host {host!r}; one of: {', '.join(HOSTS)}")


def plan_for(config: Config, host: str, route_name: str) -> HostPlan:
    """The plan for `host` to reach route `route_name` of the broker that `config` describes."""
    route = config.route(route_name)
    tcp = next((x for x in config.listen if x.kind == "tcp" and x.port), None)
    base = f"http://{tcp}" if tcp else ""
    prefix = route.prefix if route and route.prefix != "/" else ""
    stdio_cmd = [*broker_command(), "stdio", route_name, "--config", str(Path(config.path).resolve())]
    p = plan(host, base + prefix, base, stdio_cmd)
    if not base and host != "claude-desktop":
        raise ToolError("the config has no TCP listen address; use `connect claude-desktop` (stdio) instead")
    return p


def preview(p: HostPlan) -> str:
    """What `connect HOST` prints: the snippet under its title, and how to merge it."""
    text = f"# {p.title}" + (f": {p.file}" if p.file else "") + "\n" + p.text
    if p.file:
        text += f"# to merge it into that file (with a backup): agentcard-broker connect {p.host} --write\n"
    return text


def write(p: HostPlan, file: Path | None = None) -> list[str]:
    """`connect HOST --write`: merge our entry into `file` (default: the host's own config file).
    Returns the lines that report it."""
    if p.file is None:
        raise ToolError(f"{p.title} keeps no config file this command can edit; run it without --write")
    target = file.expanduser() if file else p.file
    try:
        backup = merge(p, target)
    except (ValueError, OSError) as exc:
        raise ToolError(f"not written: {exc}") from None
    report = [f"added `{ENTRY}` to {target}" + (f" (the previous file is at {backup})" if backup else "")]
    if p.host == "claude-desktop":
        report.append("restart Claude Desktop to load it")
    return report


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
