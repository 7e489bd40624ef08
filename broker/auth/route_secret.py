"""`set-key`: the secret a route takes, whether a value is one, storing it, what to tell the user.

Owns: which secret a route's auth block names (an API key, or a client secret under its own
account) and refusing a route whose secret lives outside the secret store (`env:`, `file:`) or
that has none; the checks on a value before it is stored (not empty, no whitespace, an API key
shaped `sk_test_...` / `sk_live_...`); and the lines the command prints, warnings included.
Must never: put the value into a line, an error or a log event; store a value that failed a
check; read the terminal or print (the command line reads the value and prints the lines).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from broker.auth import unknown_route_message
from broker.auth.api_key import key_mode
from broker.auth.secret_store import SecretStoreError, client_secret_account, open_store
from broker.config import ApiKeyAuth, Config, Route, SecretRef

ReadSecret = Callable[[str], str]  # the prompt -> the value as typed or piped in


@dataclass(frozen=True, slots=True)
class OutputLine:
    text: str
    to_stderr: bool = False


class RouteSecretError(Exception):
    """Nothing was stored. The message is the line to print on stderr, after `printed_before`
    (what was said before the store refused the value)."""

    def __init__(self, message: str, printed_before: tuple[OutputLine, ...] = ()) -> None:
        super().__init__(message)
        self.printed_before = printed_before


@dataclass(frozen=True, slots=True)
class _SecretSlot:
    """Where `set-key ROUTE` puts its value."""

    ref: SecretRef
    account: str
    what: str  # "API key" | "client secret": how the lines name it


def _slot_of(route: Route) -> _SecretSlot:
    auth = route.auth
    if isinstance(auth, ApiKeyAuth):
        return _SecretSlot(auth.key, route.name, "API key")
    if auth.client_secret is None:
        raise RouteSecretError(f"route {route.name!r} ({auth.type}) has no secret to store; it uses `login`")
    return _SecretSlot(auth.client_secret, client_secret_account(route.name), "client secret")


def _api_key_mode(value: str) -> str:
    mode = key_mode(value)
    if mode is None or len(value) <= len("sk_test_"):
        raise RouteSecretError(
            "that is not an AgentCard API key (it must start with sk_test_ or sk_live_); nothing stored"
        )
    return mode


STORE_TARGET = "store"  # `set-key store`: the Redis password of `store:` (when no route is named so)
STORE_PASSWORD_ACCOUNT = "store:redis_password"


def _set_store_password(cfg: Config, read_secret: ReadSecret) -> list[OutputLine]:
    redis = cfg.redis
    if redis is None:
        raise RouteSecretError(
            f"no route named 'store', and `store:` in {cfg.path} is not Redis; `set-key store` keeps "
            "the password of a `store: {url: redis://…, password: keyring}`"
        )
    if redis.password is None or redis.password.kind != "keyring":
        where = redis.password.describe() if redis.password is not None else "nowhere (no `password:`)"
        raise RouteSecretError(
            f"`store:` reads its Redis password from {where}, not the secret store; set "
            "`store.password: keyring` to use set-key"
        )
    value = read_secret("Redis password for `store:` (input hidden): ").strip()
    if not value:
        raise RouteSecretError("no password given; nothing stored")
    store = open_store(cfg.secret_store, cfg.state_path())
    try:
        store.set(STORE_PASSWORD_ACCOUNT, value)
    except SecretStoreError as exc:
        raise RouteSecretError(f"could not store the Redis password: {exc}") from None
    return [OutputLine(f"stored the Redis password of `store:` in {store.description}")]


def set_route_secret(cfg: Config, route_name: str, read_secret: ReadSecret) -> list[OutputLine]:
    """Store the API key or client secret of route `route_name` in the config's secret store.

    The value is asked for with `read_secret(prompt)` only once the route is known to take one
    from the store; leading and trailing whitespace is not part of it. Returns the lines to
    print; raises RouteSecretError when nothing was stored.
    """
    route = cfg.route(route_name)
    if route is None and route_name == STORE_TARGET:
        return _set_store_password(cfg, read_secret)
    if route is None:
        raise RouteSecretError(unknown_route_message(cfg, route_name))
    slot = _slot_of(route)
    what = slot.what
    if slot.ref.kind != "keyring":
        raise RouteSecretError(
            f"route {route.name!r} reads its {what} from {slot.ref.describe()}, not the secret store; "
            f"change {route.place}.auth to `keyring` to use set-key"
        )
    value = read_secret(f"{what} for route {route.name!r} (input hidden): ").strip()
    if not value:
        raise RouteSecretError(f"no {what} given; nothing stored")
    if any(ch.isspace() for ch in value):
        raise RouteSecretError(f"the {what} contains whitespace; nothing stored")
    said: list[OutputLine] = []
    auth = route.auth
    mode = _api_key_mode(value) if isinstance(auth, ApiKeyAuth) else None
    if mode is None and not value.startswith("acs_"):
        said.append(OutputLine("note: AgentCard client secrets usually start with acs_", to_stderr=True))
    store = open_store(cfg.secret_store, cfg.state_path())
    if cfg.secret_store == "file":
        where = f"the secret goes into {store.description}, not the OS keyring"
        said.append(OutputLine(f"warning: secret_store is `file`: {where}"))
    try:
        store.set(slot.account, value)
    except SecretStoreError as exc:
        raise RouteSecretError(f"could not store the {what}: {exc}", tuple(said)) from None
    if mode is None:
        said.append(OutputLine(f"stored the {what} for route {route.name!r} in {store.description}"))
        return said
    said.append(OutputLine(f"stored a {mode}-mode API key for route {route.name!r} in {store.description}"))
    if mode == "live" and isinstance(auth, ApiKeyAuth) and not auth.allow_live:
        said.append(
            OutputLine(
                f"warning: this is a live (real money) key and route {route.name!r} has allow_live: false; "
                f"requests will be refused until you set {route.place}.auth.allow_live: true",
                to_stderr=True,
            )
        )
    return said
