"""Discovery: which authorization server guards a resource, and what its metadata says.

Owns: RFC 9728 protected-resource metadata (the resource names its authorization server), RFC
8414 / OpenID authorization-server metadata, and the checks SPEC.md puts on it: the issuer
matches, PKCE S256 is listed, and every endpoint is `https://` (plain `http://` only with
`allow_insecure_upstream`). Must never: follow a redirect to another metadata document, or
accept an endpoint that would receive credentials over plain HTTP without that setting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from authlib.oauth2.rfc8414 import AuthorizationServerMetadata, get_well_known_url

from broker.auth.oauth.transport import HTTP_TIMEOUT, OAuthError


@dataclass(frozen=True)
class ServerMetadata:
    """The checked endpoints of the authorization server for `resource`."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None
    revocation_endpoint: str | None
    resource: str
    iss_parameter_supported: bool = False  # RFC 9207: the callback must then carry `iss`
    # OAuth Client ID Metadata Documents: an https URL the broker serves may be its client_id
    client_id_metadata_document_supported: bool = False


def well_known_urls(base: str, suffix: str) -> list[str]:
    """RFC 8414 §3.1 / RFC 9728 §3.1: the path-inserted form first, then the root form."""
    p = urlsplit(base)
    path = p.path.rstrip("/")
    bases = [urlunsplit((p.scheme, p.netloc, path, "", ""))]
    if path:
        bases.append(urlunsplit((p.scheme, p.netloc, "", "", "")))
    return [str(get_well_known_url(b, external=True, suffix=suffix)) for b in bases]


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
    # authlib's validate_* methods insist on https; allow_insecure_upstream (tests, the local
    # sandbox) needs plain http on loopback, so the scheme is checked here
    if not isinstance(url, str) or not url:
        raise OAuthError(f"the authorization server metadata has no {what}")
    scheme = urlsplit(url).scheme
    if scheme != "https" and not (insecure_ok and scheme == "http"):
        raise OAuthError(f"the {what} is not https:// ({url}); refusing to send credentials there")
    return url


async def authorization_server_for(session: aiohttp.ClientSession, resource: str) -> str:
    """RFC 9728: the issuer the protected resource names; for servers that publish no
    protected-resource metadata, the resource's own origin."""
    issuer = await named_authorization_server(session, resource)
    if issuer is None:
        p = urlsplit(resource)
        return urlunsplit((p.scheme, p.netloc, "", "", ""))
    return issuer


async def named_authorization_server(session: aiohttp.ClientSession, resource: str) -> str | None:
    """The issuer the resource's RFC 9728 metadata names; None when there is no such document
    (or it cannot be fetched now: issuer binding then keeps the grant it has)."""
    for url in well_known_urls(resource, "oauth-protected-resource"):
        prm = await _get_json(session, url)
        if prm is not None:
            break
    else:
        return None
    servers = prm.get("authorization_servers") or []
    if not servers or not isinstance(servers[0], str):
        raise OAuthError("the protected-resource metadata names no authorization server")
    published = prm.get("resource")
    if isinstance(published, str) and published.rstrip("/") != resource.rstrip("/"):
        raise OAuthError(f"the protected-resource metadata is for {published}, not {resource}")
    return str(servers[0])


async def server_metadata(session: aiohttp.ClientSession, issuer: str) -> Any:
    """RFC 8414 §3: the issuer's metadata (an `AuthorizationServerMetadata`), trying the OpenID
    Connect Discovery locations after the OAuth ones. Unchecked."""
    for url in [
        *well_known_urls(issuer, "oauth-authorization-server"),
        *well_known_urls(issuer, "openid-configuration"),
        issuer.rstrip("/") + "/.well-known/openid-configuration",
    ]:
        doc = await _get_json(session, url)
        if doc is not None:
            return AuthorizationServerMetadata(doc)
    raise OAuthError(f"no authorization server metadata found for {issuer}")


async def discover(session: aiohttp.ClientSession, resource: str, insecure_ok: bool) -> ServerMetadata:
    """Find and check the authorization server for the protected resource `resource`."""
    issuer = await authorization_server_for(session, resource)
    _check_url(issuer, "issuer", insecure_ok)
    meta = await server_metadata(session, issuer)
    if str(meta.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise OAuthError(f"the metadata's issuer {meta.get('issuer')!r} does not match {issuer!r}")
    if "S256" not in (meta.code_challenge_methods_supported or []):
        raise OAuthError("the authorization server does not list PKCE S256; refusing to log in without it")

    def optional(name: str, what: str) -> str | None:
        url = meta.get(name)
        return _check_url(url, what, insecure_ok) if url else None

    return ServerMetadata(
        issuer=issuer,
        authorization_endpoint=_check_url(meta.authorization_endpoint, "authorization endpoint", insecure_ok),
        token_endpoint=_check_url(meta.token_endpoint, "token endpoint", insecure_ok),
        registration_endpoint=optional("registration_endpoint", "registration endpoint"),
        revocation_endpoint=optional("revocation_endpoint", "revocation endpoint"),
        resource=resource,
        iss_parameter_supported=bool(meta.get("authorization_response_iss_parameter_supported")),
        client_id_metadata_document_supported=meta.get("client_id_metadata_document_supported") is True,
    )
