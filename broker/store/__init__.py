"""State that outlives the process or is shared by replicas (SPEC: per-user routes, `store:`).

Owns: the `StateStore` interface and its values (`base`), the sealing of grants and connect
states at rest (`crypto`), and the engines: `sqlite` (one file in the state dir, the embedded
default) and `redis` (replicas: also budgets and rates, `SharedCounters`). Must never: keep such
state anywhere else, or write a token, a connect state or the master key in plaintext.
"""

from __future__ import annotations

from broker.store.base import (
    ClientInfo,
    ConnectRecord,
    Grant,
    GrantInfo,
    SharedCounters,
    Spend,
    StateStore,
    StoreError,
)

__all__ = [
    "ClientInfo",
    "ConnectRecord",
    "Grant",
    "GrantInfo",
    "SharedCounters",
    "Spend",
    "StateStore",
    "StoreError",
]
