"""Platform clients and their users, as the command line manages them (SPEC "Per-user routes").

Owns: a platform client's token (made here, shown once, kept only as `token_hash` in the state
store; the request walk compares the same hash), what `clients add|list|remove` and `users` /
`users revoke` do and say, and opening the state store a config names for one command.
Must never: keep, log or return a client token except the one time `add_client` hands it out
to be shown; put a token hash or a grant's tokens into anything it lists or says.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from broker.auth.route_secret import OutputLine
from broker.auth.secret_store import open_store
from broker.store import GrantInfo, StateStore, StoreError

if TYPE_CHECKING:
    from broker.config import Config

TOKEN_PREFIX = "acb_"  # recognisable in a platform's .env, in a leak report, to a secret scanner
TOKEN_ENV = "AGENTCARD_BROKER_TOKEN"  # the variable `connect --per-user` tells platforms to keep it in

_T = TypeVar("_T")


class PlatformClientError(Exception):
    """The command did nothing (or, for a revoke, says what it could not do). Safe to print."""


@dataclass(frozen=True, slots=True)
class ClientRow:
    """One line of `clients list`: a name in the store, in the config, or in both."""

    name: str
    created_at: float | None  # None: configured, no token made yet
    in_config: bool


def token_hash(token: str) -> str:
    """What the store keeps of a client token. A plain SHA-256 is enough: the token is 256 random
    bits, so there is nothing to guess, and the hash must be a lookup key (no salt)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# ---------------------------------------------------------------- the state store, for one command


def state_file(cfg: Config) -> Path:
    from broker.store.sqlite import default_path

    return default_path(cfg.state_path())


def _with_store(cfg: Config, action: Callable[[StateStore], Awaitable[_T]], *, create: bool) -> _T | None:
    """Run `action` on the config's state store (the same one the daemon uses: the SQLite file
    or the shared Redis), then close it. None (and nothing created: no file, no master key) when
    the SQLite store does not exist yet and `create` is false."""
    if cfg.store == "sqlite" and not create and not state_file(cfg).exists():
        return None

    async def run() -> _T:
        from broker.store.opening import open_store as open_state_store

        store, _ = await open_state_store(cfg, open_store(cfg.secret_store, cfg.state_path()))
        try:
            return await action(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except StoreError as exc:
        raise PlatformClientError(f"the state store: {exc}") from None


def when(epoch: float | None) -> str:
    """ISO-8601 UTC to the second, or "-"."""
    return "-" if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def shown(text: str) -> str:
    """A name from the store or a header, safe on a terminal: control characters escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


# ---------------------------------------------------------------- clients add | list | remove


def add_client(cfg: Config, name: str) -> list[OutputLine]:
    """`clients add NAME`: a new token for a configured client, stored as its hash. The token is in
    the returned lines, alone on stdout, and nowhere else."""
    if all(c.name != name for c in cfg.clients):
        listed = ", ".join(c.name for c in cfg.clients) or "none"
        raise PlatformClientError(
            f"no client named {name!r} under `clients:` in {cfg.path} (listed: {listed}); add it there "
            f"first:\n  clients:\n    - name: {name}"
        )
    token = new_token()
    if not _with_store(cfg, lambda store: store.add_client(name, token_hash(token)), create=True):
        raise PlatformClientError(
            f"client {name!r} already has a token; to make a new one (the old one stops working): "
            f"agentcard-broker clients remove {name} && agentcard-broker clients add {name}"
        )
    return [
        OutputLine(
            f"client {name!r} added. Its token, shown only now (the broker keeps only a hash of it):", True
        ),
        OutputLine(token),
        OutputLine(
            f"{name} sends it on every request to a per-user route as `Authorization: Bearer <token>`;"
            f" keep it in the platform's secrets (e.g. {TOKEN_ENV} in its .env). Lost: remove and add again.",
            True,
        ),
    ]


def list_clients(cfg: Config) -> list[ClientRow]:
    """Clients with a token, and configured ones still without: names and creation times only."""
    stored = _with_store(cfg, lambda store: store.list_clients(), create=False) or []
    configured = {c.name for c in cfg.clients}
    rows = [ClientRow(c.name, c.created_at, c.name in configured) for c in stored]
    have = {c.name for c in stored}
    rows += [ClientRow(n, None, True) for n in sorted(configured - have)]
    return sorted(rows, key=lambda r: r.name)


def clients_doc(rows: list[ClientRow]) -> list[dict[str, Any]]:
    """`clients list --json`."""
    return [
        {
            "name": r.name,
            "created_at": None if r.created_at is None else when(r.created_at),
            "has_token": r.created_at is not None,
            "in_config": r.in_config,
        }
        for r in rows
    ]


def clients_table(rows: list[ClientRow]) -> list[list[str]]:
    table = [["CLIENT", "CREATED", "NOTE"]]
    for r in rows:
        note = "" if r.in_config else "not under `clients:` in the config: refused"
        if r.created_at is None:
            note = f"no token yet: agentcard-broker clients add {r.name}"
        table.append([shown(r.name), when(r.created_at), note])
    return table


def remove_client(cfg: Config, name: str) -> str:
    """`clients remove NAME`: its token stops working at once. Its users' grants stay (a client
    added again under the name finds them)."""
    if not _with_store(cfg, lambda store: store.remove_client(name), create=False):
        raise PlatformClientError(
            f"no client named {name!r} has a token (see: agentcard-broker clients list)"
        )
    return f"client {name!r} removed: its token no longer works"


# ---------------------------------------------------------------- users | users revoke


def list_users(cfg: Config, route: str | None) -> list[GrantInfo]:
    """`users [ROUTE]`: every grant (or one route's), without its tokens."""
    grants = _with_store(cfg, lambda store: store.list_grants(route), create=False) or []
    if not grants and route is not None and cfg.route(route) is None:  # a dropped route may keep grants
        from broker.auth import unknown_route_message

        raise PlatformClientError(unknown_route_message(cfg, route))
    return grants


def users_doc(grants: list[GrantInfo]) -> list[dict[str, Any]]:
    """`users --json`."""
    return [
        {
            "route": g.route,
            "client": g.client,
            "user": g.user,
            "state": g.state,
            "expires_at": None if g.expires_at is None else when(g.expires_at),
            "last_used": None if g.last_used is None else when(g.last_used),
        }
        for g in grants
    ]


def users_table(grants: list[GrantInfo]) -> list[list[str]]:
    table = [["ROUTE", "CLIENT", "USER", "STATE", "EXPIRES", "LAST USED"]]
    for g in grants:
        names = [shown(x) for x in (g.route, g.client, g.user, g.state)]
        table.append([*names, when(g.expires_at), when(g.last_used)])
    return table


def revoke_user(cfg: Config, route: str, client: str, user: str) -> list[OutputLine]:
    """`users revoke ROUTE CLIENT USER`: revoke the user's tokens at AgentCard (best effort, on a
    per-user route of the config) and forget the grant; the caller then tells a running daemon."""
    from broker.config import OAuthAuth

    configured = cfg.route(route)
    is_per_user = (
        configured is not None and isinstance(configured.auth, OAuthAuth) and configured.auth.per_user
    )
    per_user = configured if is_per_user else None

    async def forget(store: StateStore) -> bool:
        if per_user is None:  # a dropped route: no OAuth client left to revoke with
            return await store.delete_grant(route, client, user)
        from broker.auth.per_user import UserGrants
        from broker.errors import BrokerError
        from broker.scrub import SecretSet

        grants = UserGrants(per_user, cfg, store, open_store(cfg.secret_store, cfg.state_path()), SecretSet())
        try:
            return await grants.revoke(client, user)
        except BrokerError as exc:
            raise PlatformClientError(exc.message) from None
        finally:
            await grants.close()

    gone = _with_store(cfg, forget, create=False)
    who = f"user {shown(user)!r} of client {shown(client)!r} on route {shown(route)!r}"
    if not gone:
        if configured is None:
            from broker.auth import unknown_route_message

            raise PlatformClientError(unknown_route_message(cfg, route))
        raise PlatformClientError(f"no grant for {who} (see: agentcard-broker users {route})")
    said = [OutputLine(f"forgot the grant of {who}; they will be asked to connect again")]
    if per_user is None:
        said.append(
            OutputLine(
                f"upstream revocation was not attempted: {route!r} is not a per-user route in the config; "
                "the tokens stay valid at AgentCard until they expire",
                True,
            )
        )
    else:
        said.append(
            OutputLine("AgentCard was asked first to revoke its tokens (best effort: a dead grant has none)")
        )
    return said
