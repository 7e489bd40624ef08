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

from broker.auth.oauth.transport import HTTP_TIMEOUT, OAuthError


@dataclass(frozen=True)
class ServerMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None
    revocation_endpoint: str | None
    resource: str
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
        iss_parameter_supported=bool(meta.get("authorization_response_iss_parameter_supported")),
    )
