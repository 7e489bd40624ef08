"""What an OAuth route keeps in the secret store: its client record and its tokens.

Owns: the two accounts of a route (`ROUTE:oauth_client`, `ROUTE:oauth_tokens`), their JSON
forms, and reading an unreadable entry as absent (a new login replaces it). Calls block: callers
on the event loop run them in a thread. Must never: write a token or a client secret anywhere
but the secret store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from broker.auth.oauth.registration import ClientRecord
from broker.auth.oauth.tokens import TokenSet, scope_union
from broker.auth.secret_store import SecretStore

_T = TypeVar("_T")


class OAuthStore:
    """The route's client record and tokens in the secret store (blocking calls)."""

    def __init__(self, route: str, store: SecretStore) -> None:
        self._store = store
        self._client_account = f"{route}:oauth_client"
        self._tokens_account = f"{route}:oauth_tokens"

    def _load(self, account: str, parse: Callable[[str], _T]) -> _T | None:
        raw = self._store.get(account)
        if not raw:
            return None
        try:
            return parse(raw)
        except (ValueError, TypeError):  # unreadable: as if absent, a new login replaces it
            return None

    def load_client(self) -> ClientRecord | None:
        return self._load(self._client_account, ClientRecord.from_json)

    def save_client(self, client: ClientRecord) -> None:
        self._store.set(self._client_account, client.to_json())

    def drop_client(self) -> None:
        self._store.delete(self._client_account)

    def load_tokens(self) -> TokenSet | None:
        return self._load(self._tokens_account, TokenSet.from_json)

    def login_scope(self, configured: tuple[str, ...]) -> str | None:
        """The scope a new login asks for: the configured scopes and those a step-up asked for."""
        tokens = self.load_tokens()
        wanted = tokens.wanted_scope.split() if tokens is not None else []
        return scope_union(configured, wanted) or None

    def save_tokens(self, tokens: TokenSet) -> None:
        self._store.set(self._tokens_account, tokens.to_json())

    def drop_tokens(self) -> bool:
        return self._store.delete(self._tokens_account)
