"""Desktop notifications for held requests: "approve this?", where one can be shown.

`notify-send` on Linux (when it is on PATH and a desktop session is there: DISPLAY,
WAYLAND_DISPLAY or DBUS_SESSION_BUS_ADDRESS), `osascript` on macOS. Best effort: the program
runs beside the event loop (no shell, no output read, killed after a few seconds), and a
notification that cannot be shown changes nothing.

Owns: the notification's text (`message`) and showing it. Must never: block the event loop, put
a secret or a call's arguments in the text, or let an agent's words (a tool name) pass as
markup, quotes or extra lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
from collections.abc import Callable

from broker.policy.approvals import Approval

Notifier = Callable[[str], None]  # shows one line of text; never raises, never blocks
RUN_LIMIT_S = 10.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_./\- ]")


def _plain(text: str, limit: int = 64) -> str:
    """An agent's word, shown safely: a small alphabet, bounded length."""
    out = _UNSAFE.sub("?", text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def dollars(cents: float) -> str:
    return f"${cents / 100:,.2f}"


def message(approval: Approval) -> str:
    """`AgentCard: approve TOOL for AMOUNT? agentcard-broker approve ID`: no arguments, no secret."""
    what = ", ".join(_plain(t) for t in approval.tools[:3]) if approval.tools else None
    if what is None:
        what = f"{approval.method} {_plain(approval.path.partition('?')[0], 80)}"
    amount = f" for {dollars(approval.amount_cents)}" if approval.amount_cents else ""
    how = (
        "approve it in the dashboard (agentcard-broker dashboard)"
        if approval.require_passkey
        else f"agentcard-broker approve {approval.id}"
    )
    return f"AgentCard: approve {what}{amount}? {how}"


def _command(text: str) -> list[str] | None:
    if sys.platform == "darwin":
        if shutil.which("osascript") is None:
            return None
        quoted = text.replace("\\", "\\\\").replace('"', '\\"')
        return ["osascript", "-e", f'display notification "{quoted}" with title "agentcard-broker"']
    if not any(os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS")):
        return None
    exe = shutil.which("notify-send")
    if exe is None:
        return None
    # the body may be read as markup by the notification server
    body = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return [exe, "--app-name=agentcard-broker", "agentcard-broker", body]


class DesktopNotifier:
    """Shows a notification on this machine's desktop when it can; else does nothing."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[None]] = set()

    def __call__(self, text: str) -> None:
        argv = _command(text)
        if argv is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._run(argv))
        except RuntimeError:  # no loop: nothing to show it from
            return
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    @staticmethod
    async def _run(argv: list[str]) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError:
            return
        try:
            await asyncio.wait_for(proc.wait(), RUN_LIMIT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
