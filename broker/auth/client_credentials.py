"""The OAuth client_credentials credential for AgentCard's v2 REST API (platform tokens).

Owns: minting a token from client_id + client_secret at `token_url`, keeping it until shortly
before it expires (3600 s, no refresh token), minting again then or after a 401, one mint at a
time. Must never: show the client secret or the token anywhere but the upstream request.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp

from broker.auth.base import AuthState, Credential, CredentialCheck
from broker.auth.oauth.tokens import MAX_SKEW_S
from broker.auth.oauth.transport import HTTP_TIMEOUT, endpoint_session, error_code
from broker.auth.secret_store import Lookup, SecretStore, client_secret_account, resolve
from broker.config import ClientCredentialsAuth
from broker.scrub import SecretSet


class ClientCredentialsCredential(Credential):
    can_refresh = True

    def __init__(
        self, route: str, auth: ClientCredentialsAuth, store: SecretStore, secrets: SecretSet
    ) -> None:
        super().__init__(route)
        self.auth = auth
        self._store = store
        self._secrets = secrets
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self.refreshes = 0
        self._stale = True  # prepare() looks whether a client secret is there
        self.reason = "no token minted yet"
        self.state = AuthState.READY

    def _fix(self) -> str:
        if self.auth.client_secret.kind == "keyring":
            return f"run: agentcard-broker set-key {self.route}"
        return f"check {self.auth.client_secret.describe()}"

    def _client_secret(self) -> Lookup:
        return resolve(self.auth.client_secret, client_secret_account(self.route), self._store)

    def check(self) -> CredentialCheck:
        found = self._client_secret()
        if found.value is None:
            return CredentialCheck(
                "no client secret", f"{found.reason}; run: agentcard-broker set-key {self.route}"
            )
        return CredentialCheck("client secret present")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def invalidate(self) -> None:
        self._expires_at = 0.0  # the secret may have changed: mint with it next time
        self._stale = True

    async def prepare(self) -> None:
        """Whether a client secret is stored (no network: a token is minted on first use), so
        `status` tells a missing secret, and one just stored by `set-key`, before any request."""
        if not self._stale:
            return
        self._stale = False
        found = await asyncio.to_thread(self._client_secret)
        if found.value is None:
            if self._token is None and self.state is not AuthState.REFRESHING:
                self.state = AuthState.NO_CREDENTIAL
                self.reason = f"no client secret: {found.reason}; {self._fix()}"
            return
        self._secrets.add(found.value)
        if self.state is AuthState.NO_CREDENTIAL:
            self.state = AuthState.READY
            self.reason = "client secret stored; a token is minted on the first request"

    def _valid(self, now: float) -> bool:
        return self._token is not None and now < self._expires_at

    async def authorization(self) -> dict[str, str]:
        if not self._valid(time.time()):
            await self._mint(self._token)
        return {"Authorization": f"Bearer {self._token}"}

    async def retry_after_rejection(self, used: dict[str, str]) -> bool:
        if used.get("Authorization") != f"Bearer {self._token}":
            return True
        try:
            await self._mint(self._token)
        except Exception:  # noqa: BLE001 - the caller turns a failed mint into the route's error
            return False
        return True

    async def _mint(self, seen: str | None) -> None:
        async with self._lock:
            if self._token != seen and self._valid(time.time()):
                return  # minted while we waited
            found = await asyncio.to_thread(self._client_secret)
            if found.value is None:
                self.state = AuthState.NO_CREDENTIAL
                self.reason = f"no client secret: {found.reason}; {self._fix()}"
                raise self.error("no_credential", self.reason)
            self._secrets.add(found.value)
            self.state = AuthState.REFRESHING
            form = {
                "grant_type": "client_credentials",
                "client_id": self.auth.client_id,
                "client_secret": found.value,
            }
            if self.auth.scopes:
                form["scope"] = " ".join(self.auth.scopes)
            if self._session is None or self._session.closed:
                self._session = endpoint_session()
            try:
                async with self._session.post(
                    self.auth.token_url, data=form, allow_redirects=False, timeout=HTTP_TIMEOUT
                ) as r:
                    doc: Any = await r.json(content_type=None)
                    status = r.status
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.state = AuthState.READY if self._token else AuthState.NO_CREDENTIAL
                raise self.error(
                    "upstream_unreachable", f"cannot mint a token: {type(exc).__name__}"
                ) from None
            token = doc.get("access_token") if isinstance(doc, dict) else None
            if status != 200 or not isinstance(token, str) or not token:
                error = error_code(doc)
                self.state = AuthState.CREDENTIAL_REJECTED
                self.reason = f"the token endpoint refused the client (HTTP {status} {error}); {self._fix()}"
                raise self.error("credential_rejected", self.reason)
            self._secrets.add(token)
            lifetime = float(doc.get("expires_in") or 3600)
            now = time.time()
            self._token = token
            self._expires_at = now + lifetime - min(MAX_SKEW_S, lifetime * 0.2)
            self.expires_at = datetime.fromtimestamp(now + lifetime, UTC)
            self.refreshes += 1
            self.state = AuthState.READY
            self.mode = None  # a platform token does not say whether it is test or live
            self.reason = f"platform token minted, valid until {self.expires_at.isoformat()}"

    def on_upstream_status(self, status: int) -> None:
        if status == 401:
            self.state = AuthState.CREDENTIAL_REJECTED
            self.reason = f"the upstream refused the minted token; {self._fix()}"

    def details(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes}
