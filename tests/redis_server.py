"""A real redis-server on 127.0.0.1 for tests: started, stopped, killed, paused and started again
on the same port with its data (an append-only file fsynced on every write).

Other test modules use the fixture with `from tests.redis_server import redis_server`.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

READY_S = 10.0


def _free_port() -> int:
    """A free port below the kernel's ephemeral range. A server port inside that range, once the
    server stops, can be picked as a client's own source port when it reconnects: the socket then
    connects to itself (TCP simultaneous open) and reads its own PING back as an answer."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if found is None:
        pytest.fail("redis-server is not installed; .ci/run installs it (apt: redis-server)")
    return found


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for `--tls-port`: the server's certificate and key, and the CA that signed it."""

    cert: Path
    key: Path
    ca: Path


class RedisServer:
    """One redis-server process in `data_dir`; `start()` again after `stop()` or `kill()` reuses
    the port and reads back the append-only file."""

    def __init__(self, data_dir: Path, password: str | None = None, tls: TlsFiles | None = None) -> None:
        self.data_dir = data_dir
        self.password = password
        self.tls = tls
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False
        data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> str:
        path = self.data_dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        assert self.process is None, "already running"
        # fmt: off
        args = [
            redis_server_binary(),
            "--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--dir", str(self.data_dir), "--logfile", "redis.log", "--daemonize", "no",
            "--save", "", "--appendonly", "yes", "--appendfsync", "always",
        ]
        # fmt: on
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.tls is not None:  # TLS only: the plain port is closed
            args[args.index("--port") + 1] = "0"
            args += ["--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            args += ["--tls-ca-cert-file", str(self.tls.ca)]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self._wait_ready()

    def _wait_ready(self) -> None:
        """Until the server answers PING (+PONG, or -NOAUTH when it wants a password)."""
        assert self.process is not None
        deadline = time.monotonic() + READY_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"redis-server exited at start:\n{self.log[-2000:]}")
            with contextlib.suppress(OSError), self._connect() as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return
            time.sleep(0.005)
        self.kill()
        raise RuntimeError(f"redis-server did not answer within {READY_S} s:\n{self.log[-2000:]}")

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), 0.5)
        if self.tls is None:
            return s
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        return context.wrap_socket(s, server_hostname="127.0.0.1")

    def stop(self) -> None:
        """SIGTERM (a clean shutdown) and wait."""
        if self.process is None:
            return
        self.resume()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: what a crash or an OOM kill does."""
        if self.process is None:
            return
        self.process.kill()
        self.process.wait()
        self.process = None
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: connections still open (the kernel accepts them) and nothing answers."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
        self.paused = False


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh server per test (it starts in ~10 ms), stopped afterwards whatever happened."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()
