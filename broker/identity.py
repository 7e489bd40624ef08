"""Who is asking on a per-user route: the platform client, then the end user it names.

Owns: authenticating a chat platform's backend by its client token (`Authorization: Bearer`,
kept in the state store only as a SHA-256 hash, looked up with a short cache so a removed
client stops working within seconds), and reading the end user's id (and label) from the
route's headers, trusted only once the client is authenticated. Must never: trust a user
header from an unauthenticated request, keep a client token anywhere, or put one in an error.
"""

from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING

from broker.errors import BrokerError
from broker.store import StoreError

if TYPE_CHECKING:
    from broker.config import Config, OAuthAuth
    from broker.http.server import Request
    from broker.store import StateStore

USER_ID_MAX = 256
TOKEN_MAX = 512
FOUND_TTL_S = 30.0  # a removed client's token stops working within this
MISSING_TTL_S = 5.0
CACHE_MAX = 1024


def token_hash(token: str) -> str:
    """What the store keeps of a client token. Tokens are 256 random bits: no salt or stretching
    is needed for a hash nobody can search."""
    return hashlib.sha256(token.encode()).hexdigest()


class PlatformClients:
    """The platform clients of one config, looked up in the state store."""

    def __init__(self, config: Config, store: StateStore) -> None:
        self._names = frozenset(c.name for c in config.clients)
        self._store = store
        self._cache: dict[str, tuple[str | None, float]] = {}  # token hash -> (name, valid until)

    async def authenticate(self, request: Request) -> str:
        """The client's name, or BrokerError client_unauthorized (which never quotes the token)."""
        values = request.headers.getall("Authorization", [])
        scheme, _, token = values[0].partition(" ") if len(values) == 1 else ("", "", "")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > TOKEN_MAX:
            raise _unauthorized("send the platform's client token as Authorization: Bearer")
        key = token_hash(token)
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            name = hit[0]
        else:
            try:
                name = await self._store.client_for_token_hash(key)
            except StoreError as exc:
                raise BrokerError("store_unavailable", f"the state store cannot be used: {exc}") from None
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            self._cache[key] = (name, now + (FOUND_TTL_S if name is not None else MISSING_TTL_S))
        if name is None or name not in self._names:
            raise _unauthorized(
                "the client token is not one `agentcard-broker clients add` made for this config"
            )
        return name


def _unauthorized(why: str) -> BrokerError:
    return BrokerError("client_unauthorized", f"a per-user route needs a platform client: {why}")


def user_of(request: Request, auth: OAuthAuth, route: str) -> tuple[str, str | None]:
    """(user id, label) from the route's headers. The id is 1 to USER_ID_MAX printable
    characters, else BrokerError user_required; a label that is not printable is dropped."""
    values = request.headers.getall(auth.user_header, [])
    if len(values) != 1:
        raise BrokerError(
            "user_required",
            f"a per-user route needs exactly one {auth.user_header} header naming the user",
            route,
        )
    user = values[0]
    if not 0 < len(user) <= USER_ID_MAX or not user.isprintable() or user != user.strip():
        raise BrokerError(
            "user_required",
            f"the {auth.user_header} header must be 1 to {USER_ID_MAX} printable characters",
            route,
        )
    label = None
    if auth.user_label_header is not None:
        labels = request.headers.getall(auth.user_label_header, [])
        if len(labels) == 1 and 0 < len(labels[0]) <= USER_ID_MAX and labels[0].isprintable():
            label = labels[0]
    return user, label
