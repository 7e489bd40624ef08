"""Service files: rendered for this user, valid for systemd and launchd, kept in sync with the repo."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from broker import config as config_mod
from broker.service import units as service

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "broker"]
needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None and not os.environ.get("CI"),
    reason="systemd-analyze not installed (apt-get install systemd)",
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def verify(unit: Path, home: Path, user: bool) -> subprocess.CompletedProcess[str]:
    runtime = home / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)}
    cmd = ["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_repo_files_are_renderings_of_the_templates() -> None:
    for rel, content in service.repo_files().items():
        assert (REPO / rel).read_bytes() == content, (
            f"{rel} is stale: regenerate with service.write_repo_files"
        )


@needs_systemd
def test_repo_user_unit_verifies(tmp_path: Path) -> None:
    home = tmp_path / "h"
    exe = home / ".local" / "bin" / "agentcard-broker"  # what %h/.local/bin/agentcard-broker names
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / service.UNIT_NAME
    shutil.copy(REPO / "systemd" / service.UNIT_NAME, unit)
    r = verify(unit, home, user=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@needs_systemd
def test_install_service_writes_a_unit_that_verifies(tmp_path: Path, isolated_env: Path) -> None:
    cfg = tmp_path / "my config.yaml"  # a space: the ExecStart quoting must hold
    shutil.copy(REPO / "config.yaml", cfg)
    cfg.chmod(0o600)
    printed = run_cli("install-service", "--print", "--config", str(cfg))
    assert printed.returncode == 0, printed.stderr
    unit_path = Path(os.environ["XDG_CONFIG_HOME"]) / "systemd" / "user" / service.UNIT_NAME
    assert not unit_path.exists()  # --print writes nothing
    assert "Type=notify" in printed.stdout

    r = run_cli("install-service", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert f"wrote: {unit_path}" in r.stdout
    assert "systemctl --user enable --now agentcard-broker" in r.stdout
    text = unit_path.read_text()
    assert text == printed.stdout
    assert (unit_path.stat().st_mode & 0o777) == 0o644
    exec_line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    assert f'"{cfg}"' in exec_line
    assert exec_line.split("=", 1)[1].split()[0] in (
        str(Path(sys.executable).resolve()),
        str(Path(shutil.which("agentcard-broker") or "-").resolve()),
    )
    for directive in (
        "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
        "LockPersonality=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        "WatchdogSec=60", "RestartPreventExitStatus=78",
    ):  # fmt: skip
        assert directive in text.splitlines()
    v = verify(unit_path, isolated_env, user=True)
    assert v.returncode == 0 and v.stderr == "", v.stderr

    again = run_cli("install-service", "--config", str(cfg))
    assert f"unchanged: {unit_path}" in again.stdout
    gone = run_cli("uninstall-service", "--config", str(cfg))
    assert gone.returncode == 0
    assert f"removed {unit_path}" in gone.stdout
    assert not unit_path.exists()
    assert "nothing to remove" in run_cli("uninstall-service", "--config", str(cfg)).stdout


def test_install_service_refuses_a_broken_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("routes: []\nbogus: 1\n")
    cfg.chmod(0o600)
    r = run_cli("install-service", "--config", str(cfg))
    assert r.returncode == 1
    assert "bogus" in r.stderr and "fix the config first" in r.stderr


@needs_systemd
def test_system_unit_verifies_and_its_config_loads(tmp_path: Path) -> None:
    r = run_cli("install-service", "--system", "--print")
    assert r.returncode == 0, r.stderr
    unit_text, _, config_text = r.stdout.partition(f"\n# --- {service.SYSTEM_CONFIG} ---\n")
    unit = tmp_path / service.UNIT_NAME
    unit.write_text(unit_text)
    v = verify(unit, tmp_path, user=False)
    assert v.returncode == 0 and v.stderr == "", v.stderr
    lines = unit_text.splitlines()
    assert f"User={service.SYSTEM_USER}" in lines
    assert "ProtectHome=yes" in lines
    cfg_path = tmp_path / "system.yaml"
    cfg_path.write_text(config_text)
    cfg_path.chmod(0o600)
    cfg = config_mod.load(cfg_path)
    assert cfg.secret_store == "file"
    assert cfg.socket_mode == 0o660
    assert cfg.state_path() == Path(service.SYSTEM_STATE)
    assert os.getuid() in cfg.allowed_uids  # the installing user (SUDO_UID, else this uid)
    assert str(cfg.listen[0]) == f"unix:{service.SYSTEM_SOCKET}"


def test_launchd_plist(tmp_path: Path) -> None:
    doc = plistlib.loads((REPO / "launchd" / f"{service.LAUNCHD_LABEL}.plist").read_bytes())
    assert doc["Label"] == service.LAUNCHD_LABEL
    assert doc["RunAtLoad"] is True
    assert doc["KeepAlive"] == {"SuccessfulExit": False}
    assert doc["ProgramArguments"][1:3] == ["run", "--config"]
    assert doc["StandardErrorPath"].startswith("/Users/USERNAME/Library/Logs/agentcard-broker/")
    assert doc["Umask"] == 0o077
    rendered = plistlib.loads(service.launchd_plist(["/opt/x/agentcard-broker", "run"], tmp_path))
    assert rendered["ProgramArguments"] == ["/opt/x/agentcard-broker", "run"]
    assert rendered["StandardOutPath"] == str(tmp_path / "Library/Logs/agentcard-broker/broker.log")


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [("/usr/bin/x", "/usr/bin/x"), ("/a b/c", '"/a b/c"'), ("/50%/x", "/50%%/x"), ("$HOME", "$$HOME")],
)
def test_systemd_quote(arg: str, quoted: str) -> None:
    assert service.systemd_quote(arg) == quoted


@pytest.fixture
def no_user_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """uninstall runs `systemctl --user disable`: keep it away from the real user manager."""
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the systemd user unit")
def test_install_and_uninstall_report_what_they_did(tmp_path: Path, no_user_manager: None) -> None:
    cfg = tmp_path / "config.yaml"
    unit_path = Path(os.environ["XDG_CONFIG_HOME"]) / "systemd" / "user" / service.UNIT_NAME
    report = service.install_service(cfg, drain=5)
    assert report[:2] == [f"wrote: {unit_path}", "enable and start it with:"]
    assert "  systemctl --user enable --now agentcard-broker" in report
    assert service.preview(cfg, drain=5) == unit_path.read_text()
    assert "TimeoutStopSec=20" in unit_path.read_text().splitlines()  # the drain, plus 15 s
    assert service.install_service(cfg, drain=5)[0] == f"unchanged: {unit_path}"
    assert service.install_service(cfg, drain=6)[0] == f"wrote: {unit_path}"

    assert service.uninstall_service()[-1] == f"removed {unit_path}"
    assert not unit_path.exists()
    assert service.uninstall_service() == [f"nothing to remove: {unit_path} does not exist"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the systemd user unit")
def test_a_unit_that_cannot_be_written_is_a_service_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(in_the_way))
    with pytest.raises(service.ServiceError, match=r"^cannot write .*a-file/systemd/user/agentcard-broker"):
        service.install_service(tmp_path / "config.yaml")


def test_system_preview_carries_its_config_for_the_sudo_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("SUDO_UID", "4242")
    text = service.preview(Path("unused.yaml"), system=True)
    unit, _, config = text.partition(f"\n# --- {service.SYSTEM_CONFIG} ---\n")
    assert f"User={service.SYSTEM_USER}" in unit.splitlines()
    assert f"--config {service.SYSTEM_CONFIG}" in unit
    assert config == service.system_config(4242)
    assert "allowed_uids: [self, 4242]" in config


def test_system_install_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "getuid", lambda: 4242)  # any user but root, also when CI runs as root
    unit = Path("/etc/systemd/system/agentcard-broker.service")
    existed = unit.exists()
    with pytest.raises(service.ServiceError, match="run it with sudo"):
        service.install_service(tmp_path / "config.yaml", system=True)
    assert unit.exists() == existed  # refused before anything was written


def test_no_service_manager_is_a_service_error(isolated_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = sorted(isolated_env.rglob("*"))
    monkeypatch.setattr(sys, "platform", "freebsd14")
    for call in (
        lambda: service.preview(isolated_env / "c.yaml"),
        lambda: service.install_service(isolated_env / "c.yaml"),
        lambda: service.uninstall_service(),
    ):
        with pytest.raises(service.ServiceError, match="no service manager support for freebsd14"):
            call()
    monkeypatch.setattr(sys, "platform", "darwin")
    with pytest.raises(service.ServiceError, match="--system is for Linux"):
        service.install_service(isolated_env / "c.yaml", system=True)
    assert sorted(isolated_env.rglob("*")) == before  # nothing was written in HOME
