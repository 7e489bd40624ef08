"""Whole-daemon helpers: `agentcard-broker` as a real subprocess, driven over 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_config

CLI = [sys.executable, "-m", "broker"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def cli(
    *args: str, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run one CLI command to completion without blocking the event loop (upstreams live on it)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin or b""), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@dataclass
class DaemonProc:
    config: Path
    port: int
    proc: asyncio.subprocess.Process | None = None
    lines: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    async def start(self, env: dict[str, str] | None = None) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(
            *CLI,
            "run",
            "--config",
            str(self.config),
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            env=env,
        )
        self._reader = asyncio.create_task(self._read())
        return await self.wait_for_event("broker.ready")

    async def _read(self) -> None:
        assert self.proc and self.proc.stderr
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode().rstrip("\n"))

    async def wait_for_event(self, name: str, timeout: float = 15.0, after: int = 0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            for ev in self.events()[after:]:
                if ev.get("event") == name:
                    return ev
            if self.proc and self.proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {name} event; stderr was:\n{self.stderr}")

    def signal(self, sig: int) -> None:
        assert self.proc
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self.proc
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await self._reader
        return rc

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait(15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def daemon_factory(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[DaemonProc] = []

    def make(doc: dict[str, Any], name: str = "config.yaml") -> DaemonProc:
        port = free_port()
        doc = {**doc, "listen": [f"127.0.0.1:{port}"]}
        d = DaemonProc(write_config(tmp_path / name, doc), port)
        started.append(d)
        return d

    yield make
    for d in started:
        await d.stop()


def env_without(*names: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in names}
