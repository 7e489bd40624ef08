"""The budget ledger: amounts let through per route, kept across restarts.

Owns: the rolling window's entries, reservations that count the moment they are made, refunds,
and writing the whole ledger to one JSON file from one writer thread. Must never: let a
concurrent burst spend past a budget, or write on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

from broker.files import replace_json


class BudgetLedger:
    """Amounts let through per route, with timestamps, in one JSON file (atomic replace).

    Amounts are cents: kept (and written) as integers when whole, so `status` shows 3000, not
    3000.0; a file written with floats (3000.0) is read the same.

    Memory is the truth the next request checks against: a reservation counts the moment it is
    made, so a concurrent burst never spends past the budget. The file is written by one writer
    thread, never on the event loop (an fsync can take milliseconds, or seconds on a busy
    disk, and every agent would wait on it). Each write is a whole snapshot to a temp file,
    fsynced, renamed over the old one (a crash leaves the old file or the new one, never half
    of one). A reservation waits, off the loop, until a write that holds it is on disk before
    its request may be forwarded; changes that arrive meanwhile share the next write. A refund
    does not wait (losing one in a crash only over-counts). `close()` writes what is pending.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer waits on it for changes
        self._entries: dict[str, list[list[float]]] = {}
        self._version = 0  # counts changes in memory
        self._saved = 0  # the last version on disk
        self._tried = 0  # the last version a write was tried for (on disk or failed)
        self._waiters: list[tuple[int, Any, Any]] = []  # (version, loop, future) until it is on disk
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._error: OSError | None = None  # the last write's failure, None once one succeeds
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(raw, dict):
                self._entries = {
                    str(k): [
                        [float(e[0]), self.cents(float(e[1]))]
                        for e in v
                        if isinstance(e, list) and len(e) == 2
                    ]
                    for k, v in raw.items()
                    if isinstance(v, list)
                }
        except (OSError, ValueError, TypeError):
            self._entries = {}

    @staticmethod
    def cents(amount: float) -> float:
        """`amount` as an int when it is whole (3000.0 -> 3000): cents are shown as integers."""
        return int(amount) if isinstance(amount, float) and amount.is_integer() else amount

    def used(self, route: str, window_s: float, now: float) -> float:
        with self._lock:
            return self.cents(sum(a for t, a in self._entries.get(route, []) if t > now - window_s))

    async def reserve(
        self, route: str, amount: float, limit: float, window_s: float, now: float
    ) -> float | None:
        """Record `amount` if it fits under `limit` in the window. Returns the amount used before,
        once the reservation is on disk; None (nothing recorded) when it does not fit.

        Raises OSError when the file cannot be written; the reservation is then given back."""
        with self._lock:  # check and record with no await in between: the next request sees it
            entries = [e for e in self._entries.get(route, []) if e[0] > now - window_s]
            used = self.cents(sum(a for _, a in entries))
            if used + amount > limit:
                return None
            entries.append([now, self.cents(amount)])
            self._entries[route] = entries
            version = self._changed()
        try:
            await self._on_disk(version)
        except BaseException:  # not written, or the request was cancelled: it is not forwarded
            self.refund(route, now, amount)
            raise
        return used

    def refund(self, route: str, when: float, amount: float) -> None:
        with self._lock:
            entries = self._entries.get(route, [])
            for i, (t, a) in enumerate(entries):
                if t == when and a == amount:
                    del entries[i]
                    self._changed()
                    return

    def close(self) -> OSError | None:
        """Write what is pending and stop the writer thread (blocking: call it off the loop).
        Returns the error when the state could not be written. The ledger stays usable."""
        with self._lock:
            writer = self._writer
            self._stopping = True
            self._wake.notify_all()
        if writer is not None:
            writer.join()
        with self._lock:
            self._stopping = False
            return self._error if self._saved != self._version else None

    def _changed(self) -> int:
        """After a change in memory (lock held): wake the writer. Returns the change's version."""
        self._version += 1
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="budget-ledger", daemon=True)
            self._writer.start()
        self._wake.notify_all()
        return self._version

    async def _on_disk(self, version: int) -> None:
        """Wait until a write holding `version` has reached the disk."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self._lock:
            if self._saved >= version:
                return
            if self._error is not None and self._tried >= version:
                # the write that held it already failed, before this waiter came to wait for it
                # (the writer settles only the waiters it sees): waiting would be for ever
                raise OSError(self._error.errno, f"the budget ledger cannot be written: {self._error}")
            self._waiters.append((version, loop, done))
        await done

    def _write_loop(self) -> None:
        tried = self._saved  # the last version written, or tried and failed
        while True:
            with self._lock:
                while self._version == tried and not self._stopping:
                    self._wake.wait()
                if self._version == tried:  # stopping, and nothing new to write
                    self._writer = None
                    return
                version = self._version
                snapshot = {route: list(entries) for route, entries in self._entries.items()}
            tried = version
            error: OSError | None = None
            try:
                self._write(snapshot)
            except Exception as exc:  # noqa: BLE001 - the writer must outlive any failure
                error = exc if isinstance(exc, OSError) else OSError(f"{type(exc).__name__}: {exc}")
            settled: list[tuple[int, Any, Any]] = []
            waiting: list[tuple[int, Any, Any]] = []
            with self._lock:
                self._error = error
                self._tried = version
                if error is None:
                    self._saved = version
                for w in self._waiters:  # a failure fails every waiter: nothing they hold is on disk
                    (settled if error is not None or w[0] <= version else waiting).append(w)
                self._waiters = waiting
            for _, loop, done in settled:
                try:
                    loop.call_soon_threadsafe(self._settle, done, error)
                except RuntimeError:  # its loop is closed: nobody waits any more
                    continue

    @staticmethod
    def _settle(done: Any, error: OSError | None) -> None:
        if done.done():  # the waiting request was cancelled
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(OSError(error.errno, f"the budget ledger cannot be written: {error}"))

    def _write(self, entries: dict[str, list[list[float]]]) -> None:
        replace_json(self.path, entries)
