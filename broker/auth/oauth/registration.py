"""Which OAuth client the broker is for a route, in this order (SPEC "OAuth client"): a
`client_id` pinned in the config; a Client ID Metadata Document (the client_id is the https URL
of a document the broker serves under `public_url`) when the server supports those; else RFC
7591 dynamic registration, kept and reused by the callers.

Owns: `ClientRecord` (a client id, a confidential client's secret, and the endpoints it is used
at), RFC 7591 dynamic registration as a public client (PKCE, no secret; `application_type`
"native" for the loopback redirect of `login`, "web" for a per-user route's public callback), the
metadata document and its URL, a `client_id` pinned in the config with a confidential client's
secret read from its reference, and the loopback redirect URI (a per-user route passes its
`public_url` callback instead). Must never: put a client secret in an error; register a redirect
URI other than the literal 127.0.0.1 loopback or, for a per-user route, the callback under the
configured `public_url`; offer a metadata document URL that is not https (but with
`allow_insecure_upstream`, for tests).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from broker.auth.oauth.discovery import ServerMetadata
from broker.auth.oauth.transport import HTTP_TIMEOUT, OAuthError
from broker.auth.secret_store import SecretStore, client_secret_account, resolve
from broker.config import OAuthAuth, Route


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
    # the scope it was registered with (RFC 7591 `scope`): a server may refuse a login asking for
    # more (oidc-provider does), so a login after a step-up registers again. None: not recorded
    # (a registration kept by an earlier version, or a pinned client)
    scope: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ClientRecord:
        return cls(**json.loads(text))


CLIENT_DOCUMENT_PATH = "/_broker/oauth/client.json"


def redirect_uri_for(auth: OAuthAuth) -> str:
    return f"http://127.0.0.1:{auth.redirect_port}/callback"


def client_document_url(public_url: str) -> str:
    return public_url.rstrip("/") + CLIENT_DOCUMENT_PATH


def client_document(public_url: str, redirect_uri: str) -> dict[str, Any]:
    """The Client ID Metadata Document served at client_document_url(public_url): the broker
    as a public web client whose one redirect URI is the per-user callback."""
    return {
        "client_id": client_document_url(public_url),
        "client_name": "agentcard-broker",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "application_type": "web",
    }


def metadata_document_client(
    meta: ServerMetadata, public_url: str, redirect_uri: str, insecure_ok: bool
) -> ClientRecord | None:
    """The client whose id is the broker's metadata document URL, when the server supports such
    documents and `public_url` is https (or plain http with allow_insecure_upstream); else None."""
    if not meta.client_id_metadata_document_supported or not public_url:
        return None
    scheme = urlsplit(public_url).scheme
    if scheme != "https" and not (insecure_ok and scheme == "http"):
        return None
    return _client_at(meta, client_document_url(public_url), None, redirect_uri, registered=False)


async def register_client(
    session: aiohttp.ClientSession,
    meta: ServerMetadata,
    redirect_uri: str,
    scopes: tuple[str, ...],
    application_type: str = "native",
    extra_grant_types: tuple[str, ...] = (),
) -> ClientRecord:
    """RFC 7591 dynamic registration as a public client (PKCE, no secret). `application_type`
    (OpenID registration, MCP SEP-837): "native" for the loopback redirect of `login`, "web" for
    a redirect URI on a public host (a per-user route's callback).
    `extra_grant_types`: e.g. the device grant (RFC 8628) for `login --device`."""
    if not meta.registration_endpoint:
        raise OAuthError("the server offers no dynamic client registration; set auth.client_id in the config")
    body: dict[str, Any] = {
        "client_name": "agentcard-broker",
        "redirect_uris": [redirect_uri],
        "grant_types": ["authorization_code", "refresh_token", *extra_grant_types],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    if scopes:
        body["scope"] = " ".join(scopes)
    body["application_type"] = application_type
    try:
        async with session.post(
            meta.registration_endpoint, json=body, allow_redirects=False, timeout=HTTP_TIMEOUT
        ) as r:
            doc = await r.json(content_type=None)
            if r.status not in (200, 201) or not isinstance(doc, dict) or not doc.get("client_id"):
                raise OAuthError(f"client registration failed: HTTP {r.status}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise OAuthError(f"client registration failed: {type(exc).__name__}") from None
    secret = str(doc["client_secret"]) if doc.get("client_secret") else None
    record = _client_at(meta, str(doc["client_id"]), secret, redirect_uri, registered=True)
    record.scope = str(doc["scope"]) if isinstance(doc.get("scope"), str) else " ".join(scopes)
    return record


def pinned_client(
    route: Route, auth: OAuthAuth, meta: ServerMetadata, store: SecretStore, redirect_uri: str | None = None
) -> ClientRecord:
    """A client_id from the config (+ a confidential client's secret from its reference), used
    with `redirect_uri` (default: the loopback one `login` listens on)."""
    assert auth.client_id is not None
    secret = None
    if auth.client_secret is not None:
        found = resolve(auth.client_secret, client_secret_account(route.name), store)
        if found.value is None:
            raise OAuthError(
                f"the client secret is missing: {found.reason}; run: agentcard-broker set-key {route.name}"
            )
        secret = found.value
    return _client_at(meta, auth.client_id, secret, redirect_uri or redirect_uri_for(auth), registered=False)


def _client_at(
    meta: ServerMetadata, client_id: str, secret: str | None, redirect_uri: str, *, registered: bool
) -> ClientRecord:
    """A client of the authorization server `meta` describes, with its endpoints."""
    return ClientRecord(
        client_id=client_id,
        client_secret=secret,
        issuer=meta.issuer,
        authorization_endpoint=meta.authorization_endpoint,
        token_endpoint=meta.token_endpoint,
        revocation_endpoint=meta.revocation_endpoint,
        registration_endpoint=meta.registration_endpoint,
        resource=meta.resource,
        redirect_uri=redirect_uri,
        registered=registered,
    )
