"""`agentcard-broker login` / `logout`: the authorization code flow with PKCE, on the user's behalf.

Owns: the one-shot loopback callback listener on 127.0.0.1 (RFC 8252 §7.3), `state` (random,
single use, expiring), the `iss` check (RFC 9207), opening the browser without a shell and only
for an https URL on the discovered issuer, the page the user sees (escaped), reusing or redoing
the client registration, revocation on logout, and what the two commands say (`run_login`,
`run_logout`: the route they are given, the outcome in words). A redirect pasted back
(`--no-browser`, login_paste.py) is checked by the same listener; `--device` is device.py.
Must never: print or log a token, code or verifier; accept a callback it did not ask for.
"""

from __future__ import annotations

import asyncio
import html
import secrets as pysecrets
import time
import webbrowser
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri

from broker.auth import unknown_route_message
from broker.auth.oauth.discovery import ServerMetadata, discover
from broker.auth.oauth.login_paste import PasteReader
from broker.auth.oauth.registration import ClientRecord, pinned_client, redirect_uri_for, register_client
from broker.auth.oauth.revocation import revoke
from broker.auth.oauth.store import OAuthStore
from broker.auth.oauth.tokens import Pkce, TokenSet, parse_token_response, token_request
from broker.auth.oauth.transport import OAuthError, endpoint_session
from broker.auth.secret_store import SecretStore, SecretStoreError, open_store
from broker.config import Config, OAuthAuth, Route

CALLBACK_PATH = "/callback"


class LoginError(Exception):
    """The login (or logout) did not complete. The text is safe to print."""


@dataclass(frozen=True)
class LoginResult:
    issuer: str
    client_id: str
    tokens: TokenSet


# ---------------------------------------------------------------- the loopback callback


def _page(title: str, text: str, ok: bool) -> web.Response:
    color = "#1a7f37" if ok else "#b42318"
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>agentcard-broker</title></head>"
        "<body style='font-family: system-ui, sans-serif; max-width: 40em; margin: 4em auto'>"
        f"<h1 style='color: {color}'>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
        "<p>You can close this tab.</p></body></html>"
    )
    return web.Response(
        text=body,
        content_type="text/html",
        status=200 if ok else 400,
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "Referrer-Policy": "no-referrer",
        },
    )


class CallbackListener:
    """Listens on 127.0.0.1:PORT for exactly one valid redirect back from the browser."""

    def __init__(
        self, port: int, state: str, issuer: str, iss_required: bool, route: str, ttl: float
    ) -> None:
        self.port = port
        self._state = state
        self._issuer = issuer
        self._iss_required = iss_required
        self._route = route
        self._deadline = time.monotonic() + ttl
        self._result: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(CALLBACK_PATH, self._callback)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)  # the literal, never "localhost"
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise LoginError(
                f"cannot listen on 127.0.0.1:{self.port} for the login callback ({exc.strerror}); "
                "close what uses it or set auth.redirect_port"
            ) from None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait(self, seconds: float) -> str:
        try:
            return await asyncio.wait_for(asyncio.shield(self._result), seconds)
        except TimeoutError:
            raise LoginError(f"no answer from the browser within {seconds:g}s; run login again") from None

    async def _callback(self, request: web.Request) -> web.Response:
        return _page(*self.offer(request.query))

    def offer(self, q: Mapping[str, str], pasted: bool = False) -> tuple[str, str, bool]:
        """Check one authorization response (the callback's query, or a pasted URL's): the
        result is set when it is ours; the page's title, text and whether it went well."""
        if self._result.done():
            return "Already done", "This login has finished; nothing more to do.", False
        state = q.get("state", "")
        if not state or not pysecrets.compare_digest(state, self._state) or time.monotonic() > self._deadline:
            if pasted:  # the user's own paste: say so and end, nothing stored
                self._result.set_exception(
                    LoginError("the pasted URL is not from this login (state does not match); refused")
                )
            # not ours (or too late): refuse, and keep waiting for the real one
            return (
                "Not a login this broker started",
                f"The state does not match. Start again with: agentcard-broker login {self._route}",
                False,
            )
        iss = q.get("iss")
        if (iss is None and self._iss_required) or (
            iss is not None and iss.rstrip("/") != self._issuer.rstrip("/")
        ):
            self._result.set_exception(
                LoginError("the authorization response came from the wrong issuer (iss mismatch); refused")
            )
            return "Refused", "The answer did not come from the expected authorization server.", False
        if "error" in q:
            description = q.get("error_description", "")
            self._result.set_exception(
                LoginError(f"the authorization server said {q['error']}: {description}".rstrip(": "))
            )
            return "Login failed", f"{q['error']}: {description}", False
        code = q.get("code")
        if not code:
            self._result.set_exception(LoginError("the callback carried no authorization code"))
            return "Login failed", "No authorization code in the answer.", False
        self._result.set_result(code)
        return "Logged in", f"agentcard-broker now holds the login for route {self._route}.", True


# ---------------------------------------------------------------- the flow


def _may_open(url: str, meta: ServerMetadata) -> bool:
    """Only an https authorization URL on the discovered issuer's host is opened in a browser."""
    u, i = urlsplit(url), urlsplit(meta.issuer)
    return u.scheme == "https" and u.hostname == i.hostname


async def _client_unknown(http: aiohttp.ClientSession, url: str) -> bool:
    """Does the authorization endpoint reject our stored client_id outright?"""
    try:
        async with http.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status not in (400, 401):
                return False
            text = (await r.text()).lower()
    except (aiohttp.ClientError, TimeoutError):
        return False
    return "client" in text


async def _client_for(
    http: aiohttp.ClientSession,
    route: Route,
    auth: OAuthAuth,
    meta: ServerMetadata,
    ostore: OAuthStore,
    store: SecretStore,
    scope: str | None = None,
) -> tuple[ClientRecord, bool]:
    """The route's client: pinned, or the registration kept from before when it may ask for
    `scope`, or a new registration (for `scope`: a step-up's wider one)."""
    if auth.client_id:
        return pinned_client(route, auth, meta, store), False
    redirect_uri = redirect_uri_for(auth)
    stored = await asyncio.to_thread(ostore.load_client)
    registered_for = set(
        (stored.scope if stored and stored.scope is not None else " ".join(auth.scopes)).split()
    )
    covers = set((scope or "").split()) <= registered_for
    if stored and covers and stored.issuer == meta.issuer and stored.redirect_uri == redirect_uri:
        stored.resource = meta.resource
        stored.token_endpoint = meta.token_endpoint
        stored.authorization_endpoint = meta.authorization_endpoint
        stored.revocation_endpoint = meta.revocation_endpoint
        return stored, False
    wanted = tuple(dict.fromkeys([*auth.scopes, *(scope or "").split()]))
    client = await register_client(http, meta, redirect_uri, wanted)
    await asyncio.to_thread(ostore.save_client, client)
    return client, True


async def login(
    cfg: Config,
    route: Route,
    store: SecretStore,
    *,
    open_browser: bool,
    wait_s: float,
    say: Callable[[str], None],
    on_url: Callable[[str], None] | None = None,
    paste: bool = False,
) -> LoginResult:
    """The whole login. `on_url` is handed the authorization URL once the callback listener is
    up (the dashboard gives it to the browser that asked, rather than opening one here). With
    `paste`, a redirected URL pasted on standard input is accepted as the callback too."""
    auth = route.auth
    assert isinstance(auth, OAuthAuth)
    ostore = OAuthStore(route.name, store)
    async with endpoint_session() as http:
        say(f"discovering the authorization server for {route.upstream} …")
        try:
            meta = await discover(http, route.upstream, cfg.allow_insecure_upstream)
        except OAuthError as exc:
            raise LoginError(str(exc)) from None
        pastes = PasteReader(redirect_uri_for(auth), say) if paste else None
        for attempt in range(2):  # a registration the server forgot is dropped and redone once
            try:
                scope = await asyncio.to_thread(ostore.login_scope, auth.scopes)
                client, registered_now = await _client_for(http, route, auth, meta, ostore, store, scope)
            except OAuthError as exc:
                raise LoginError(str(exc)) from None
            pkce = Pkce.new()
            state = pysecrets.token_urlsafe(32)
            url = prepare_grant_uri(
                meta.authorization_endpoint,
                client.client_id,
                "code",
                redirect_uri=client.redirect_uri,
                scope=scope,
                state=state,
                code_challenge=pkce.challenge,
                code_challenge_method=pkce.method,
                resource=meta.resource,
            )
            if client.registered and not registered_now and await _client_unknown(http, url):
                say("the authorization server no longer knows this broker's registration; registering again")
                await asyncio.to_thread(ostore.drop_client)
                continue
            listener = CallbackListener(
                auth.redirect_port, state, meta.issuer, meta.iss_parameter_supported, route.name, wait_s
            )
            await listener.start()
            if pastes is not None:
                pastes.redirect_uri, pastes.listener = client.redirect_uri, listener
            if on_url is not None:
                on_url(url)
            try:
                say(f"open this URL in your browser to authorize route {route.name!r}:\n\n  {url}\n")
                if open_browser:
                    if _may_open(url, meta):
                        # webbrowser runs the browser as a program with arguments: no shell
                        await asyncio.to_thread(webbrowser.open, url)
                        say("(opened in your browser)")
                    else:
                        say("(not opened automatically: it is not an https URL on the issuer's host)")
                say(
                    f"waiting for the browser to come back to http://127.0.0.1:{auth.redirect_port}"
                    f"{CALLBACK_PATH} (up to {wait_s:g}s; Ctrl-C cancels) …"
                )
                if pastes is not None:
                    say(
                        "if the browser is on another machine, its last page fails to load: "
                        "paste its whole address here and press Enter"
                    )
                code = await listener.wait(wait_s)
            finally:
                await listener.stop()
            try:
                doc = await token_request(
                    http,
                    client,
                    "authorization_code",
                    code=code,
                    redirect_uri=client.redirect_uri,
                    code_verifier=pkce.verifier,
                )
                tokens = parse_token_response(doc, issuer=meta.issuer)
            except OAuthError as exc:
                if exc.error == "invalid_client" and client.registered and attempt == 0:
                    say("the authorization server refused this broker's registration; registering again")
                    await asyncio.to_thread(ostore.drop_client)
                    continue
                raise LoginError(f"exchanging the code failed: {exc}") from None
            await asyncio.to_thread(ostore.save_tokens, tokens)
            return LoginResult(meta.issuer, client.client_id, tokens)
    raise LoginError("the authorization server kept refusing the client registration")


async def logout(route: Route, store: SecretStore, say: Callable[[str], None]) -> bool:
    """Revoke at the upstream when it offers revocation, then delete the tokens. True if any existed."""
    ostore = OAuthStore(route.name, store)
    client = await asyncio.to_thread(ostore.load_client)
    tokens = await asyncio.to_thread(ostore.load_tokens)
    if tokens is None:
        return False
    if client is not None and not tokens.dead:
        async with endpoint_session() as http:
            if not client.revocation_endpoint:
                say("the authorization server offers no revocation; deleting the tokens here only")
            else:
                revoked = []
                if tokens.refresh_token and await revoke(http, client, tokens.refresh_token, "refresh_token"):
                    revoked.append("refresh token")
                if await revoke(http, client, tokens.access_token, "access_token"):
                    revoked.append("access token")
                say(f"revoked at {client.issuer}: {', '.join(revoked) or 'nothing (the server refused)'}")
    await asyncio.to_thread(ostore.drop_tokens)
    return True


# ---------------------------------------------------------------- the commands


def oauth_route(cfg: Config, name: str) -> Route:
    """The route `login` / `logout` was given. Raises LoginError unless it is an oauth route."""
    route = cfg.route(name)
    if route is None:
        raise LoginError(unknown_route_message(cfg, name))
    if not isinstance(route.auth, OAuthAuth):
        raise LoginError(f"route {route.name!r} uses {route.auth.type}, not oauth; nothing to log in")
    return route


def login_summary(route: Route, result: LoginResult) -> list[str]:
    """Who a finished login is, with what scopes, until when: no token value, only whether a
    refresh token came."""
    t = result.tokens
    who = t.subject or f"client {result.client_id}"
    expires = datetime.fromtimestamp(t.expires_at, UTC).isoformat() if t.expires_at else "no expiry given"
    return [
        f"logged in route {route.name!r} at {result.issuer} as {who}",
        f"scopes: {t.scope or '(none listed)'}; access token expires {expires}; refresh token: "
        f"{'yes' if t.refresh_token else 'no'}",
    ]


def run_login(
    cfg: Config,
    route_name: str,
    *,
    open_browser: bool,
    wait_s: float,
    say: Callable[[str], None],
    device: bool = False,
) -> list[str]:
    """`agentcard-broker login ROUTE [--no-browser] [--device]`: log the route in and return
    what to print; `say` tells the user what to do meanwhile. Without a browser to open, a
    redirected URL pasted on standard input is accepted too; `device` uses RFC 8628 instead.
    Raises LoginError, its text the whole line to print."""
    from broker.auth.oauth.device import DeviceError, device_login

    route = oauth_route(cfg, route_name)
    store = open_store(cfg.secret_store, cfg.state_path())
    try:
        if device:
            client, issuer, tokens = asyncio.run(device_login(cfg, route, store, say))
            result = LoginResult(issuer, client.client_id, tokens)
        else:
            paste = not open_browser
            flow = login(cfg, route, store, open_browser=open_browser, wait_s=wait_s, say=say, paste=paste)
            result = asyncio.run(flow)
    except (LoginError, DeviceError, SecretStoreError) as exc:
        raise LoginError(f"login failed: {exc}") from None
    return login_summary(route, result)


def run_logout(cfg: Config, route_name: str, say: Callable[[str], None]) -> str:
    """`agentcard-broker logout ROUTE`: revoke and forget the route's tokens; the line to print.
    Raises LoginError, its text the whole line to print."""
    route = oauth_route(cfg, route_name)
    store = open_store(cfg.secret_store, cfg.state_path())
    try:
        had = asyncio.run(logout(route, store, say))
    except SecretStoreError as exc:
        raise LoginError(f"logout failed: {exc}") from None
    return f"logged out route {route.name!r}" if had else f"route {route.name!r} was not logged in"
