"""Credentials: one long-lived object per route that answers "what header do I send?".

Owns: building a route's credential from its auth block (`make_credential`), what `check`
finds for every route of a config (`check_credentials`), and what a command says when it is
given a route the config does not have. Must never: print, or let a secret
value into what it returns (each credential's `check()` keeps to that too).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.auth.base import AuthState, Credential
from broker.auth.secret_store import SecretStore, open_store
from broker.config import ApiKeyAuth, Config, OAuthAuth, Route
from broker.scrub import SecretSet

__all__ = [
    "AuthState",
    "Credential",
    "CredentialsCheck",
    "RouteCheck",
    "check_credentials",
    "make_credential",
    "unknown_route_message",
]


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


def unknown_route_message(cfg: Config, name: str) -> str:
    """What set-key, login and logout say when `cfg` has no route called `name`."""
    names = ", ".join(r.name for r in cfg.routes)
    return f"no route named {name!r} in {cfg.path} (routes: {names})"


@dataclass(frozen=True, slots=True)
class RouteCheck:
    """One route as `check` shows it: what its credential has stored, and what is wrong."""

    name: str
    prefix: str
    auth: str  # the auth type
    credential: str
    problem: str | None


@dataclass(frozen=True, slots=True)
class CredentialsCheck:
    """What `check` found for every route of a config."""

    secret_store: str  # the store's description
    routes: tuple[RouteCheck, ...]
    problems: tuple[str, ...]  # one per route with a problem, led by its place in the file


def check_credentials(cfg: Config) -> CredentialsCheck:
    """Ask each route's credential what is stored and what is wrong with it. No network;
    blocking, as it reads the secret store."""
    store = open_store(cfg.secret_store, cfg.state_path())
    secrets = SecretSet()  # the credentials built here are only asked what is stored
    routes: list[RouteCheck] = []
    problems: list[str] = []
    for r in cfg.routes:
        if isinstance(r.auth, OAuthAuth) and r.auth.per_user:
            # each end user connects through a link; there is nothing to log in to here
            routes.append(
                RouteCheck(r.name, r.prefix, "oauth per user", "end users' grants in the state store", None)
            )
            continue
        found = make_credential(r, store, secrets).check()
        routes.append(RouteCheck(r.name, r.prefix, r.auth.type, found.stored, found.problem))
        if found.problem:
            place = f"{r.place}.auth"
            line = cfg.line_of(place) or cfg.line_of(r.place) or "?"
            problems.append(f"{cfg.path}:{line}: {place}: route {r.name!r}: {found.problem}")
    return CredentialsCheck(store.description, tuple(routes), tuple(problems))
