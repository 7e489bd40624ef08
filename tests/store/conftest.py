"""The store under test: a real SQLite file in tmp_path, the master key in the keyring file backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from broker.auth.secret_store import KeyringStore
from broker.store.sqlite import SqliteStore

AT = "at_FAKEaccess0123456789abcdefABCDEF"
RT = "rt_FAKErefresh0123456789abcdefABCDEF"
TOKENS = f'{{"access_token": "{AT}", "refresh_token": "{RT}"}}'


class Clock:
    """An injected clock: expiry is tested by moving time, not by sleeping."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "state.sqlite3"


@pytest.fixture
async def store(db_path: Path, clock: Clock) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(db_path, KeyringStore(), clock=clock)
    yield s
    await s.close()
