"""`OAuthCredential`: an OAuth route's tokens, asked for a valid header (a TokenSource).

Owns: the tokens a `login` stored, read from the secret store and kept fresh: refreshed before
expiry and after an upstream 401, one refresh at a time however many requests wait, the rotated
refresh token stored before the new access token is used, a dead grant remembered (across
restarts too) as `needs_login`; what `check` reports for an OAuth route. Must never: let a token
reach a log, an error or an agent; loop on a dead refresh token; put back in memory a token a
refresh has rotated out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp

from broker.auth.base import AuthState, Credential, CredentialCheck
from broker.auth.oauth.discovery import named_authorization_server
from broker.auth.oauth.registration import ClientRecord
from broker.auth.oauth.store import OAuthStore
from broker.auth.oauth.tokens import TokenSet, parse_token_response, scope_union, token_request
from broker.auth.oauth.transport import OAuthError, endpoint_session
from broker.auth.secret_store import SecretStore, SecretStoreError
from broker.config import OAuthAuth, Route
from broker.errors import BrokerError
from broker.scrub import SecretSet

RECHECK_MISSING_S = 1.0
REFRESH_FAILURE_BACKOFF_S = 5.0
REDISCOVER_EVERY_S = 5.0  # after an upstream 401: which authorization server guards it now?


def issuer_changed(old: str | None, new: str) -> str | None:
    """Why a grant of `old` must not be used when the resource names `new`; None if the same."""
    if old is None or old.rstrip("/") == new.rstrip("/"):
        return None
    return f"the authorization server changed from {old} to {new}"


class OAuthCredential(Credential):
    """Tokens from a `login`, kept fresh. One refresh at a time however many requests wait."""

    can_refresh = True
    has_mode = False

    def __init__(self, route: Route, auth: OAuthAuth, store: SecretStore, secrets: SecretSet) -> None:
        super().__init__(route.name)
        self.auth = auth
        self._store = OAuthStore(route.name, store)
        self._secrets = secrets
        self._client: ClientRecord | None = None
        self._tokens: TokenSet | None = None
        self._checked_at = float("-inf")
        self._refresh_lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._refresh_failed_at = float("-inf")
        self._discovered_at = float("-inf")
        self._stale = True
        # a store read that overlaps a refresh may hold the tokens that refresh just rotated
        # out: bumped as a rotation starts and ends, and read while it runs, so that such a read
        # is thrown away rather than put a dead refresh token back in memory
        self._rotations = 0
        self._rotating = False
        self.refreshes = 0
        self.scope = ""
        self.subject: str | None = None
        self.reason = "not read yet"

    def _fix(self) -> str:
        return f"run: agentcard-broker login {self.route}"

    def check(self) -> CredentialCheck:
        try:
            tokens = self._store.load_tokens()
        except SecretStoreError as exc:
            return CredentialCheck("store unreadable", str(exc))
        if tokens is None:
            return CredentialCheck("not logged in", self._fix())
        if tokens.dead:
            return CredentialCheck("login ended", f"{tokens.dead}; {self._fix()}")
        return CredentialCheck(f"logged in (scopes: {tokens.scope or '-'})")

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = endpoint_session()
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def invalidate(self) -> None:
        self._stale = True  # a login/logout by the CLI: read the store before the next request

    def _remember(self, tokens: TokenSet | None, client: ClientRecord | None) -> None:
        self._secrets.add(client.client_secret if client else None)
        if tokens is not None:
            self._secrets.add(tokens.access_token, tokens.refresh_token)
        self._client, self._tokens = client, tokens
        self.expires_at = (
            datetime.fromtimestamp(tokens.expires_at, UTC)
            if tokens and tokens.expires_at and not tokens.dead
            else None
        )
        self.scope = tokens.scope if tokens else ""
        self.subject = tokens.subject if tokens else None
        self.mode = None  # an OAuth token does not say whether the account is test or live
        if tokens is None or client is None:
            self.state = AuthState.NO_CREDENTIAL
            self.reason = f"never logged in; {self._fix()}"
        elif tokens.dead:
            self.state = AuthState.NEEDS_LOGIN
            self.reason = f"{tokens.dead}; {self._fix()}"
        elif self.state is not AuthState.CREDENTIAL_REJECTED:
            self.state = AuthState.READY
            self.reason = f"logged in to {client.issuer}"

    async def refresh_from_store(self) -> None:
        async with self._load_lock:
            self._stale = False  # an invalidate() during the read below sets it again
            rotations = self._rotations
            try:
                client, tokens = await asyncio.to_thread(self._load)
            except SecretStoreError as exc:
                self._checked_at = time.monotonic()
                self.state = AuthState.NO_CREDENTIAL
                self.reason = str(exc)
                return
            if self._rotating or self._rotations != rotations:
                self._stale = True  # read while a refresh rotated the tokens: read again later
                return
            self._checked_at = time.monotonic()
            if tokens is not self._tokens or client is not self._client:
                self._remember(tokens, client)

    def _load(self) -> tuple[ClientRecord | None, TokenSet | None]:
        client = self._store.load_client()
        tokens = self._store.load_tokens()
        if client is not None and self._client is not None and client == self._client:
            client = self._client
        if tokens is not None and self._tokens is not None and tokens == self._tokens:
            tokens = self._tokens
        return client, tokens

    async def prepare(self) -> None:
        if self._stale:
            await self.refresh_from_store()

    async def _current(self) -> TokenSet:
        missing = self._tokens is None or self._tokens.dead
        if self._stale or (missing and time.monotonic() - self._checked_at > RECHECK_MISSING_S):
            await self.refresh_from_store()
        tokens = self._tokens
        if tokens is None or self._client is None:
            raise self.error("no_credential", f"route {self.route!r} is not logged in; {self._fix()}")
        if tokens.dead:
            raise self.error(
                "needs_login", f"the login for route {self.route!r} ended ({tokens.dead}); {self._fix()}"
            )
        return tokens

    async def authorization(self) -> dict[str, str]:
        tokens = await self._current()
        if tokens.needs_refresh(time.time()):
            tokens = await self._refresh(tokens, forced=False)
        return {"Authorization": f"Bearer {tokens.access_token}"}

    async def retry_after_rejection(self, used: dict[str, str]) -> bool:
        """An upstream 401 for `used`: refresh once (unless someone already did). True = retry."""
        tokens = self._tokens
        if tokens is None or tokens.dead:
            return False
        if used.get("Authorization") != f"Bearer {tokens.access_token}":
            return True  # another request refreshed meanwhile: retry with the new token
        if await self._moved(tokens):
            return False  # the grant is of another authorization server: needs_login now
        if not tokens.refresh_token:
            return False
        try:
            await self._refresh(tokens, forced=True)
        except BrokerError:
            return False
        return True

    async def _moved(self, tokens: TokenSet) -> bool:
        """Issuer binding: does the resource name another authorization server than the one
        that issued `tokens`? Then the grant ends (never sent there, never refreshed). Asked at
        most every REDISCOVER_EVERY_S; a discovery that fails leaves the grant as it is."""
        client = self._client
        now = time.monotonic()
        if client is None or now - self._discovered_at < REDISCOVER_EVERY_S:
            return False
        self._discovered_at = now
        try:
            current = await named_authorization_server(self._http(), client.resource)
        except OAuthError:
            return False
        if current is None:
            return False
        why = issuer_changed(tokens.issuer or client.issuer, current)
        if why is None or self._tokens is not tokens:
            return False
        await self._end_grant(f"{why}: log in again")
        return True

    async def _refresh(self, seen: TokenSet, forced: bool) -> TokenSet:
        async with self._refresh_lock:
            current = self._tokens
            if current is not seen and current is not None and not current.dead:
                return current  # refreshed while we waited: exactly one refresh per expiry
            client = self._client
            if client is None or seen.refresh_token is None:
                if not forced and seen.expires_at and time.time() < seen.expires_at:
                    return seen
                raise await self._end_grant("the access token expired and there is no refresh token")
            backing_off = time.monotonic() - self._refresh_failed_at < REFRESH_FAILURE_BACKOFF_S
            if not forced and backing_off and seen.expires_at and time.time() < seen.expires_at:
                return seen  # the old token still works; do not hammer a failing endpoint
            moved = issuer_changed(seen.issuer, client.issuer)
            if moved is not None:  # never send a refresh token to another authorization server
                raise await self._end_grant(f"{moved}: log in again")
            self.state = AuthState.REFRESHING
            try:
                doc = await token_request(
                    self._http(), client, "refresh_token", refresh_token=seen.refresh_token
                )
                new = parse_token_response(doc, previous_refresh=seen.refresh_token)
            except OAuthError as exc:
                if exc.error in ("invalid_grant", "invalid_client", "unauthorized_client"):
                    if exc.error == "invalid_client" and client.registered:
                        await asyncio.to_thread(self._store.drop_client)
                    raise await self._end_grant(
                        f"the authorization server refused the refresh token ({exc.error})"
                    ) from None
                self._refresh_failed_at = time.monotonic()
                self.state = AuthState.READY
                if seen.expires_at and time.time() < seen.expires_at and not forced:
                    return seen
                raise self.error("upstream_unreachable", f"cannot refresh the token: {exc}") from None
            self._secrets.add(new.access_token, new.refresh_token)
            if new.subject is None:
                new.subject = seen.subject
            new.issuer = seen.issuer or client.issuer
            self._rotating = True
            self._rotations += 1
            try:
                # the old refresh token is dead now: store the new one before using anything
                await asyncio.to_thread(self._store.save_tokens, new)
            except SecretStoreError as exc:
                self.reason = f"refreshed, but could not store the new tokens: {exc}"
            finally:
                self._remember(new, client)
                self._rotations += 1
                self._rotating = False
            self.refreshes += 1
            self.state = AuthState.READY
            return new

    async def step_up(self, scopes: frozenset[str]) -> BrokerError:
        """RFC 6750 §3.1 insufficient_scope: the route needs a login asking for the scopes it
        had and those the upstream asks for. No refresh: a refresh cannot widen a grant."""
        async with self._refresh_lock:
            tokens = self._tokens
            had = tokens.scope.split() + tokens.wanted_scope.split() if tokens is not None else []
            wanted = scope_union(self.auth.scopes, had, sorted(scopes))
            if tokens is not None and tokens.dead and tokens.wanted_scope == wanted:
                return self.error("needs_login", f"{tokens.dead}; {self._fix()}")  # said already
            asked = " ".join(sorted(scopes)) or "unnamed"
            return await self._end_grant(
                f"the upstream asks for more scope ({asked}): log in again for {wanted}", wanted
            )

    async def _end_grant(self, why: str, wanted_scope: str = "") -> BrokerError:
        """The grant is over: remember it (across restarts too) and never refresh it again."""
        old = self._tokens
        dead = TokenSet(
            access_token="-",
            refresh_token=None,
            expires_at=None,
            dead=why,
            issuer=old.issuer if old is not None else None,
            wanted_scope=wanted_scope or (old.wanted_scope if old is not None else ""),
        )
        with contextlib.suppress(SecretStoreError):
            await asyncio.to_thread(self._store.save_tokens, dead)
        self._remember(dead, self._client)
        return self.error("needs_login", f"the login for route {self.route!r} ended: {why}; {self._fix()}")

    def on_upstream_status(self, status: int) -> None:
        if status == 401:
            if self.state is AuthState.READY:
                self.state = AuthState.CREDENTIAL_REJECTED
                self.reason = f"the upstream refused the token (HTTP 401); {self._fix()}"
        elif status < 400 and self.state is AuthState.CREDENTIAL_REJECTED:
            self.state = AuthState.READY
            self.reason = f"logged in to {self._client.issuer}" if self._client else ""

    def details(self) -> dict[str, Any]:
        return {
            "scopes": self.scope.split() if self.scope else [],
            "subject": self.subject,
            "refreshes": self.refreshes,
        }
