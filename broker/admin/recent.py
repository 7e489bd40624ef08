"""The last requests answered, for the dashboard: a done hook and its listeners.

Owns: the last `KEEP` outcomes (route, method, path with sensitive query values masked, status,
duration, error, client and user) and the queues of whoever watches them live (the dashboard's
event stream). Must never: keep a body or a header, block or raise in `done` (it runs after
every answer), or cost more than an append while nobody watches.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from broker.logs import safe_path

if TYPE_CHECKING:
    from broker.hooks import Outcome

KEEP = 200
QUEUE_SIZE = 500  # a watcher this far behind loses the newest events, never blocks a request


def document(at: float, outcome: Outcome) -> dict[str, Any]:
    """One request as the dashboard shows it: nothing the agent sent but its method and path."""
    return {
        "id": outcome.id,
        "at": round(at, 3),
        "route": outcome.route,
        "method": outcome.method,
        "path": safe_path(outcome.raw_path),
        "status": outcome.status,
        "duration_ms": round(outcome.elapsed * 1000, 1),
        "error": outcome.error,
        "client": outcome.client,
        "user": outcome.user,
    }


class RecentRequests:
    """A done hook: one object for the daemon's life, across reloads."""

    def __init__(self, keep: int = KEEP) -> None:
        self._last: deque[tuple[float, Outcome]] = deque(maxlen=keep)
        self._watchers: set[asyncio.Queue[dict[str, Any]]] = set()

    def done(self, outcome: Outcome) -> None:
        at = time.time()
        self._last.append((at, outcome))  # the outcome as it is: built into a document when asked
        if self._watchers:
            doc = {"type": "request", "request": document(at, outcome)}
            for queue in self._watchers:
                if not queue.full():
                    queue.put_nowait(doc)

    def last(self, n: int = KEEP) -> list[dict[str, Any]]:
        """The newest `n`, newest first."""
        items = list(self._last)[-n:] if n > 0 else []
        return [document(at, outcome) for at, outcome in reversed(items)]

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_SIZE)
        self._watchers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._watchers.discard(queue)
