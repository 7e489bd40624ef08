"""`agentcard-broker connect HOST`: the snippet that points an agent host at the broker.

Owns: what each host needs (an HTTP MCP URL on the config's first TCP listen address, or the
`stdio` command for hosts that only start local commands), where each host keeps its config,
what `connect` prints, and merging our entry into that file with a backup of the old one; with
`--per-user`, what a chat platform sends on a per-user route (its client token, the user header).
Must never: write a secret (there is none to write: the broker holds them all, and a platform's
client token appears only as a reference to where the platform keeps it), or drop an entry the
user already had.
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
    from broker.config import Config, OAuthAuth

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
    per_user: bool = False  # made by `connect HOST --per-user`


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


def plan_for(config: Config, host: str, route_name: str, per_user: bool = False) -> HostPlan:
    """The plan for `host` to reach route `route_name` of the broker that `config` describes;
    `per_user`: as a chat platform on a per-user route, each of its users with their own grant."""
    route = config.route(route_name)
    tcp = next((x for x in config.listen if x.kind == "tcp" and x.port), None)
    base = f"http://{tcp}" if tcp else ""
    prefix = route.prefix if route and route.prefix != "/" else ""
    if per_user:
        return _per_user_plan(config, host, route_name, base + prefix if base else "")
    stdio_cmd = [*broker_command(), "stdio", route_name, "--config", str(Path(config.path).resolve())]
    p = plan(host, base + prefix, base, stdio_cmd)
    if not base and host != "claude-desktop":
        raise ToolError("the config has no TCP listen address; use `connect claude-desktop` (stdio) instead")
    return p


# ---------------------------------------------------------------- --per-user: chat platforms

PER_USER_HOSTS = ("librechat", "open-webui")
OPEN_WEBUI_USER_HEADER = "X-OpenWebUI-User-Id"  # sent with ENABLE_FORWARD_USER_INFO_HEADERS=true
OPEN_WEBUI_EMAIL_HEADER = "X-OpenWebUI-User-Email"


def _per_user_auth(config: Config, host: str, route_name: str) -> OAuthAuth:
    """The route's auth block, when it is a per-user route; else why `--per-user` does not apply."""
    from broker.config import OAuthAuth

    if host not in PER_USER_HOSTS:
        raise ToolError(
            f"--per-user is for chat platforms whose users each connect their own AgentCard: "
            f"{', '.join(PER_USER_HOSTS)} (not {host!r})"
        )
    route = config.route(route_name)
    if route is None:
        names = ", ".join(r.name for r in config.routes)
        raise ToolError(f"no route named {route_name!r} in {config.path} (routes: {names})")
    if not isinstance(route.auth, OAuthAuth) or not route.auth.per_user:
        raise ToolError(
            f"route {route_name!r} is not a per-user route: its one {route.auth.type} credential is "
            f"shared by every caller, so all of {host}'s users would act as one AgentCard account. "
            f"For one grant per user, give an oauth route `per_user: true` under its `auth:` in "
            f"{config.path}; to share the one credential on purpose, run `agentcard-broker connect {host}` "
            "without --per-user."
        )
    return route.auth


def _client_name(config: Config, host: str) -> str | None:
    """The `clients:` entry named after this platform (`open-webui`, `openwebui`, `Open_WebUI`...)."""

    def bare(name: str) -> str:
        return "".join(ch for ch in name.lower() if ch.isalnum())

    return next((c.name for c in config.clients if bare(c.name) == bare(host)), None)


def _per_user_plan(config: Config, host: str, route_name: str, mcp_url: str) -> HostPlan:
    auth = _per_user_auth(config, host, route_name)
    if not mcp_url:
        raise ToolError(f"the config has no TCP listen address for {host} to reach route {route_name!r}")
    client = _client_name(config, host)
    make_token = f"agentcard-broker clients add {client or host}"
    notes = []
    if client is None:
        notes.append(f"{config.path} names no client {host!r}: add `- name: {host}` under `clients:` first")
    if not config.public_url:
        notes.append("set `public_url:` in the config: users' browsers open their connect links there")
    if host == "librechat":
        from broker.auth.platform_clients import TOKEN_ENV

        headers = {auth.user_header: "{{LIBRECHAT_USER_ID}}", "Authorization": f"Bearer ${{{TOKEN_ENV}}}"}
        if auth.user_label_header:
            headers[auth.user_label_header] = "{{LIBRECHAT_USER_EMAIL}}"
        entry = {"type": "streamable-http", "url": mcp_url, "headers": headers}
        text = yaml.safe_dump({"mcpServers": {ENTRY: entry}}, sort_keys=False)
        text += f"# and in LibreChat's .env: {TOKEN_ENV}=<the token `{make_token}` printed>\n"
        text += "".join(f"# note: {n}\n" for n in notes)
        title = f"LibreChat (librechat.yaml), per-user route {route_name}"
        file = Path.cwd() / "librechat.yaml"
        return HostPlan(host, title, text, file, "yaml", ("mcpServers",), entry, per_user=True)
    if auth.user_header.lower() != OPEN_WEBUI_USER_HEADER.lower():
        notes.append(
            f"route {route_name!r} reads the user from {auth.user_header}, which Open WebUI does not send: "
            f"set `user_header: {OPEN_WEBUI_USER_HEADER}` under its `auth:`"
        )
    text = (
        "1. In Open WebUI's environment (docker -e, or its .env), then restart it:\n"
        "     ENABLE_FORWARD_USER_INFO_HEADERS=true\n"
        f"   Open WebUI then sends {OPEN_WEBUI_USER_HEADER} (and {OPEN_WEBUI_EMAIL_HEADER})"
        " with each request.\n"
        '2. Admin Settings -> External Tools -> add a server of type "MCP (Streamable HTTP)":\n'
        f"     URL             {mcp_url}\n"
        f"     Authentication  Bearer, with the token `{make_token}` printed\n"
        "   (the broker receives it as `Authorization: Bearer <token>` and never passes it on).\n"
        "   When Open WebUI runs in Docker, use an address the container can reach and add its name\n"
        "   to allowed_hosts in the broker's config.\n"
    )
    text += "".join(f"note: {n}\n" for n in notes)
    return HostPlan(host, f"Open WebUI, per-user route {route_name}", text, per_user=True)


def preview(p: HostPlan) -> str:
    """What `connect HOST` prints: the snippet under its title, and how to merge it."""
    text = f"# {p.title}" + (f": {p.file}" if p.file else "") + "\n" + p.text
    if p.file:
        flags = " --per-user --write" if p.per_user else " --write"
        text += f"# to merge it into that file (with a backup): agentcard-broker connect {p.host}{flags}\n"
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
