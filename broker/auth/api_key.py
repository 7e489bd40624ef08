"""The static API key credential: `Authorization: Bearer sk_test_…` / `sk_live_…`.

Owns: reading the key from its reference (off the event loop, one read at a time), its mode,
the `allow_live` guard, and the `credential_rejected` state after an upstream 401. Must never:
show the key in `reason` or errors; retry a request (a static key cannot be refreshed).
"""

from __future__ import annotations

import asyncio
import time

from broker.auth.base import AuthState, Credential, CredentialCheck
from broker.auth.secret_store import Lookup, SecretStore, resolve
from broker.config import ApiKeyAuth
from broker.scrub import SecretSet

RECHECK_READY_S = 30.0  # re-read a working key this often (picks up rotation in the store)
RECHECK_MISSING_S = 1.0  # re-read a missing key at most this often (no hammering the keyring)


def key_mode(value: str) -> str | None:
    if value.startswith("sk_test_"):
        return "test"
    if value.startswith("sk_live_"):
        return "live"
    return None


def fix_hint(route: str, auth: ApiKeyAuth) -> str:
    if auth.key.kind == "keyring":
        return f"run: agentcard-broker set-key {route}"
    if auth.key.kind == "env":
        return f"set {auth.key.name} in the broker's environment"
    return f"write the key to {auth.key.name} (mode 0600)"


class ApiKeyCredential(Credential):
    def __init__(self, route: str, auth: ApiKeyAuth, store: SecretStore, secrets: SecretSet) -> None:
        super().__init__(route)
        self.auth = auth
        self._store = store
        self._secrets = secrets
        self._value: str | None = None
        self._header: dict[str, str] = {}
        self._checked_at = float("-inf")
        self._stale = True
        self._lock = asyncio.Lock()
        self.reason = "not read yet"

    def lookup(self) -> Lookup:
        """Resolve the key now (blocking)."""
        return resolve(self.auth.key, self.route, self._store)

    def check(self) -> CredentialCheck:
        found = self.lookup()
        if found.value is None:
            return CredentialCheck("no key", f"{found.reason}; {fix_hint(self.route, self.auth)}")
        mode = key_mode(found.value)
        if mode is None:
            return CredentialCheck(
                "not an AgentCard key", f"expected sk_test_ or sk_live_; {fix_hint(self.route, self.auth)}"
            )
        if mode == "live" and not self.auth.allow_live:
            return CredentialCheck(
                "live key",
                "a live (real money) key but allow_live is false; set it, or store an sk_test_ key",
            )
        return CredentialCheck(f"{mode}-mode key ({self.auth.key.describe()})")

    def _apply(self, found: Lookup) -> None:
        self._checked_at = time.monotonic()
        if found.value is None:
            self._value, self._header, self.mode = None, {}, None
            self.state = AuthState.NO_CREDENTIAL
            self.reason = f"{found.reason}; {fix_hint(self.route, self.auth)}"
            return
        self._secrets.add(found.value)
        mode = key_mode(found.value)
        if mode is None:
            self._value, self._header, self.mode = None, {}, None
            self.state = AuthState.NO_CREDENTIAL
            self.reason = (
                "the stored value is not an AgentCard API key (expected an sk_test_ or "
                f"sk_live_ prefix); {fix_hint(self.route, self.auth)}"
            )
            return
        changed = found.value != self._value
        self._value, self.mode = found.value, mode
        self._header = {"Authorization": f"Bearer {found.value}"}
        if changed or self.state is not AuthState.CREDENTIAL_REJECTED:
            self.state = AuthState.READY
            self.reason = f"{mode}-mode key from {self.auth.key.describe()}"

    async def refresh_from_store(self) -> None:
        async with self._lock:
            self._stale = False  # an invalidate() during the read below sets it again
            self._apply(await asyncio.to_thread(self.lookup))

    async def prepare(self) -> None:
        age = time.monotonic() - self._checked_at
        if self._stale or age > (RECHECK_READY_S if self._value else RECHECK_MISSING_S):
            await self.refresh_from_store()

    def ready_authorization(self) -> dict[str, str] | None:
        if (
            self._value is None
            or self._stale
            or time.monotonic() - self._checked_at > RECHECK_READY_S
            or (self.mode == "live" and not self.auth.allow_live)
        ):
            return None  # authorization() reads the store, or says what is wrong
        return self._header

    async def authorization(self) -> dict[str, str]:
        await self.prepare()
        if self._value is None:
            raise self.error("no_credential", f"no API key for route {self.route!r}: {self.reason}")
        if self.mode == "live" and not self.auth.allow_live:
            raise self.error(
                "live_mode_blocked",
                f"route {self.route!r} holds a live (real money) key but allow_live is false; "
                f"set routes[].auth.allow_live: true in the config to allow it",
            )
        return self._header

    def on_upstream_status(self, status: int) -> None:
        if status == 401:
            self.state = AuthState.CREDENTIAL_REJECTED
            self.reason = (
                f"AgentCard refused the {self.mode}-mode key (HTTP 401); {fix_hint(self.route, self.auth)}"
            )
        elif self.state is AuthState.CREDENTIAL_REJECTED and status < 400 and self._value:
            self.state = AuthState.READY
            self.reason = f"{self.mode}-mode key from {self.auth.key.describe()}"

    def invalidate(self) -> None:
        self._stale = True  # set-key or a reload: read the store before the next request
