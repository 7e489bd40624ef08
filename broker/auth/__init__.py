"""Credentials: one long-lived object per route that answers "what header do I send?"."""

from __future__ import annotations

from broker.auth.base import AuthState, Credential
from broker.auth.secret_store import SecretStore
from broker.config import ApiKeyAuth, OAuthAuth, Route
from broker.scrub import SecretSet

__all__ = ["AuthState", "Credential", "make_credential"]


def make_credential(route: Route, store: SecretStore, secrets: SecretSet) -> Credential:
    """The credential object for `route`'s auth block."""
    if isinstance(route.auth, ApiKeyAuth):
        from broker.auth.api_key import ApiKeyCredential

        return ApiKeyCredential(route.name, route.auth, store, secrets)
    if isinstance(route.auth, OAuthAuth):
        from broker.auth.oauth.credential import OAuthCredential

        return OAuthCredential(route, route.auth, store, secrets)
    from broker.auth.client_credentials import ClientCredentialsCredential

    return ClientCredentialsCredential(route.name, route.auth, store, secrets)
