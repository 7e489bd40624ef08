"""OAuth 2.1 for an MCP upstream, one module per step, named after what each RFC calls it.

    transport      the one kind of session for OAuth endpoints, OAuthError, RFC 6749 error codes
    discovery      RFC 9728 protected-resource and RFC 8414 authorization-server metadata
    registration   a pinned client, a Client ID Metadata Document, or RFC 7591 registration
    tokens         RFC 6749 token requests with RFC 7636 PKCE; TokenSet and its expiry
    revocation     RFC 7009
    challenge      WWW-Authenticate challenges (RFC 9110 §11.6.1); step-up (RFC 6750 §3.1)
    store          what a route keeps in the secret store (client record, tokens)
    credential     OAuthCredential: the daemon's header for a route, refreshed as needed
    login_flow     `login` / `logout`: the browser and the loopback callback (RFC 8252)

Owns: the package's public names, re-exported below. Must never: hold logic of its own.
"""

from __future__ import annotations

from broker.auth.oauth.credential import OAuthCredential
from broker.auth.oauth.discovery import ServerMetadata, discover
from broker.auth.oauth.login_flow import (
    LoginError,
    LoginResult,
    login,
    login_summary,
    logout,
    oauth_route,
    run_login,
    run_logout,
)
from broker.auth.oauth.registration import ClientRecord, pinned_client, redirect_uri_for, register_client
from broker.auth.oauth.revocation import revoke
from broker.auth.oauth.store import OAuthStore
from broker.auth.oauth.tokens import MAX_SKEW_S, Pkce, TokenSet, parse_token_response, token_request
from broker.auth.oauth.transport import HTTP_TIMEOUT, OAuthError, endpoint_session, error_code

__all__ = [
    "HTTP_TIMEOUT",
    "MAX_SKEW_S",
    "ClientRecord",
    "LoginError",
    "LoginResult",
    "OAuthCredential",
    "OAuthError",
    "OAuthStore",
    "Pkce",
    "ServerMetadata",
    "TokenSet",
    "discover",
    "endpoint_session",
    "error_code",
    "login",
    "login_summary",
    "logout",
    "oauth_route",
    "parse_token_response",
    "pinned_client",
    "redirect_uri_for",
    "register_client",
    "revoke",
    "run_login",
    "run_logout",
    "token_request",
]
