"""The state store interface: per-user grants, connect states, platform clients, refresh leases,
sealed documents (OAuth client registrations), and shared budgets and rate windows.

Owns: `StateStore` (what every engine offers, all keyed by plain strings matched exactly),
`SharedCounters` (what a store shared by replicas adds: budgets and rates counted atomically),
their small frozen values, and `StoreError`. Must never: put a token, a client token or a connect
state's flow values into a repr, an exception or a log event; know how an engine keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class StoreError(Exception):
    """The store could not be used or a value in it could not be read. The text names the place
    (the file, the route, client and user) and never holds a secret."""


@dataclass(frozen=True, slots=True)
class Grant:
    """One end user's AgentCard grant on a per-user route. The user is the pair (client, user)."""

    route: str
    client: str
    user: str
    tokens: str = field(repr=False)  # the token set as the credential serializes it; sealed at rest
    state: str  # the credential's word for it ("active", "dead", ...); the store never interprets it
    expires_at: float | None = None  # the access token's expiry, epoch seconds
    last_used: float | None = None
    # bumped by every write of the grant; `replace_grant` writes only over the version it read
    version: int = 0

    def info(self) -> GrantInfo:
        return GrantInfo(self.route, self.client, self.user, self.state, self.expires_at, self.last_used)


@dataclass(frozen=True, slots=True)
class GrantInfo:
    """What `users` lists and `/_broker/status` counts: a grant without its tokens."""

    route: str
    client: str
    user: str
    state: str
    expires_at: float | None
    last_used: float | None


@dataclass(frozen=True, slots=True)
class ConnectRecord:
    """What a connect URL is bound to, kept until its single use or its expiry."""

    route: str
    client: str
    user: str
    label: str = ""  # the user label shown on the connect page
    flow: str = field(default="", repr=False)  # the login's own values (state, PKCE verifier); sealed


@dataclass(frozen=True, slots=True)
class ClientInfo:
    name: str
    created_at: float


class StateStore(Protocol):
    """Every call may raise StoreError. Strings are stored and matched exactly (case, spaces)."""

    async def get_grant(self, route: str, client: str, user: str) -> Grant | None: ...
    async def put_grant(self, grant: Grant) -> None: ...  # insert or replace, tokens sealed
    async def touch_grant(self, route: str, client: str, user: str, when: float) -> bool:
        """Stamp the last use only: a request must never write back tokens a refresh just rotated.
        False: there is no such grant (any more: revoked, perhaps by another replica)."""
        ...

    async def replace_grant(self, grant: Grant, version: int) -> bool:
        """Write `grant` only if the stored grant is still at `version` (compare and set), and
        return whether it was written. A refresh stores its rotated pair this way: it never
        overwrites a grant that a reconnect or another replica wrote meanwhile."""
        ...

    async def delete_grant(self, route: str, client: str, user: str) -> bool: ...
    async def list_grants(self, route: str | None = None) -> list[GrantInfo]: ...
    async def count_grants(self, route: str) -> dict[str, int]:
        """How many grants the route has in each state (what status shows; never who)."""
        ...

    async def put_connect(self, connect_id: str, record: ConnectRecord, ttl_s: float) -> None: ...
    async def take_connect(self, connect_id: str) -> ConnectRecord | None:
        """The record, once: a second take, an unknown or an expired id give None."""
        ...

    async def add_client(self, name: str, token_hash: str) -> bool: ...  # False: the name is taken
    async def remove_client(self, name: str) -> bool: ...
    async def list_clients(self) -> list[ClientInfo]: ...
    async def client_for_token_hash(self, token_hash: str) -> str | None: ...

    async def acquire_lease(self, key: str, holder: str, ttl_s: float) -> bool:
        """True when `holder` now holds `key` for `ttl_s` seconds: it was free, expired, or already
        this holder's (renewed)."""
        ...

    async def release_lease(self, key: str, holder: str) -> None: ...  # only the holder's own lease

    async def get_doc(self, name: str) -> str | None:
        """A small document kept sealed (an OAuth client registration, which may hold a secret)."""
        ...

    async def put_doc(self, name: str, value: str, only_new: bool = False) -> bool:
        """Store the document; with `only_new`, only when there is none yet. True when written."""
        ...

    async def delete_doc(self, name: str) -> bool: ...

    async def ping(self) -> float:
        """Seconds one round trip to the store takes; raises StoreError when it cannot be used."""
        ...

    @property
    def description(self) -> str:
        """Which store this is, for status and errors: engine and place, never a password."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Spend:
    """The answer to a budget reservation."""

    ok: bool  # recorded: it fits under the limit
    used: float  # cents used in the window before this reservation (when refused: used now)
    entry: str  # what `refund_budget` needs to give it back ("" when refused)


class SharedCounters(Protocol):
    """Budgets and rate windows that several replicas count together (`store: redis://`). Each
    call is one atomic step on the store: N concurrent spends let exactly as many through as fit.
    Windows are rolling and timed by the store's own clock, the same for every replica."""

    async def reserve_budget(self, account: str, amount: float, limit: float, window_s: float) -> Spend: ...
    async def refund_budget(self, account: str, entry: str) -> None: ...
    async def budget_used(self, account: str, window_s: float) -> float: ...
    async def hit_rate(self, key: str, limit: int, window_s: float) -> float:
        """Count one request against `limit` per `window_s`: 0.0 when admitted (and counted),
        else the seconds until the oldest request in the window leaves it (nothing counted)."""
        ...
