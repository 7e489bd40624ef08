"""The Credential interface: a thing you ask for a valid header.

Owns: the auth states SPEC.md names, the contract every credential keeps, and what a credential
tells `check` about itself (`CredentialCheck`). Callers never see how a header is made (keyring
reads, refreshes, caches). Must never: put a secret value into
`reason`, an exception, or anything else that leaves this object except the header itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.hooks import AnswerFactory

from broker.errors import BrokerError


class AuthState(StrEnum):
    READY = "ready"
    NEEDS_LOGIN = "needs_login"
    NO_CREDENTIAL = "no_credential"
    REFRESHING = "refreshing"
    CREDENTIAL_REJECTED = "credential_rejected"


@dataclass(frozen=True, slots=True)
class CredentialCheck:
    """What `check` found for a route without the network: what is stored, and what is wrong
    with it (naming the command that fixes it), or None when nothing is."""

    stored: str
    problem: str | None = None


class Credential(ABC):
    """Per-route credential. Lives across config reloads while the route's auth is unchanged."""

    can_refresh = False  # True: an upstream 401 is answered by one refresh and one retry
    has_mode = True  # False: the credential cannot tell test from live (OAuth tokens)

    def __init__(self, route: str) -> None:
        self.route = route
        self.state = AuthState.NO_CREDENTIAL
        self.reason = ""  # why the state is what it is; safe to show anyone
        self.mode: str | None = None  # "test" | "live" | None
        self.expires_at: datetime | None = None

    @abstractmethod
    async def authorization(self) -> dict[str, str]:
        """Headers to add to the upstream request. Raises BrokerError when there are none."""

    @abstractmethod
    def check(self) -> CredentialCheck:
        """What is stored for this route and its problem, read now (blocking: it reads the
        secret store). No network, nothing printed, and the state above is left as it is."""

    def ready_authorization(self) -> dict[str, str] | None:
        """The headers at once when nothing needs reading or refreshing first; else None, and
        authorization() is awaited. The hot path's shortcut: no coroutine per request."""
        return None

    async def retry_after_rejection(self, used: dict[str, str]) -> bool:
        """The upstream answered 401 to `used`. Refresh if possible; True when a retry makes sense."""
        return False

    async def step_up(self, scopes: frozenset[str]) -> BrokerError | None:
        """The upstream answered 403 insufficient_scope asking for `scopes` (RFC 6750 §3.1): the
        error the agent gets instead (naming the fix), or None to pass the 403 on as it is."""
        return None

    def details(self) -> dict[str, Any]:
        """Extra, secret-free fields for `status` (scopes, subject, refresh count)."""
        return {}

    async def prepare(self) -> None:
        """Read what the credential needs from the store, if not read recently (no network)."""
        return None

    def on_upstream_status(self, status: int) -> None:
        """Learn from the upstream's answer: a 401 means the credential was refused."""
        return None

    def answer_mask(self) -> AnswerFactory | None:
        """Secrets of this credential alone to mask in its answers, beside the daemon's secret
        set (a per-user route's end-user tokens: one set per user, so the cost of scrubbing an
        answer does not grow with the users). None: none of its own."""
        return None

    def invalidate(self) -> None:
        """Forget cached values so the next request reads the store again (after set-key)."""
        return None

    async def close(self) -> None:
        """Release resources when the route goes away."""
        return None

    def error(self, code: str, message: str) -> BrokerError:
        return BrokerError(code, message, self.route)
