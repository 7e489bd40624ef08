"""`login --no-browser` paste-back: the redirected URL, pasted on standard input.

When the browser runs on another machine, its redirect to http://127.0.0.1:PORT/callback fails
to load there; the user copies that address from the browser's bar and pastes it here. Owns:
reading standard input beside the loopback listener (whichever answers first wins) and turning
a pasted line into the query the callback would have seen, checked by the listener exactly as a
callback (state, `iss`, error parameters). Must never: echo a pasted line (it carries the code),
or accept a URL that is not the loopback callback the login asked for.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from typing import IO, Protocol
from urllib.parse import parse_qsl, urlsplit


class Offer(Protocol):
    def offer(self, q: dict[str, str], pasted: bool = False) -> tuple[str, str, bool]: ...


def pasted_query(line: str, redirect_uri: str) -> dict[str, str] | None:
    """The query of a pasted redirect to `redirect_uri`; None when the line is not one."""
    u, want = urlsplit(line.strip()), urlsplit(redirect_uri)
    if (u.scheme, u.hostname, u.port, u.path) != (want.scheme, want.hostname, want.port, want.path):
        return None
    return dict(parse_qsl(u.query, keep_blank_values=True))


class PasteReader:
    """Reads lines from `stream` (standard input) in a daemon thread and offers each pasted
    redirect to the current `listener` on the running loop; never holds up the process's exit."""

    def __init__(self, redirect_uri: str, say: Callable[[str], None], stream: IO[str] | None = None) -> None:
        self.listener: Offer | None = None
        self.redirect_uri = redirect_uri
        self._say = say
        self._loop = asyncio.get_running_loop()
        self._source = stream if stream is not None else sys.stdin
        threading.Thread(target=self._run, name="login-paste", daemon=True).start()

    def _one(self, line: str) -> None:
        if not line.strip() or self.listener is None:
            return
        q = pasted_query(line, self.redirect_uri)
        if q is None:
            self._say(
                f"that is not the redirected address; paste the whole URL starting {self.redirect_uri}?"
            )
            return
        self.listener.offer(q, pasted=True)

    def _run(self) -> None:
        try:
            for line in self._source:
                self._loop.call_soon_threadsafe(self._one, line)
        except (OSError, ValueError, RuntimeError):  # stdin closed, or the loop already gone
            return
