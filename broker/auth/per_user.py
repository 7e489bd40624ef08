"""`UserGrants`: one per per-user route; its end users' AgentCard grants, kept in the StateStore.

Owns: the route's OAuth client (discovered and registered once, redirect URI the `public_url`
callback, kept sealed in the state store so every replica uses the same registration; or the
`client_id` pinned in the config), connect
links (random, single use, 15 minutes), the authorization request a connect page starts (PKCE
S256, `resource`, a `state` whose flow values are sealed in the store), the callback's code
exchange into that user's `Grant`, revocation, and a bounded cache of the users' credentials
(`per_user_credential.UserCredential`). Must never: put a token, a code, a verifier or a state in
an error, a log event or a page; store a grant for any user but the one the `state` was made for;
accept a `state` twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets as pysecrets
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING

import aiohttp
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri

from broker.auth.base import Credential
from broker.auth.oauth.credential import REDISCOVER_EVERY_S, issuer_changed
from broker.auth.oauth.discovery import ServerMetadata, discover, named_authorization_server
from broker.auth.oauth.registration import (
    ClientRecord,
    metadata_document_client,
    pinned_client,
    register_client,
)
from broker.auth.oauth.revocation import revoke
from broker.auth.oauth.store import OAuthStore
from broker.auth.oauth.tokens import Pkce, TokenSet, parse_token_response, scope_union, token_request
from broker.auth.oauth.transport import OAuthError, endpoint_session
from broker.auth.secret_store import SecretStore, SecretStoreError
from broker.config import Config, OAuthAuth, Route
from broker.errors import BrokerError
from broker.scrub import SecretSet
from broker.store import ConnectRecord, Grant, StateStore, StoreError

if TYPE_CHECKING:
    from broker.auth.per_user_credential import UserCredential

CONNECT_TTL_S = 900.0  # SPEC: a connect URL is valid 15 minutes
AUTHORIZE_TTL_S = 900.0  # from "Continue" to the callback: the sign-in at AgentCard
MAX_CACHED_USERS = 10_000
CALLBACK_PATH = "/_broker/callback"
CONNECT_PATH = "/_broker/connect/"
STATE_PREFIX = "oauth-state:"  # never a connect id (token_urlsafe has no colon): a state is not a link
GRANT_ACTIVE = "active"
GRANT_DEAD = "dead"


class ConnectError(Exception):
    """A connect or callback step failed. The text is safe to show on a page."""


def _link_deadline(record: ConnectRecord) -> float | None:
    """When a connect link's record ends; None for a record that is not a connect link."""
    try:
        deadline = json.loads(record.flow).get("link_deadline") if record.flow else None
    except (ValueError, AttributeError):
        return None
    return float(deadline) if isinstance(deadline, int | float) else None


async def read_link(store: StateStore, connect_id: str) -> ConnectRecord | None:
    """An unused connect link's record, left unused (a page shown is not a link used). The store
    offers only a take: the record is taken and put back for the rest of its life."""
    record = await store.take_connect(connect_id)
    if record is None:
        return None
    deadline = _link_deadline(record)
    left = deadline - time.time() if deadline is not None else 0.0
    if left <= 0:
        return None
    await store.put_connect(connect_id, record, left)
    return record


async def take_link(store: StateStore, connect_id: str) -> ConnectRecord | None:
    """A connect link's record, once: a second take, an unknown or expired id give None."""
    record = await store.take_connect(connect_id)
    if record is None or _link_deadline(record) is None:
        return None
    return record


class UserGrants:
    """One per per-user route: its end users' grants, kept in the StateStore."""

    def __init__(
        self, route: Route, config: Config, store: StateStore, secret_store: SecretStore, secrets: SecretSet
    ) -> None:
        assert isinstance(route.auth, OAuthAuth)
        self.route = route
        self.auth = route.auth
        self.config = config
        self.store = store
        self.secrets = secrets
        self.public_url = (config.public_url or "").rstrip("/")
        self.redirect_uri = self.public_url + CALLBACK_PATH
        self.holder = uuid.uuid4().hex  # this process, as a refresh lease holder
        # the callback URL is the same for every route: a state names its route by this tag
        self._state_tag = hashlib.sha256(route.name.encode("utf-8")).hexdigest()[:12]
        self._secret_store = secret_store
        # where versions before the shared store kept the per-user client (read once, moved over)
        self._old_client_store = OAuthStore(f"{route.name}:per_user", secret_store)
        # apart from the route's `login` client (another redirect URI), shared by every replica
        self._client_doc = f"oauth_client:{route.name}"
        self._meta: ServerMetadata | None = None
        self._client: ClientRecord | None = None
        self._client_lock = asyncio.Lock()
        # the issuer the resource named when last asked (issuer binding), and when that was
        self._issuer_now: str | None = None
        self._discovered_at = float("-inf")
        self._session: aiohttp.ClientSession | None = None
        self._users: OrderedDict[tuple[str, str], UserCredential] = OrderedDict()
        self._touches: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ credentials

    def credential(self, client: str, user: str, label: str | None) -> Credential:
        """The end user's credential: cached (the most recent MAX_CACHED_USERS), cheap to ask."""
        from broker.auth.per_user_credential import UserCredential

        key = (client, user)
        cred = self._users.get(key)
        if cred is None:
            cred = self._users[key] = UserCredential(self, client, user)
            if len(self._users) > MAX_CACHED_USERS:
                self._users.popitem(last=False)
        else:
            self._users.move_to_end(key)
        if label:
            cred.label = label
        return cred

    def invalidate(self) -> None:
        """Every cached user reads its grant from the store again on its next request (after
        `users revoke` or a reconnect made in another process)."""
        for cred in self._users.values():
            cred.invalidate()

    def _forget(self, client: str, user: str) -> None:
        cred = self._users.get((client, user))
        if cred is not None:
            cred.invalidate()

    def touch(self, client: str, user: str) -> None:
        """Stamp the user's last use, off the request's path (a failure only loses the stamp)."""
        task = asyncio.get_running_loop().create_task(self._touch(client, user))
        self._touches.add(task)
        task.add_done_callback(self._touches.discard)

    async def _touch(self, client: str, user: str) -> None:
        try:
            there = await self.store.touch_grant(self.route.name, client, user, time.time())
        except StoreError:
            return
        if not there:  # revoked meanwhile (`users revoke`, perhaps through another replica)
            self._forget(client, user)

    def store_error(self, exc: StoreError) -> BrokerError:
        return BrokerError("store_unavailable", f"the state store cannot be used: {exc}", self.route.name)

    # ------------------------------------------------------------ the route's OAuth client

    def http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = endpoint_session()
        return self._session

    async def authorization_server(self) -> tuple[ServerMetadata, ClientRecord]:
        """The route's authorization server and the broker's client there: discovered once, the
        client registered once (kept in the secret store) unless the config pins one."""
        async with self._client_lock:
            if self._meta is None or self._client is None:
                meta = await discover(self.http(), self.route.upstream, self.config.allow_insecure_upstream)
                self._client = await self._client_at(meta)
                self._meta = meta
                self._issuer_now = meta.issuer
            return self._meta, self._client

    @property
    def issuer_known(self) -> str | None:
        """The issuer the resource named when last asked (None: not asked yet)."""
        return self._issuer_now

    async def issuer_now(self) -> str | None:
        """Issuer binding, after an upstream 401: which authorization server the resource names
        now (asked at most every REDISCOVER_EVERY_S). When it changed, the route's client there
        is forgotten: the next connect discovers and registers at the new one."""
        now = time.monotonic()
        if now - self._discovered_at < REDISCOVER_EVERY_S:
            return self._issuer_now
        self._discovered_at = now
        try:
            named = await named_authorization_server(self.http(), self.route.upstream)
        except OAuthError:
            named = None
        if named is not None:
            async with self._client_lock:
                if self._meta is not None and issuer_changed(self._meta.issuer, named):
                    self._meta = self._client = None
                self._issuer_now = named
        return self._issuer_now

    async def client_record(self) -> ClientRecord:
        """The client for token requests: the one kept from before without the network, if any."""
        if self._client is not None:
            return self._client
        if not self.auth.client_id:
            stored = await self._stored_client()
            if stored is not None:
                self._client = stored
                return stored
        return (await self.authorization_server())[1]

    async def _stored_client(self) -> ClientRecord | None:
        try:
            raw = await self.store.get_doc(self._client_doc)
        except StoreError:
            return None
        if raw is None:
            raw = await self._moved_client()
        try:
            stored = ClientRecord.from_json(raw) if raw is not None else None
        except (ValueError, TypeError):
            return None
        if stored is None or stored.redirect_uri != self.redirect_uri:
            return None
        self.secrets.add(stored.client_secret)
        return stored

    async def _moved_client(self) -> str | None:
        """A registration an earlier version kept in the secret store, moved into the state store."""
        try:
            old = await asyncio.to_thread(self._old_client_store.load_client)
        except SecretStoreError:
            return None
        if old is None:
            return None
        raw = old.to_json()
        with contextlib.suppress(StoreError):
            await self.store.put_doc(self._client_doc, raw, only_new=True)
            await asyncio.to_thread(self._old_client_store.drop_client)
        return raw

    async def _keep_client(self, client: ClientRecord) -> ClientRecord:
        """Keep a new registration for every replica. Two replicas registering at once: the first
        one kept wins, and the other uses it too (its own registration is left unused)."""
        try:
            if await self.store.put_doc(self._client_doc, client.to_json(), only_new=True):
                return client
            kept = await self._stored_client()
        except StoreError:
            return client  # used here all the same; the next start registers again
        return kept if kept is not None else client

    async def _client_at(self, meta: ServerMetadata) -> ClientRecord:
        if self.auth.client_id:
            return await asyncio.to_thread(
                pinned_client, self.route, self.auth, meta, self._secret_store, self.redirect_uri
            )
        insecure_ok = self.config.allow_insecure_upstream
        document = metadata_document_client(meta, self.public_url, self.redirect_uri, insecure_ok)
        if document is not None:  # the server reads the broker's client document: no registration
            return document
        stored = await self._stored_client()
        if stored is not None and stored.issuer == meta.issuer:
            stored.resource = meta.resource
            stored.token_endpoint = meta.token_endpoint
            stored.authorization_endpoint = meta.authorization_endpoint
            stored.revocation_endpoint = meta.revocation_endpoint
            return stored
        if stored is not None:  # a registration at the resource's former authorization server
            with contextlib.suppress(StoreError):
                await self.store.delete_doc(self._client_doc)
        client = await register_client(
            self.http(), meta, self.redirect_uri, self.auth.scopes, application_type="web"
        )
        self.secrets.add(client.client_secret)
        return await self._keep_client(client)

    async def forget_client(self) -> None:
        """The server no longer knows our registration (invalid_client): register again next time."""
        async with self._client_lock:
            if self._client is not None and self._client.registered:
                self._meta = self._client = None
                with contextlib.suppress(StoreError):
                    await self.store.delete_doc(self._client_doc)

    # ------------------------------------------------------------ connecting a user

    async def connect_link(self, client: str, user: str, label: str | None) -> str:
        """A new single-use connect URL bound to (route, client, user)."""
        connect_id = pysecrets.token_urlsafe(32)
        flow = json.dumps({"link_deadline": time.time() + CONNECT_TTL_S})
        record = ConnectRecord(self.route.name, client, user, label or "", flow)
        try:
            await self.store.put_connect(connect_id, record, CONNECT_TTL_S)
        except StoreError as exc:
            raise self.store_error(exc) from None
        return f"{self.public_url}{CONNECT_PATH}{connect_id}"

    async def begin_authorization(self, record: ConnectRecord) -> str:
        """The authorize URL for the user of `record` (taken from its connect link). Its state,
        verifier and issuer are sealed in the store under the state until the callback."""
        try:
            meta, client = await self.authorization_server()
        except (OAuthError, SecretStoreError) as exc:
            raise ConnectError(f"AgentCard cannot be reached to start the sign-in: {exc}") from None
        pkce = Pkce.new()
        state = f"{self._state_tag}.{pysecrets.token_urlsafe(32)}"
        flow = {
            "verifier": pkce.verifier,
            "client_id": client.client_id,
            "issuer": meta.issuer,
            "iss_required": meta.iss_parameter_supported,
        }
        scope = await self._scope_for(record.client, record.user)
        pending = ConnectRecord(record.route, record.client, record.user, record.label, json.dumps(flow))
        try:
            await self.store.put_connect(STATE_PREFIX + state, pending, AUTHORIZE_TTL_S)
        except StoreError as exc:
            raise ConnectError(f"the broker cannot keep the sign-in: {exc}") from None
        return str(
            prepare_grant_uri(
                meta.authorization_endpoint,
                client.client_id,
                "code",
                redirect_uri=client.redirect_uri,
                scope=scope,
                state=state,
                code_challenge=pkce.challenge,
                code_challenge_method=pkce.method,
                resource=meta.resource,
            )
        )

    async def _scope_for(self, client: str, user: str) -> str | None:
        """The scope the user's connect asks for: the configured scopes, and those a step-up on
        the user's former grant asked for."""
        try:
            grant = await self.store.get_grant(self.route.name, client, user)
            wanted = TokenSet.from_json(grant.tokens).wanted_scope.split() if grant is not None else []
        except (StoreError, ValueError, TypeError):
            wanted = []
        return scope_union(self.auth.scopes, wanted) or None

    def owns_state(self, state: str) -> bool:
        """Was `state` made by this route's begin_authorization (by its form, not its validity)?"""
        return state.startswith(self._state_tag + ".")

    async def complete(self, state: str, code: str, iss: str | None) -> tuple[str, str]:
        """The callback: the state taken once, the issuer checked, the code exchanged and the
        user's grant stored. Returns (client, user). Raises ConnectError with a safe text."""
        again = "ask for a new link in the chat and start again"
        try:
            pending = await self.store.take_connect(STATE_PREFIX + state) if state else None
        except StoreError as exc:
            raise ConnectError(f"the broker cannot read the sign-in: {exc}") from None
        flow = json.loads(pending.flow) if pending is not None and pending.flow else {}
        if pending is None or pending.route != self.route.name or "verifier" not in flow:
            raise ConnectError(f"this sign-in is unknown, expired or already finished; {again}")
        issuer = str(flow["issuer"])
        if (iss is None and flow.get("iss_required")) or (
            iss is not None and iss.rstrip("/") != issuer.rstrip("/")
        ):
            raise ConnectError(f"the answer did not come from the expected authorization server; {again}")
        if not code:
            raise ConnectError(f"the answer carried no authorization code; {again}")
        try:
            client = await self.client_record()
        except (OAuthError, SecretStoreError) as exc:
            raise ConnectError(f"AgentCard cannot be reached: {exc}") from None
        if client.client_id != flow["client_id"]:
            raise ConnectError(f"the broker's registration at AgentCard changed meanwhile; {again}")
        try:
            doc = await token_request(
                self.http(),
                client,
                "authorization_code",
                code=code,
                redirect_uri=client.redirect_uri,
                code_verifier=str(flow["verifier"]),
            )
            tokens = parse_token_response(doc, issuer=issuer)
        except OAuthError as exc:
            if exc.error == "invalid_client":
                await self.forget_client()
            raise ConnectError(f"exchanging the authorization code failed ({exc}); {again}") from None
        grant = Grant(
            self.route.name, pending.client, pending.user, tokens.to_json(), GRANT_ACTIVE, tokens.expires_at
        )
        try:
            await self.store.put_grant(grant)
        except StoreError as exc:
            raise ConnectError(f"the broker cannot store the grant: {exc}") from None
        self._forget(pending.client, pending.user)
        return pending.client, pending.user

    # ------------------------------------------------------------ ending a grant

    async def mark_dead(
        self, client: str, user: str, why: str, last_used: float | None, wanted_scope: str = ""
    ) -> None:
        """The user's grant is over (the server refused its refresh token, or a step-up asks for
        `wanted_scope`): remember it, so that user reconnects, and never refresh it again."""
        dead = TokenSet(
            access_token="-", refresh_token=None, expires_at=None, dead=why, wanted_scope=wanted_scope
        )
        grant = Grant(self.route.name, client, user, dead.to_json(), GRANT_DEAD, None, last_used)
        with contextlib.suppress(StoreError):  # dead in memory all the same; a refresh is refused again
            await self.store.put_grant(grant)

    async def revoke(self, client: str, user: str) -> bool:
        """Revoke the user's tokens upstream (RFC 7009, best effort) and delete the grant.
        True when there was a grant."""
        try:
            grant = await self.store.get_grant(self.route.name, client, user)
        except StoreError as exc:
            raise self.store_error(exc) from None
        if grant is None:
            return False
        try:
            tokens: TokenSet | None = TokenSet.from_json(grant.tokens)
        except (ValueError, TypeError):
            tokens = None
        if tokens is not None and not tokens.dead:
            try:
                record = await self.client_record()
            except (OAuthError, SecretStoreError):
                record = None
            if record is not None:
                if tokens.refresh_token:
                    await revoke(self.http(), record, tokens.refresh_token, "refresh_token")
                await revoke(self.http(), record, tokens.access_token, "access_token")
        try:
            deleted = await self.store.delete_grant(self.route.name, client, user)
        except StoreError as exc:
            raise self.store_error(exc) from None
        self._forget(client, user)
        return deleted

    async def close(self) -> None:
        for task in list(self._touches):
            task.cancel()
        if self._session is not None:
            await self._session.close()
