"""`UserCredential`: one end user's AgentCard grant on a per-user route, asked for a header.

Owns: that user's tokens read from the StateStore and kept fresh: one refresh at a time for the
user (an asyncio.Lock here, a store lease across processes and replicas, renewed while the token
request runs so it expires within seconds only when its holder died; the grant read again once
the lease is held, since another replica may have refreshed it), the rotated refresh token
stored before the new access token is used (compare and set on the grant's version: it never
overwrites what a reconnect or another replica wrote meanwhile), a refused refresh ending that
user's grant only, and the `needs_connect` error carrying a fresh connect link. Must never: let
a token reach `reason`, an error or a log; refresh a grant another replica is refreshing; send a
refresh token the store no longer holds; touch another user's grant.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from functools import partial

from broker.auth.base import AuthState, Credential, CredentialCheck
from broker.auth.oauth.credential import issuer_changed
from broker.auth.oauth.tokens import TokenSet, parse_token_response, scope_union, token_request
from broker.auth.oauth.transport import HTTP_TIMEOUT, OAuthError
from broker.auth.per_user import GRANT_ACTIVE, UserGrants
from broker.auth.secret_store import SecretStoreError
from broker.errors import BrokerError
from broker.hooks import AnswerFactory
from broker.scrub import MIN_SECRET_LEN, StreamScrubber, mask_for
from broker.store import Grant, StoreError

# A live holder renews its lease every LEASE_RENEW_S while its token request runs (up to
# HTTP_TIMEOUT, 20 s); a dead holder's lease is free again within LEASE_TTL_S.
LEASE_TTL_S = 10.0
LEASE_RENEW_S = 3.0
# a waiter gives up after the longest live hold
LEASE_WAIT_S = (HTTP_TIMEOUT.total or 20.0) + LEASE_TTL_S + 5.0
LEASE_POLL_S = 0.05
TOUCH_EVERY_S = 60.0  # a stamp a minute per user: the last use, and a grant revoked elsewhere seen
REFRESH_FAILURE_BACKOFF_S = 5.0
OWN_SECRETS_KEPT = 6  # this user's last tokens masked in their answers (access and refresh, x3)
_ENDED = ("invalid_grant", "invalid_client", "unauthorized_client")


class UserCredential(Credential):
    """The header for one end user (client, user) of a per-user route."""

    can_refresh = True
    has_mode = False

    def __init__(self, grants: UserGrants, client: str, user: str) -> None:
        super().__init__(grants.route.name)
        self._grants = grants
        self.client = client
        self.user = user
        self.label = ""
        self._tokens: TokenSet | None = None
        self._last_used: float | None = None
        self._version = 0  # the stored grant's version when last read
        self._own: tuple[tuple[bytes, bytes], ...] = ()  # this user's tokens and their masks
        self._lock = asyncio.Lock()
        self._touched = float("-inf")
        self._refresh_failed_at = float("-inf")
        self.refreshes = 0
        self.reason = "not read yet"

    def _lease_key(self) -> str:
        return f"refresh:{self.route}:{self.client}:{self.user}"

    def check(self) -> CredentialCheck:
        return CredentialCheck(f"the grant of user {self.user!r} of {self.client!r} in the state store")

    def invalidate(self) -> None:
        self._tokens = None  # the next request reads the store (a new grant, a revoked one)

    def _header(self, tokens: TokenSet) -> dict[str, str]:
        now = time.monotonic()
        if now - self._touched > TOUCH_EVERY_S:
            self._touched = now
            self._grants.touch(self.client, self.user)
        return {"Authorization": f"Bearer {tokens.access_token}"}

    def ready_authorization(self) -> dict[str, str] | None:
        tokens = self._tokens
        if tokens is None or tokens.dead or tokens.needs_refresh(time.time()):
            return None
        return self._header(tokens)

    async def authorization(self) -> dict[str, str]:
        tokens = self._tokens
        if tokens is None or tokens.dead:
            tokens = await self._load()
        if tokens.needs_refresh(time.time()):
            tokens = await self._refresh(tokens, forced=False)
        return self._header(tokens)

    async def retry_after_rejection(self, used: dict[str, str]) -> bool:
        """An upstream 401 for `used`: refresh once (unless someone already did). True = retry.
        Raises `needs_connect` when the grant turns out to be over: the user gets the link, not
        the route-level `needs_login` an unretried 401 would give."""
        tokens = self._tokens
        if tokens is None or tokens.dead:
            return True  # re-read or ended meanwhile: authorization() reads the store again
        if used.get("Authorization") != f"Bearer {tokens.access_token}":
            return True  # refreshed meanwhile: retry with the new token
        g = self._grants
        old = tokens.issuer or (g._client.issuer if g._client is not None else None)
        now = await g.issuer_now()
        why = issuer_changed(old, now) if now else None
        if why is not None and self._tokens is tokens:
            raise await self._end(f"{why}: connect again")
        try:
            await self._refresh(tokens, forced=True)
        except BrokerError as exc:
            if exc.code == "needs_connect":
                raise
            return False
        return True

    async def step_up(self, scopes: frozenset[str]) -> BrokerError:
        """RFC 6750 §3.1 insufficient_scope: this user connects again, the connect asking for the
        scopes the grant had and those the upstream asks for. No refresh in between."""
        async with self._lock:
            tokens = self._tokens
            had = tokens.scope.split() + tokens.wanted_scope.split() if tokens is not None else []
            wanted = scope_union(self._grants.auth.scopes, had, sorted(scopes))
            asked = " ".join(sorted(scopes)) or "unnamed"
            return await self._end(
                f"the upstream asks for more scope ({asked}): connect again for {wanted}", wanted
            )

    def on_upstream_status(self, status: int) -> None:
        if status == 401 and self.state is AuthState.READY:
            self.state = AuthState.CREDENTIAL_REJECTED
            self.reason = "the upstream refused the user's token (HTTP 401)"
        elif status < 400 and self.state is AuthState.CREDENTIAL_REJECTED:
            self._remember(self._tokens)

    # ------------------------------------------------------------ the stored grant

    async def _read(self) -> TokenSet | None:
        """The grant as stored now (None: there is none)."""
        g = self._grants
        try:
            grant = await g.store.get_grant(self.route, self.client, self.user)
        except StoreError as exc:
            raise g.store_error(exc) from None
        if grant is None:
            return None
        self._last_used = grant.last_used
        self._version = grant.version
        try:
            tokens = TokenSet.from_json(grant.tokens)
        except (ValueError, TypeError):
            return None  # unreadable: as if absent, a new connect replaces it
        self._hold(tokens.access_token, tokens.refresh_token)
        return tokens

    async def _load(self) -> TokenSet:
        tokens = await self._read()
        self._remember(tokens)
        if tokens is None or tokens.dead:
            raise await self._needs_connect(tokens.dead if tokens is not None else None)
        known = self._grants.issuer_known
        why = issuer_changed(tokens.issuer, known) if known else None
        if why is not None:  # issued by the resource's former authorization server: not used
            raise await self._end(f"{why}: connect again")
        return tokens

    def _hold(self, *values: str | None) -> None:
        """This user's tokens, masked in this user's answers (the last few: a just-rotated one
        too). Kept here, not in the daemon's secret set: that would grow with every user."""
        new = [(v.encode(), mask_for(v.encode())) for v in values if v and len(v) >= MIN_SECRET_LEN]
        kept = list(dict.fromkeys([*new, *self._own]))[:OWN_SECRETS_KEPT]
        self._own = tuple(sorted(kept, key=lambda pair: len(pair[0]), reverse=True))

    def answer_mask(self) -> AnswerFactory | None:
        own = self._own
        return partial(StreamScrubber, own) if own else None

    def _remember(self, tokens: TokenSet | None) -> None:
        self._tokens = tokens
        self.mode = None  # an OAuth token does not say whether the account is test or live
        if tokens is None:
            self.state, self.reason, self.expires_at = AuthState.NO_CREDENTIAL, "not connected", None
            return
        if tokens.dead:
            self.state, self.reason, self.expires_at = (
                AuthState.NEEDS_LOGIN,
                f"grant ended: {tokens.dead}",
                None,
            )
            return
        self.state, self.reason = AuthState.READY, "connected"
        self.expires_at = datetime.fromtimestamp(tokens.expires_at, UTC) if tokens.expires_at else None

    async def _needs_connect(self, why: str | None = None) -> BrokerError:
        url = await self._grants.connect_link(self.client, self.user, self.label)
        said = f"{why}; " if why else ""
        return BrokerError(
            "needs_connect",
            f"{said}connect your AgentCard account to use this: open {url}",
            self.route,
            connect_url=url,
        )

    # ------------------------------------------------------------ refreshing

    async def _refresh(self, seen: TokenSet, forced: bool) -> TokenSet:
        async with self._lock:
            current = self._tokens
            fresh = current is not None and not current.dead and not current.needs_refresh(time.time())
            if current is not None and current is not seen and (fresh or forced):
                return current  # refreshed while we waited: one refresh per expiry
            g = self._grants
            key = self._lease_key()
            await self._acquire_lease(key)  # other replicas: one refresh of this grant at a time
            renewing = asyncio.get_running_loop().create_task(self._renew_lease(key))
            try:
                return await self._refresh_held(seen, forced)
            finally:
                renewing.cancel()
                with contextlib.suppress(StoreError):  # else it expires by itself
                    await g.store.release_lease(key, g.holder)

    async def _renew_lease(self, key: str) -> None:
        """Keep the lease while this replica is alive and refreshing: a slow token endpoint must
        not let another replica send the same refresh token meanwhile."""
        g = self._grants
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            with contextlib.suppress(StoreError):  # a store blip: the next renewal tries again
                await g.store.acquire_lease(key, g.holder, LEASE_TTL_S)

    async def _acquire_lease(self, key: str) -> None:
        g = self._grants
        # a holder that died leaves its lease to expire: wait that long, and a little more
        deadline = time.monotonic() + LEASE_WAIT_S
        while True:
            try:
                if await g.store.acquire_lease(key, g.holder, LEASE_TTL_S):
                    return
            except StoreError as exc:
                raise g.store_error(exc) from None
            if time.monotonic() > deadline:
                raise BrokerError(
                    "upstream_unreachable", "another broker process is refreshing this token", self.route
                )
            await asyncio.sleep(LEASE_POLL_S)

    async def _refresh_held(self, seen: TokenSet, forced: bool) -> TokenSet:
        """The refresh itself, with the lease held: the grant is read again first, since
        another process (or a connect) may have replaced it meanwhile."""
        stored = await self._read()
        if stored is None or stored.dead:
            self._remember(stored)
            raise await self._needs_connect(stored.dead if stored is not None else None)
        now = time.time()
        replaced = stored.refresh_token != seen.refresh_token or stored.access_token != seen.access_token
        if replaced and not stored.needs_refresh(now):
            self._remember(stored)
            return stored  # another process refreshed it
        if not stored.refresh_token:
            if not forced and stored.expires_at and now < stored.expires_at:
                self._remember(stored)
                return stored
            raise await self._end("the access token expired and there is no refresh token")
        backing_off = time.monotonic() - self._refresh_failed_at < REFRESH_FAILURE_BACKOFF_S
        if not forced and backing_off and stored.expires_at and now < stored.expires_at:
            self._remember(stored)
            return stored  # the old token still works; do not hammer a failing endpoint
        g = self._grants
        self.state = AuthState.REFRESHING
        try:
            client = await g.client_record()
            moved = issuer_changed(stored.issuer, client.issuer)
            if moved is not None:  # never send a refresh token to another authorization server
                raise OAuthError(moved, "issuer_changed")
            doc = await token_request(g.http(), client, "refresh_token", refresh_token=stored.refresh_token)
            new = parse_token_response(doc, previous_refresh=stored.refresh_token)
        except (OAuthError, SecretStoreError) as exc:
            code = exc.error if isinstance(exc, OAuthError) else ""
            if code == "issuer_changed":
                raise await self._end(f"{exc}: connect again") from None
            if code in _ENDED:
                if code == "invalid_client":
                    await g.forget_client()  # the registration is gone: the next connect registers
                raise await self._end(
                    f"the authorization server refused the refresh token ({code})"
                ) from None
            self._refresh_failed_at = time.monotonic()
            self._remember(stored)
            if not forced and stored.expires_at and now < stored.expires_at:
                return stored
            raise BrokerError(
                "upstream_unreachable", f"cannot refresh the token: {exc}", self.route
            ) from None
        self._hold(new.access_token, new.refresh_token)
        new.subject = new.subject or stored.subject
        new.issuer = stored.issuer or client.issuer
        # the old refresh token is dead now: store the new one before using anything
        grant = Grant(
            self.route, self.client, self.user, new.to_json(), GRANT_ACTIVE, new.expires_at, self._last_used
        )
        self.refreshes += 1
        try:
            written = await g.store.replace_grant(grant, self._version)
        except StoreError as exc:
            self.reason = f"refreshed, but the new tokens could not be stored: {exc}"
            written = True  # this replica uses them; the next refresh (or a reconnect) heals the store
        if not written:
            # a reconnect (or a replica that took over a lapsed lease) wrote the grant meanwhile:
            # theirs stands; this request still uses the pair it was just given
            self._remember(new)
            self._tokens = None  # the next request reads what the store holds now
            return new
        self._version += 1
        self._remember(new)
        return new

    async def _end(self, why: str, wanted_scope: str = "") -> BrokerError:
        """This user's grant is over: remembered as dead; the user connects again (asking for
        `wanted_scope` too, after a step-up)."""
        await self._grants.mark_dead(self.client, self.user, why, self._last_used, wanted_scope)
        dead = TokenSet(access_token="-", refresh_token=None, expires_at=None, dead=why)
        dead.wanted_scope = wanted_scope
        self._remember(dead)
        return await self._needs_connect(why)
