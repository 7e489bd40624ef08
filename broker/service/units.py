"""Service files: the systemd user unit, the system-user unit, and the launchd agent.

Owns: rendering each file from one template with this user's real paths, writing and removing
them (`install-service`, `uninstall-service`: what they do and the lines that report it), and
the commands that enable them. The files in the repository's systemd/ and launchd/ folders are
renderings of these same templates (a test keeps them equal). Must never: put a secret into a
service file or its environment.
"""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "agentcard-broker.service"
LAUNCHD_LABEL = "sh.agentcard.broker"
SYSTEM_USER = "agentcard-broker"
SYSTEM_GROUP = "agentcard-clients"
SYSTEM_CONFIG = "/etc/agentcard-broker/config.yaml"
SYSTEM_STATE = "/var/lib/agentcard-broker"
SYSTEM_SOCKET = "/run/agentcard-broker/broker.sock"


class ServiceError(ValueError):
    """A service file this platform or user cannot have, or cannot write; printed as is."""


# Sandboxing shared by both units. Each line still lets the broker read its config, write its
# state dir, reach the keyring over D-Bus (a unix socket) and the upstream over TCP.
_HARDENING = """\
UMask=0077
LimitCORE=0
NoNewPrivileges=yes
ProtectSystem=strict
PrivateTmp=yes
PrivateDevices=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
"""

_USER_UNIT = """\
# agentcard-broker as a systemd user service.
# Written by `agentcard-broker install-service`; settings live in config.yaml, not here.
#   systemctl --user daemon-reload && systemctl --user enable --now agentcard-broker
[Unit]
Description=agentcard-broker: AgentCard credentials for local AI agents
After=dbus.socket

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
# 78 = bad config: restarting cannot fix it, `agentcard-broker check` can
RestartPreventExitStatus=78
TimeoutStopSec={stop_timeout}
WatchdogSec=60
StateDirectory=agentcard-broker
RuntimeDirectory=agentcard-broker
{hardening}
[Install]
WantedBy=default.target
"""

_SYSTEM_UNIT = """\
# agentcard-broker as its own system user: even malware running as you cannot read the key.
# Agents reach it on {socket} (group {group}) or on loopback TCP (uid-checked).
# Written by `agentcard-broker install-service --system`; see README "Running as a system user".
[Unit]
Description=agentcard-broker (system user): AgentCard credentials for local AI agents
After=network.target

[Service]
Type=notify
NotifyAccess=main
User={user}
Group={group}
ExecStart={exec_start}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
RestartPreventExitStatus=78
TimeoutStopSec={stop_timeout}
WatchdogSec=60
StateDirectory=agentcard-broker
StateDirectoryMode=0700
RuntimeDirectory=agentcard-broker
RuntimeDirectoryMode=0750
ConfigurationDirectory=agentcard-broker
Environment=HOME={state}
ProtectHome=yes
CapabilityBoundingSet=
{hardening}
[Install]
WantedBy=multi-user.target
"""


def systemd_quote(arg: str) -> str:
    """One ExecStart argument: specifiers and variables escaped, quoted when needed."""
    escaped = arg.replace("\\", "\\\\").replace("%", "%%").replace("$", "$$").replace('"', '\\"')
    return f'"{escaped}"' if any(c.isspace() for c in arg) or not arg else escaped


def user_unit(exec_start: str, stop_timeout: int = 45) -> str:
    return _USER_UNIT.format(exec_start=exec_start, stop_timeout=stop_timeout, hardening=_HARDENING)


def system_unit(exec_start: str, stop_timeout: int = 45) -> str:
    return _SYSTEM_UNIT.format(
        exec_start=exec_start,
        stop_timeout=stop_timeout,
        hardening=_HARDENING,
        user=SYSTEM_USER,
        group=SYSTEM_GROUP,
        state=SYSTEM_STATE,
        socket=SYSTEM_SOCKET,
    )


def system_config(client_uid: int) -> str:
    """The config.yaml for the system-user setup: unix socket for the group, file secret store."""
    return f"""\
# agentcard-broker running as the `{SYSTEM_USER}` system user (README "Running as a system user").
# Store the key as that user:
#   sudo -u {SYSTEM_USER} agentcard-broker set-key api --config {SYSTEM_CONFIG}
listen:
  - unix:{SYSTEM_SOCKET}
  - 127.0.0.1:8765
socket_mode: "0660"          # the {SYSTEM_GROUP} group may connect to the socket
allowed_uids: [self, {client_uid}]   # the broker itself (for set-key and status) and your user
secret_store: file           # 0600 in {SYSTEM_STATE}: no login keyring for a system user
state_dir: {SYSTEM_STATE}
routes:
  - name: mcp
    prefix: /mcp
    upstream: https://mcp.agentcard.sh/mcp
    auth: {{type: oauth, scopes: [], redirect_port: 8766}}
  - name: api
    prefix: /
    upstream: https://api.agentcard.sh
    auth: {{type: api_key, key: keyring, allow_live: false}}
"""


def launchd_plist(program: list[str], home: Path, exit_timeout: int = 45) -> bytes:
    logs = home / "Library" / "Logs" / "agentcard-broker"
    doc = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": program,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},  # restart after a crash, not after a clean stop
        "ThrottleInterval": 10,
        "ProcessType": "Background",
        "Umask": 0o077,
        "ExitTimeOut": exit_timeout,
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
        "StandardOutPath": str(logs / "broker.log"),
        "StandardErrorPath": str(logs / "broker.log"),
    }
    return plistlib.dumps(doc, sort_keys=False)


# ---------------------------------------------------------------- where and with what


def broker_command() -> list[str]:
    """The real command that starts this installation of the broker."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "agentcard-broker" and argv0.exists():
        return [str(argv0.resolve())]
    found = shutil.which("agentcard-broker")
    if found:
        return [str(Path(found).resolve())]
    return [str(Path(sys.executable).resolve()), "-m", "broker"]


@dataclass(frozen=True)
class ServiceFile:
    path: Path
    content: bytes
    enable: list[str]  # commands to print after writing
    disable: list[list[str]]  # commands uninstall runs (best effort) before removing


def plan(config_path: Path, *, system: bool = False, drain: float = 30.0) -> ServiceFile:
    """The file to write for this OS and user, and the commands around it."""
    cmd = broker_command()
    stop_timeout = int(drain) + 15
    if sys.platform == "darwin":
        if system:
            raise ServiceError("--system is for Linux (systemd); on macOS use the per-user agent")
        home = Path.home()
        path = home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        program = [*cmd, "run", "--config", str(config_path)]
        uid = os.getuid()
        return ServiceFile(
            path,
            launchd_plist(program, home, stop_timeout),
            [
                f"launchctl bootstrap gui/{uid} {path}",
                f"launchctl kickstart -k gui/{uid}/{LAUNCHD_LABEL}",
                f"tail -f {home}/Library/Logs/agentcard-broker/broker.log",
            ],
            [["launchctl", "bootout", f"gui/{uid}/{LAUNCHD_LABEL}"]],
        )
    if not sys.platform.startswith("linux"):
        raise ServiceError(
            f"no service manager support for {sys.platform}; run `agentcard-broker run` yourself"
        )
    if system:
        exec_start = " ".join(systemd_quote(a) for a in [*cmd, "run", "--config", SYSTEM_CONFIG])
        return ServiceFile(
            Path("/etc/systemd/system") / UNIT_NAME,
            system_unit(exec_start, stop_timeout).encode(),
            [
                f"useradd --system --home-dir {SYSTEM_STATE} --shell /usr/sbin/nologin {SYSTEM_USER}",
                f"groupadd --system {SYSTEM_GROUP} && usermod -aG {SYSTEM_GROUP} YOUR_USER",
                "systemctl daemon-reload && systemctl enable --now agentcard-broker",
                f"sudo -u {SYSTEM_USER} agentcard-broker set-key api --config {SYSTEM_CONFIG}",
            ],
            [["systemctl", "disable", "--now", UNIT_NAME]],
        )
    exec_start = " ".join(systemd_quote(a) for a in [*cmd, "run", "--config", str(config_path)])
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return ServiceFile(
        config_home / "systemd" / "user" / UNIT_NAME,
        user_unit(exec_start, stop_timeout).encode(),
        [
            "systemctl --user daemon-reload",
            "systemctl --user enable --now agentcard-broker",
            "journalctl --user -u agentcard-broker -f",
            "loginctl enable-linger $USER   # optional: keep it running while you are logged out",
        ],
        [["systemctl", "--user", "disable", "--now", UNIT_NAME]],
    )


def install(sf: ServiceFile) -> bool:
    """Write the file (0644, parents created). True when it changed."""
    sf.path.parent.mkdir(parents=True, exist_ok=True)
    if sf.path.suffix == ".plist":
        (Path.home() / "Library" / "Logs" / "agentcard-broker").mkdir(parents=True, exist_ok=True)
    old = sf.path.read_bytes() if sf.path.exists() else None
    if old == sf.content:
        return False
    tmp = sf.path.with_name(sf.path.name + ".tmp")
    tmp.write_bytes(sf.content)
    tmp.chmod(0o644)
    tmp.replace(sf.path)
    return True


def uninstall(sf: ServiceFile) -> list[str]:
    """Stop and disable (best effort), then remove the file. Returns what was done."""
    done: list[str] = []
    if not sf.path.exists():
        return done
    for cmd in sf.disable:
        if shutil.which(cmd[0]) is None:
            continue
        try:
            r = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            done.append(" ".join(cmd))
    sf.path.unlink()
    done.append(f"removed {sf.path}")
    return done


def client_uid() -> int:
    """The user a system-user config lets in besides the broker: whoever ran sudo, else us."""
    return int(os.environ.get("SUDO_UID", os.getuid()))


def preview(config_path: Path, *, system: bool = False, drain: float = 30.0) -> str:
    """What `install-service --print` shows: the service file, and with --system its config."""
    text = plan(config_path, system=system, drain=drain).content.decode()
    if system:
        text += f"\n# --- {SYSTEM_CONFIG} ---\n{system_config(client_uid())}"
    return text


def install_service(config_path: Path, *, system: bool = False, drain: float = 30.0) -> list[str]:
    """`install-service`: write the service file (with --system, a first config at SYSTEM_CONFIG
    too, never over one that is there). Returns the lines that report it and how to enable it."""
    sf = plan(config_path, system=system, drain=drain)
    if system and os.getuid() != 0:
        raise ServiceError("--system writes to /etc: run it with sudo (or use --print)")
    report: list[str] = []
    first_config = Path(SYSTEM_CONFIG)
    try:
        changed = install(sf)
        if system and not first_config.exists():
            first_config.parent.mkdir(parents=True, exist_ok=True)
            first_config.write_text(system_config(client_uid()))
            first_config.chmod(0o644)
            report.append(f"wrote {first_config}")
    except OSError as exc:
        raise ServiceError(f"cannot write {sf.path}: {exc.strerror or exc}") from None
    report.append(f"{'wrote' if changed else 'unchanged'}: {sf.path}")
    return [*report, "enable and start it with:", *(f"  {line}" for line in sf.enable)]


def uninstall_service(*, system: bool = False) -> list[str]:
    """`uninstall-service`: stop, disable and remove the service file. Returns what was done."""
    sf = plan(Path(SYSTEM_CONFIG if system else "config.yaml"), system=system)  # its place needs no config
    try:
        done = uninstall(sf)
    except OSError as exc:
        raise ServiceError(f"cannot remove {sf.path}: {exc.strerror or exc}") from None
    return done or [f"nothing to remove: {sf.path} does not exist"]


def repo_files() -> dict[str, bytes]:
    """The example files kept in the repository, rendered from the templates above.

    Regenerate with: python -c "import broker.service.units as s; s.write_repo_files('.')"
    """
    user_exec = "%h/.local/bin/agentcard-broker run --config %E/agentcard-broker/config.yaml"
    system_exec = f"/usr/local/bin/agentcard-broker run --config {SYSTEM_CONFIG}"
    mac_home = Path("/Users/USERNAME")
    mac_config = mac_home / "Library" / "Application Support" / "agentcard-broker" / "config.yaml"
    return {
        "systemd/agentcard-broker.service": user_unit(user_exec).encode(),
        "systemd/agentcard-broker-system.service": system_unit(system_exec).encode(),
        "systemd/config-system.yaml": system_config(1000).encode(),
        f"launchd/{LAUNCHD_LABEL}.plist": launchd_plist(
            ["/usr/local/bin/agentcard-broker", "run", "--config", str(mac_config)], mac_home
        ),
    }


def write_repo_files(root: str) -> None:
    for rel, content in repo_files().items():
        path = Path(root) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
