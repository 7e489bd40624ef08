"""`login --device`: the device authorization grant (RFC 8628), for a machine with no browser.

Owns: finding the server's `device_authorization_endpoint` (a clear error naming --no-browser
when there is none), the device authorization request (client_id, scope, RFC 8707 resource),
what the user is told (the verification URI, the complete one, the user code), and polling the
token endpoint at `interval` (5 s unless told): `authorization_pending` keeps polling,
`slow_down` adds 5 s, `access_denied` / `expired_token` / `expires_in` end it. A registered
client the server does not allow the device grant is registered again with it. Must never:
print or log the device code or a token; poll faster than the server allows.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from broker.auth.oauth.discovery import ServerMetadata, _check_url, discover, server_metadata
from broker.auth.oauth.registration import ClientRecord, pinned_client, redirect_uri_for, register_client
from broker.auth.oauth.store import OAuthStore
from broker.auth.oauth.tokens import parse_token_response, token_request
from broker.auth.oauth.transport import HTTP_TIMEOUT, OAuthError, endpoint_session, error_code
from broker.auth.secret_store import SecretStore
from broker.config import Config, OAuthAuth, Route

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL_S = 5.0  # RFC 8628 §3.2
SLOW_DOWN_S = 5.0  # RFC 8628 §3.5
RE_REGISTER_ON = ("unauthorized_client", "invalid_client", "invalid_request")


class DeviceError(Exception):
    """The device login did not complete. The text is safe to print."""


async def _authorize_device(
    http: aiohttp.ClientSession, endpoint: str, client: ClientRecord, scopes: tuple[str, ...]
) -> dict[str, Any]:
    """RFC 8628 §3.1-3.2: the device authorization request and its checked answer."""
    form = {"client_id": client.client_id, "resource": client.resource}
    if scopes:
        form["scope"] = " ".join(scopes)
    if client.client_secret:
        form["client_secret"] = client.client_secret
    try:
        async with http.post(endpoint, data=form, allow_redirects=False, timeout=HTTP_TIMEOUT) as r:
            try:
                doc = await r.json(content_type=None)
            except ValueError:
                doc = None
            if r.status != 200 or not isinstance(doc, dict):
                error = error_code(doc)
                raise OAuthError(
                    f"the device authorization endpoint answered HTTP {r.status} {error}".strip(), error
                )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise OAuthError(f"cannot reach the device authorization endpoint: {type(exc).__name__}") from None
    for name in ("device_code", "user_code", "verification_uri"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise OAuthError(f"the device authorization answer has no {name}")
    return doc


async def _client(
    http: aiohttp.ClientSession, route: Route, auth: OAuthAuth, meta: ServerMetadata, ostore: OAuthStore,
    store: SecretStore, fresh: bool,
) -> ClientRecord:  # fmt: skip
    if auth.client_id:
        return pinned_client(route, auth, meta, store)
    stored = None if fresh else await asyncio.to_thread(ostore.load_client)
    if stored and stored.issuer == meta.issuer:
        stored.resource, stored.token_endpoint = meta.resource, meta.token_endpoint
        return stored
    client = await register_client(
        http, meta, redirect_uri_for(auth), auth.scopes, extra_grant_types=(DEVICE_GRANT,)
    )
    await asyncio.to_thread(ostore.save_client, client)
    return client


async def device_login(
    cfg: Config, route: Route, store: SecretStore, say: Callable[[str], None]
) -> tuple[ClientRecord, str, Any]:
    """The whole device login: (client, issuer, TokenSet), the tokens stored."""
    auth = route.auth
    assert isinstance(auth, OAuthAuth)
    ostore = OAuthStore(route.name, store)
    async with endpoint_session() as http:
        try:
            say(f"discovering the authorization server for {route.upstream} …")
            meta = await discover(http, route.upstream, cfg.allow_insecure_upstream)
            endpoint = (await server_metadata(http, meta.issuer)).get("device_authorization_endpoint")
            if not endpoint:
                raise DeviceError(
                    f"{meta.issuer} offers no device authorization (RFC 8628); "
                    f"use: agentcard-broker login {route.name} --no-browser"
                )
            endpoint = _check_url(endpoint, "device authorization endpoint", cfg.allow_insecure_upstream)
            client = await _client(http, route, auth, meta, ostore, store, fresh=False)
            try:
                doc = await _authorize_device(http, endpoint, client, auth.scopes)
            except OAuthError as exc:
                # servers differ: unauthorized_client (RFC 6749 §5.2), invalid_request (oidc-provider)
                if not (client.registered and exc.error in RE_REGISTER_ON):
                    raise
                say("this broker's registration does not allow the device grant; registering again")
                client = await _client(http, route, auth, meta, ostore, store, fresh=True)
                doc = await _authorize_device(http, endpoint, client, auth.scopes)
        except OAuthError as exc:
            raise DeviceError(str(exc)) from None
        say(f"on any device, open {doc['verification_uri']} and enter the code:\n\n  {doc['user_code']}\n")
        if isinstance(doc.get("verification_uri_complete"), str):
            say(f"(or open {doc['verification_uri_complete']} , the code filled in)")
        tokens = await _poll(http, client, str(doc["device_code"]), doc, say)
    await asyncio.to_thread(ostore.save_tokens, tokens)
    return client, meta.issuer, tokens


def _number(doc: dict[str, Any], name: str, default: float) -> float:
    value = doc.get(name)
    return float(value) if isinstance(value, int | float) and value > 0 else default


async def _poll(
    http: aiohttp.ClientSession, client: ClientRecord, device_code: str, doc: dict[str, Any],
    say: Callable[[str], None],
) -> Any:  # fmt: skip
    """RFC 8628 §3.4-3.5: poll the token endpoint until approved, denied or expired."""
    interval = _number(doc, "interval", DEFAULT_INTERVAL_S)
    expires_in = _number(doc, "expires_in", 600.0)
    deadline = time.monotonic() + expires_in
    say(f"waiting for the approval (checking every {interval:g}s, up to {expires_in:g}s; Ctrl-C cancels) …")
    while True:
        await asyncio.sleep(interval)
        if time.monotonic() > deadline:
            raise DeviceError("the code expired before it was approved; run login --device again")
        try:
            answer = await token_request(http, client, DEVICE_GRANT, device_code=device_code)
            return parse_token_response(answer)
        except OAuthError as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval += SLOW_DOWN_S
                say(f"the authorization server asked to slow down; checking every {interval:g}s")
                continue
            if exc.error == "access_denied":
                raise DeviceError(
                    "the login was denied at the authorization server (access_denied)"
                ) from None
            if exc.error == "expired_token":
                raise DeviceError(
                    "the code expired before it was approved; run login --device again"
                ) from None
            raise DeviceError(f"the device login failed: {exc}") from None
