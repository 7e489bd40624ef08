"""The real OS secret store: gnome-keyring's Secret Service under dbus-run-session."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_KEY, Upstream, api_config, assert_no_secret, write_config
from tests.e2e.conftest import free_port

NEEDED = ("dbus-run-session", "gnome-keyring-daemon")
missing = [b for b in NEEDED if shutil.which(b) is None]


@pytest.mark.skipif(bool(missing) and not os.environ.get("CI"), reason=f"not installed: {missing}")
async def test_key_in_gnome_keyring_reaches_upstream(tmp_path: Path, upstream: Upstream) -> None:
    assert not missing, f"CI must install {missing} (see .ci/run)"
    port = free_port()
    doc = api_config(upstream.url, listen=[f"127.0.0.1:{port}"], log={"level": "debug", "format": "json"})
    cfg = write_config(tmp_path / "config.yaml", doc)
    key_file = tmp_path / "key"
    key_file.write_text(TEST_KEY)
    key_file.chmod(0o600)
    env: dict[str, Any] = {
        k: v for k, v in os.environ.items() if k not in ("PYTHON_KEYRING_BACKEND", "DBUS_SESSION_BUS_ADDRESS")
    }
    script = Path(__file__).with_name("secret_service_session.py")
    proc = await asyncio.create_subprocess_exec(
        "dbus-run-session", "--", sys.executable, str(script), str(cfg), str(key_file), str(port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        cwd=str(Path(__file__).parents[2]),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    result = json.loads(out.decode().strip().splitlines()[-1])

    assert result["unlock_rc"] == 0
    assert result["set_key"]["rc"] == 0, result["set_key"]
    assert "SecretService" in result["set_key"]["out"]
    assert "test-mode" in result["set_key"]["out"]
    assert result["check"]["rc"] == 0, result["check"]
    assert result["status"] == 200
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}"
    assert "SecretService" in result["broker_status"]["secret_store"]
    assert result["broker_status"]["routes"][0]["state"] == "ready"
    assert result["daemon_rc"] == 0
    # the key sits in the Secret Service, not in any file the broker wrote
    for f in (tmp_path / "home").rglob("*"):
        if f.is_file() and "keyrings" not in f.parts:
            assert TEST_KEY.encode() not in f.read_bytes(), f
    assert_no_secret(out.decode().replace(upstream.url, ""), result["daemon_log"])
