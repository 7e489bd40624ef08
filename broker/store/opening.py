"""Which state store a config names, opened: the daemon's and every command's one way in.

Owns: choosing the engine (`store: sqlite` -> the file in the state dir; `store: redis://…` ->
Redis), and `UnavailableStore`, what stands in for a store that could not be opened so that the
routes needing it answer `store_unavailable` with the reason while the rest serve. Must never:
let a store that failed to open pass for an empty one, or put a password in a reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn

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

if TYPE_CHECKING:
    from broker.auth.secret_store import SecretStore
    from broker.config import Config


def store_place(config: Config) -> str:
    """Where the config's store is, as status and errors show it (never a password)."""
    if config.store == "redis" and config.redis is not None:
        return f"redis {config.redis.where()}"
    from broker.store.sqlite import default_path

    return f"sqlite {default_path(config.state_path())}"


async def open_store(config: Config, secrets: SecretStore) -> tuple[StateStore, SharedCounters | None]:
    """The config's state store, and its shared counters when it has them (Redis: budgets and
    rates every replica counts together). Redis opens without reaching the server (it connects,
    and checks the master key, at first use); SQLite opens its file now. Raises StoreError."""
    if config.store == "redis" and config.redis is not None:
        from broker.store.redis import RedisStore

        redis = await RedisStore.open(config.redis, secrets)
        return redis, redis
    from broker.store.sqlite import SqliteStore, default_path

    return await SqliteStore.open(default_path(config.state_path()), secrets), None


def check_store(config: Config) -> tuple[str | None, str | None]:
    """What `check` says of the state store: (its place, the problem or None); (None, None) when
    the config uses none (no per-user route, not Redis). Redis is reached (a round trip, and its
    master key checked against the key check there); a SQLite file that does not exist yet is no
    problem. Blocking: runs its own event loop."""
    import asyncio

    from broker.auth.secret_store import open_store as open_secret_store
    from broker.config import OAuthAuth

    if config.store != "redis" and not any(
        isinstance(r.auth, OAuthAuth) and r.auth.per_user for r in config.routes
    ):
        return None, None
    secrets = open_secret_store(config.secret_store, config.state_path())
    place = store_place(config)
    if config.store != "redis":
        from broker.store.sqlite import default_path

        if not default_path(config.state_path()).exists():
            return f"{place} (not created yet)", None

    async def reach() -> None:
        store, _ = await open_store(config, secrets)
        try:
            await store.ping()
        finally:
            await store.close()

    try:
        asyncio.run(reach())
    except StoreError as exc:
        return place, str(exc)
    return place, None


class UnavailableStore:
    """A store that could not be opened: every call raises StoreError with the reason."""

    def __init__(self, place: str, reason: str) -> None:
        self.place = place
        self.reason = reason

    @property
    def description(self) -> str:
        return self.place

    def _fail(self, *_: object) -> NoReturn:
        raise StoreError(f"{self.place} could not be opened: {self.reason}")

    async def get_grant(self, route: str, client: str, user: str) -> Grant | None:
        self._fail()

    async def put_grant(self, grant: Grant) -> None:
        self._fail()

    async def replace_grant(self, grant: Grant, version: int) -> bool:
        self._fail()

    async def touch_grant(self, route: str, client: str, user: str, when: float) -> bool:
        self._fail()

    async def delete_grant(self, route: str, client: str, user: str) -> bool:
        self._fail()

    async def list_grants(self, route: str | None = None) -> list[GrantInfo]:
        self._fail()

    async def count_grants(self, route: str) -> dict[str, int]:
        self._fail()

    async def put_connect(self, connect_id: str, record: ConnectRecord, ttl_s: float) -> None:
        self._fail()

    async def take_connect(self, connect_id: str) -> ConnectRecord | None:
        self._fail()

    async def add_client(self, name: str, token_hash: str) -> bool:
        self._fail()

    async def remove_client(self, name: str) -> bool:
        self._fail()

    async def list_clients(self) -> list[ClientInfo]:
        self._fail()

    async def client_for_token_hash(self, token_hash: str) -> str | None:
        self._fail()

    async def acquire_lease(self, key: str, holder: str, ttl_s: float) -> bool:
        self._fail()

    async def release_lease(self, key: str, holder: str) -> None:
        self._fail()

    async def get_doc(self, name: str) -> str | None:
        self._fail()

    async def put_doc(self, name: str, value: str, only_new: bool = False) -> bool:
        self._fail()

    async def delete_doc(self, name: str) -> bool:
        self._fail()

    async def ping(self) -> float:
        self._fail()

    async def reserve_budget(self, account: str, amount: float, limit: float, window_s: float) -> Spend:
        self._fail()

    async def refund_budget(self, account: str, entry: str) -> None:
        self._fail()

    async def budget_used(self, account: str, window_s: float) -> float:
        self._fail()

    async def hit_rate(self, key: str, limit: int, window_s: float) -> float:
        self._fail()

    async def close(self) -> None:
        return None
