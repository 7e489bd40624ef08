"""Run inside `dbus-run-session`: unlock a fresh gnome-keyring, then drive the real CLI.

Usage: python secret_service_session.py CONFIG KEY_FILE. Prints one JSON line of results.
The key comes from a file so it never appears on a command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

config, key_file = sys.argv[1], sys.argv[2]
key = Path(key_file).read_bytes()
env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.SecretService.Keyring"}
cli = [sys.executable, "-m", "broker"]

unlock = subprocess.run(
    ["gnome-keyring-daemon", "--unlock", "--components=secrets"],
    input=b"test-only-password",
    capture_output=True,
    env=env,
    timeout=30,
)
for line in unlock.stdout.decode().splitlines():  # GNOME_KEYRING_CONTROL=...
    name, _, value = line.partition("=")
    if name:
        env[name] = value

result: dict[str, object] = {"unlock_rc": unlock.returncode}
setkey = subprocess.run(
    [*cli, "set-key", "api", "--config", config, "--stdin"], input=key, capture_output=True, env=env
)
result["set_key"] = {"rc": setkey.returncode, "out": setkey.stdout.decode(), "err": setkey.stderr.decode()}
check = subprocess.run([*cli, "check", "--config", config], capture_output=True, env=env)
result["check"] = {"rc": check.returncode, "out": check.stdout.decode(), "err": check.stderr.decode()}

port = int(sys.argv[3])
daemon = subprocess.Popen([*cli, "run", "--config", config], stderr=subprocess.PIPE, env=env)
try:
    deadline = time.monotonic() + 20
    body = b""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/cards", timeout=5) as r:
                result["status"] = r.status
                body = r.read()
                break
        except OSError:
            time.sleep(0.1)
    result["body"] = body.decode()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_broker/status", timeout=5) as r:
        result["broker_status"] = json.loads(r.read())
finally:
    daemon.terminate()
    _, err = daemon.communicate(timeout=20)
    result["daemon_rc"] = daemon.returncode
    result["daemon_log"] = err.decode()
print(json.dumps(result))
