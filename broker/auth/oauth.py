"""OAuth 2.1 for an MCP upstream: discovery, registration, tokens, and the runtime credential.

Owns: RFC 9728 protected-resource discovery, RFC 8414 / OpenID authorization-server metadata
and the checks SPEC.md puts on it (S256, https), RFC 7591 dynamic client registration kept in
the secret store, the token endpoint calls (authorization_code, refresh_token with RFC 8707
`resource`), RFC 7009 revocation, and `OAuthCredential`: a header on request, refreshed before
expiry and after a 401, one refresh at a time, the rotated refresh token stored before the new
access token is used. Must never: let a token reach a log, an error or an agent; loop on a dead
refresh token; follow a redirect from an authorization server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from broker.auth.base import AuthState, Credential
from broker.auth.secret_store import SecretStore, SecretStoreError, client_secret_account, resolve
from broker.config import OAuthAuth, Route
from broker.errors import BrokerError
from broker.scrub import SecretSet

_T = TypeVar("_T")
CLIENT_ACCOUNT = "{route}:oauth_client"
TOKENS_ACCOUNT = "{route}:oauth_tokens"
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=20, connect=10)
MAX_SKEW_S = 60.0  # refresh this long before expiry (less for very short-lived tokens)
RECHECK_MISSING_S = 1.0
REFRESH_FAILURE_BACKOFF_S = 5.0


class OAuthError(Exception):
    """A failed OAuth step. `error` is the RFC 6749 code when the server gave one."""

    def __init__(self, message: str, error: str = "") -> None:
        super().__init__(message)
        self.error = error


# ---------------------------------------------------------------- metadata (RFC 9728, RFC 8414)


@dataclass(frozen=True)
class ServerMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None
    revocation_endpoint: str | None
    resource: str
    scopes_supported: tuple[str, ...] = ()
    iss_parameter_supported: bool = False


def _well_known(base: str, name: str) -> list[str]:
    """RFC 8414 §3.1 / RFC 9728 §3.1: the path-inserted form first, then the root form."""
    p = urlsplit(base)
    path = p.path.rstrip("/")
    urls = []
    if path:
        urls.append(urlunsplit((p.scheme, p.netloc, f"/.well-known/{name}{path}", "", "")))
    urls.append(urlunsplit((p.scheme, p.netloc, f"/.well-known/{name}", "", "")))
    return urls


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(
            url, allow_redirects=False, timeout=HTTP_TIMEOUT, headers={"Accept": "application/json"}
        ) as r:
            if r.status != 200:
                return None
            doc = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _check_url(url: Any, what: str, insecure_ok: bool) -> str:
    if not isinstance(url, str) or not url:
        raise OAuthError(f"the authorization server metadata has no {what}")
    scheme = urlsplit(url).scheme
    if scheme != "https" and not (insecure_ok and scheme == "http"):
        raise OAuthError(f"the {what} is not https:// ({url}); refusing to send credentials there")
    return url


async def discover(session: aiohttp.ClientSession, resource: str, insecure_ok: bool) -> ServerMetadata:
    """Find and check the authorization server for the protected resource `resource`."""
    prm = None
    for url in _well_known(resource, "oauth-protected-resource"):
        prm = await _get_json(session, url)
        if prm is not None:
            break
    if prm is not None:
        servers = prm.get("authorization_servers") or []
        if not servers or not isinstance(servers[0], str):
            raise OAuthError("the protected-resource metadata names no authorization server")
        issuer = servers[0]
        published = prm.get("resource")
        if isinstance(published, str) and published.rstrip("/") != resource.rstrip("/"):
            raise OAuthError(f"the protected-resource metadata is for {published}, not {resource}")
    else:  # older servers: the authorization server lives at the resource's origin
        p = urlsplit(resource)
        issuer = urlunsplit((p.scheme, p.netloc, "", "", ""))
    _check_url(issuer, "issuer", insecure_ok)

    meta = None
    for url in [
        *_well_known(issuer, "oauth-authorization-server"),
        *_well_known(issuer, "openid-configuration"),
        issuer.rstrip("/") + "/.well-known/openid-configuration",
    ]:
        meta = await _get_json(session, url)
        if meta is not None:
            break
    if meta is None:
        raise OAuthError(f"no authorization server metadata found for {issuer}")
    if str(meta.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise OAuthError(f"the metadata's issuer {meta.get('issuer')!r} does not match {issuer!r}")
    methods = meta.get("code_challenge_methods_supported") or []
    if "S256" not in methods:
        raise OAuthError("the authorization server does not list PKCE S256; refusing to log in without it")
    return ServerMetadata(
        issuer=issuer,
        authorization_endpoint=_check_url(
            meta.get("authorization_endpoint"), "authorization endpoint", insecure_ok
        ),
        token_endpoint=_check_url(meta.get("token_endpoint"), "token endpoint", insecure_ok),
        registration_endpoint=(
            _check_url(meta["registration_endpoint"], "registration endpoint", insecure_ok)
            if meta.get("registration_endpoint")
            else None
        ),
        revocation_endpoint=(
            _check_url(meta["revocation_endpoint"], "revocation endpoint", insecure_ok)
            if meta.get("revocation_endpoint")
            else None
        ),
        resource=resource,
        scopes_supported=tuple(s for s in meta.get("scopes_supported") or [] if isinstance(s, str)),
        iss_parameter_supported=bool(meta.get("authorization_response_iss_parameter_supported")),
    )


# ---------------------------------------------------------------- what is stored


@dataclass
class ClientRecord:
    """The OAuth client the broker uses for a route (registered or pinned), plus where to use it."""

    client_id: str
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str | None
    registration_endpoint: str | None
    resource: str
    redirect_uri: str
    client_secret: str | None = None  # a registered confidential client's secret
    registered: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientRecord:
        return cls(**json.loads(text))


@dataclass
class TokenSet:
    access_token: str
    refresh_token: str | None
    expires_at: float | None  # epoch seconds
    scope: str = ""
    token_type: str = "Bearer"
    subject: str | None = None
    obtained_at: float = field(default_factory=time.time)
    dead: str | None = None  # why the grant ended (invalid_grant): needs_login until a new login

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TokenSet:
        return cls(**json.loads(text))

    def lifetime(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.obtained_at

    def needs_refresh(self, now: float) -> bool:
        if self.expires_at is None:
            return False
        life = self.lifetime() or 0
        skew = min(MAX_SKEW_S, max(life * 0.2, 0.5))
        return now >= self.expires_at - skew


def parse_token_response(doc: dict[str, Any], previous_refresh: str | None = None) -> TokenSet:
    """RFC 6749 §5.1. A response without a refresh_token keeps the previous one (§6)."""
    access = doc.get("access_token")
    if not isinstance(access, str) or not access:
        raise OAuthError("the token response has no access_token")
    token_type = str(doc.get("token_type", "Bearer"))
    if token_type.lower() != "bearer":
        raise OAuthError(f"unsupported token_type {token_type!r}")
    expires_in = doc.get("expires_in")
    now = time.time()
    expires_at = now + float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else None
    refresh = doc.get("refresh_token")
    subject = next((str(doc[k]) for k in ("sub", "account", "user", "email") if doc.get(k)), None)
    return TokenSet(
        access_token=access,
        refresh_token=refresh if isinstance(refresh, str) and refresh else previous_refresh,
        expires_at=expires_at,
        scope=str(doc.get("scope", "")),
        subject=subject,
        obtained_at=now,
    )


_ERROR_CODE = re.compile(r"^[a-z_]{1,64}$")


def error_code(doc: Any) -> str:
    """An RFC 6749 error code from a response, or "": never free text, which could echo a secret."""
    error = doc.get("error") if isinstance(doc, dict) else None
    return error if isinstance(error, str) and _ERROR_CODE.match(error) else ""


async def token_request(
    session: aiohttp.ClientSession, client: ClientRecord, form: dict[str, str]
) -> dict[str, Any]:
    """POST the token endpoint (client_secret_post when the client has a secret)."""
    data = {**form, "client_id": client.client_id, "resource": client.resource}
    if client.client_secret:
        data["client_secret"] = client.client_secret
    try:
        async with session.post(
            client.token_endpoint,
            data=data,
            allow_redirects=False,
            timeout=HTTP_TIMEOUT,
            headers={"Accept": "application/json"},
        ) as r:
            try:
                doc = await r.json(content_type=None)
            except ValueError:
                doc = None
            if r.status == 200 and isinstance(doc, dict):
                return doc
            error = error_code(doc)
            raise OAuthError(f"the token endpoint answered HTTP {r.status} {error}".strip(), error)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OAuthError(f"cannot reach the token endpoint: {type(exc).__name__}") from None


async def register_client(
    session: aiohttp.ClientSession, meta: ServerMetadata, redirect_uri: str, scopes: tuple[str, ...]
) -> ClientRecord:
    """RFC 7591 dynamic registration as a public client (PKCE, no secret)."""
    if not meta.registration_endpoint:
        raise OAuthError("the server offers no dynamic client registration; set auth.client_id in the config")
    body: dict[str, Any] = {
        "client_name": "agentcard-broker",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    if scopes:
        body["scope"] = " ".join(scopes)
    try:
        async with session.post(
            meta.registration_endpoint, json=body, allow_redirects=False, timeout=HTTP_TIMEOUT
        ) as r:
            doc = await r.json(content_type=None)
            if r.status not in (200, 201) or not isinstance(doc, dict) or not doc.get("client_id"):
                raise OAuthError(f"client registration failed: HTTP {r.status}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise OAuthError(f"client registration failed: {type(exc).__name__}") from None
    return ClientRecord(
        client_id=str(doc["client_id"]),
        client_secret=str(doc["client_secret"]) if doc.get("client_secret") else None,
        issuer=meta.issuer,
        authorization_endpoint=meta.authorization_endpoint,
        token_endpoint=meta.token_endpoint,
        revocation_endpoint=meta.revocation_endpoint,
        registration_endpoint=meta.registration_endpoint,
        resource=meta.resource,
        redirect_uri=redirect_uri,
    )


async def revoke(session: aiohttp.ClientSession, client: ClientRecord, token: str, hint: str) -> bool:
    """RFC 7009. True when the server accepted it."""
    if not client.revocation_endpoint:
        return False
    data = {"token": token, "token_type_hint": hint, "client_id": client.client_id}
    if client.client_secret:
        data["client_secret"] = client.client_secret
    try:
        async with session.post(
            client.revocation_endpoint, data=data, allow_redirects=False, timeout=HTTP_TIMEOUT
        ) as r:
            if r.status == 200:
                return True
            retry = r.status in (400, 401) and "client_secret" not in data
        if retry:  # some servers (the MCP SDK's) want the field present, empty, for public clients
            async with session.post(
                client.revocation_endpoint,
                data={**data, "client_secret": ""},
                allow_redirects=False,
                timeout=HTTP_TIMEOUT,
            ) as r:
                return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
    return False


# ---------------------------------------------------------------- the secret store side


class OAuthStore:
    """The route's client record and tokens in the secret store (blocking calls)."""

    def __init__(self, route: str, store: SecretStore) -> None:
        self.route = route
        self.store = store
        self._client_account = CLIENT_ACCOUNT.format(route=route)
        self._tokens_account = TOKENS_ACCOUNT.format(route=route)

    def _load(self, account: str, parse: Callable[[str], _T]) -> _T | None:
        raw = self.store.get(account)
        if not raw:
            return None
        try:
            return parse(raw)
        except (ValueError, TypeError):  # unreadable: as if absent, a new login replaces it
            return None

    def load_client(self) -> ClientRecord | None:
        return self._load(self._client_account, ClientRecord.from_json)

    def save_client(self, client: ClientRecord) -> None:
        self.store.set(self._client_account, client.to_json())

    def drop_client(self) -> None:
        self.store.delete(self._client_account)

    def load_tokens(self) -> TokenSet | None:
        return self._load(self._tokens_account, TokenSet.from_json)

    def save_tokens(self, tokens: TokenSet) -> None:
        self.store.set(self._tokens_account, tokens.to_json())

    def drop_tokens(self) -> bool:
        return self.store.delete(self._tokens_account)


def pinned_client(route: Route, auth: OAuthAuth, meta: ServerMetadata, store: SecretStore) -> ClientRecord:
    """A client_id from the config (+ a confidential client's secret from its reference)."""
    assert auth.client_id is not None
    secret = None
    if auth.client_secret is not None:
        found = resolve(auth.client_secret, client_secret_account(route.name), store)
        if found.value is None:
            raise OAuthError(
                f"the client secret is missing: {found.reason}; run: agentcard-broker set-key {route.name}"
            )
        secret = found.value
    return ClientRecord(
        client_id=auth.client_id,
        client_secret=secret,
        issuer=meta.issuer,
        authorization_endpoint=meta.authorization_endpoint,
        token_endpoint=meta.token_endpoint,
        revocation_endpoint=meta.revocation_endpoint,
        registration_endpoint=meta.registration_endpoint,
        resource=meta.resource,
        redirect_uri=redirect_uri_for(auth),
        registered=False,
    )


def redirect_uri_for(auth: OAuthAuth) -> str:
    return f"http://127.0.0.1:{auth.redirect_port}/callback"


# ---------------------------------------------------------------- the daemon's credential


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

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False)
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
        if tokens is None or tokens.dead or not tokens.refresh_token:
            return False
        if used.get("Authorization") != f"Bearer {tokens.access_token}":
            return True  # another request refreshed meanwhile: retry with the new token
        try:
            await self._refresh(tokens, forced=True)
        except BrokerError:
            return False
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
            self.state = AuthState.REFRESHING
            try:
                doc = await token_request(
                    self._http(), client, {"grant_type": "refresh_token", "refresh_token": seen.refresh_token}
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

    async def _end_grant(self, why: str) -> BrokerError:
        """The grant is over: remember it (across restarts too) and never refresh it again."""
        dead = TokenSet(access_token="-", refresh_token=None, expires_at=None, dead=why)
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
