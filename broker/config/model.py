"""The config snapshot: frozen dataclasses that the rest of the broker reads.

Owns: the shape of a checked config (routes, their auth and policy, listeners, limits,
timeouts, logging) and its defaults. Must never: check or parse anything (checks.py builds
these from the file), hold a secret value (a `SecretRef` says only where one lives), or
change after it is built (a reload builds a new snapshot).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from broker.config.locations import state_dir

DEFAULT_REDIRECT_PORT = 8766
DEFAULT_ALLOWED_HOSTS = ("127.0.0.1", "localhost", "[::1]")
DEFAULT_REDIS_PREFIX = "agentcard-broker"
DEFAULT_AMOUNT_FIELDS = ("amount_cents", "spend_limit_cents", "amountCents", "spendLimitCents")


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret lives: the secret store, an environment variable, or a 0600 file."""

    kind: Literal["keyring", "env", "file"]
    name: str = ""  # env variable name or file path; "" for keyring

    def describe(self) -> str:
        if self.kind == "keyring":
            return "keyring"
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class ApiKeyAuth:
    key: SecretRef = SecretRef("keyring")
    allow_live: bool = False
    type: Literal["api_key"] = "api_key"


@dataclass(frozen=True, slots=True)
class OAuthAuth:
    client_id: str | None = None
    client_secret: SecretRef | None = None
    scopes: tuple[str, ...] = ()
    redirect_port: int = DEFAULT_REDIRECT_PORT
    type: Literal["oauth"] = "oauth"
    # per_user: one grant per end user of a chat platform (SPEC "Per-user routes"), the user
    # named by `user_header` on requests from an authenticated platform client
    per_user: bool = False
    user_header: str = "X-User-ID"
    user_label_header: str | None = None  # shown on the connect page (an email, a display name)


@dataclass(frozen=True, slots=True)
class ClientCredentialsAuth:
    token_url: str
    client_id: str
    client_secret: SecretRef = SecretRef("keyring")
    scopes: tuple[str, ...] = ()
    type: Literal["client_credentials"] = "client_credentials"


Auth = ApiKeyAuth | OAuthAuth | ClientCredentialsAuth


@dataclass(frozen=True, slots=True)
class PathRule:
    """`METHOD /glob`: `*` is one path segment, `**` any number; METHOD may be `*`."""

    method: str
    segments: tuple[str, ...]
    text: str


@dataclass(frozen=True, slots=True)
class Window:
    amount: int
    seconds: float
    text: str  # as written, e.g. "24h"


@dataclass(frozen=True, slots=True)
class ApprovePolicy:
    """`policy.approve`: the calls held until a person decides (SPEC "Approvals")."""

    above_cents: int | None = None  # a call spending more than this
    tools: frozenset[str] = frozenset()  # MCP tools/call by name
    requests: tuple[PathRule, ...] = ()  # REST calls by "METHOD /glob" on the forwarded path
    wait_s: float = 120.0  # then approval_timeout
    wait_text: str = "120s"
    require_passkey: bool = False  # approving needs the dashboard's passkey

    @property
    def reads_body(self) -> bool:
        return self.above_cents is not None or bool(self.tools)


CARD_DATA = ("allow", "redact", "approve")


@dataclass(frozen=True, slots=True)
class Policy:
    allow: tuple[PathRule, ...] | None = None  # None: everything not denied
    deny: tuple[PathRule, ...] = ()
    tools_allow: frozenset[str] | None = None
    tools_deny: frozenset[str] = frozenset()
    max_amount_cents: int | None = None
    amount_fields: tuple[str, ...] = DEFAULT_AMOUNT_FIELDS
    budget: Window | None = None  # amount_cents per window
    rate: Window | None = None  # requests per window
    require_test_mode: bool = False
    approve: ApprovePolicy | None = None
    card_data: Literal["allow", "redact", "approve"] = "allow"  # card numbers, CVV, expiry in answers

    @property
    def reads_body(self) -> bool:
        """Rules that can only be checked by reading a JSON body."""
        return (
            self.max_amount_cents is not None
            or self.budget is not None
            or self.tools_allow is not None
            or bool(self.tools_deny)
            or self.require_test_mode
            or (self.approve is not None and self.approve.reads_body)
            or self.card_data == "approve"
        )


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    prefix: str
    upstream: str
    auth: Auth
    place: str = ""  # "routes[1]": where this route sits in the file
    policy: Policy | None = None


@dataclass(frozen=True, slots=True)
class Listen:
    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Limits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_header_bytes: int = 32 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    first_byte: float = 60.0
    idle: float = 300.0
    drain: float = 30.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: Literal["auto", "console", "json"] = "auto"
    audit: bool = True


@dataclass(frozen=True, slots=True)
class PlatformClient:
    """A chat platform's backend allowed on per-user routes; its token is kept (hashed) in the store."""

    name: str


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """`store: redis://…` (or its mapping form): the state store shared by broker replicas."""

    url: str  # redis:// or rediss:// (TLS), host, port and db; never a password (refused in the URL)
    password: SecretRef | None = None  # keyring: account `store:redis_password`
    username: str | None = None  # a Redis 6 ACL user, when not `default`
    ca_file: str | None = None  # rediss://: trust this CA bundle too (beside the system's)
    master_key: SecretRef | None = None  # None or keyring: `store:master_key` in the secret store
    prefix: str = DEFAULT_REDIS_PREFIX  # every key starts with `prefix:`; several brokers on one Redis

    def where(self) -> str:
        """The URL as shown in status and errors (it never holds a password)."""
        return self.url


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    listen: tuple[Listen, ...]
    routes: tuple[Route, ...]
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    allowed_origins: tuple[str, ...] = ()
    allowed_uids: tuple[int, ...] = ()
    allow_remote: bool = False
    allow_insecure_upstream: bool = False
    secret_store: Literal["keyring", "file"] = "keyring"
    public_url: str | None = None  # where end users' browsers reach the broker (connect pages, callback)
    store: Literal["sqlite", "redis"] = "sqlite"  # per-user state: a file in the state dir, or Redis
    redis: RedisSettings | None = None  # set exactly when store is "redis"
    clients: tuple[PlatformClient, ...] = ()  # platform backends allowed on per-user routes
    state_dir: str = ""  # "" = the platform's user state dir
    socket_mode: int = 0o600  # unix listeners; 0o660 for the system-user setup (group access)
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    log: LogConfig = field(default_factory=LogConfig)
    lines: dict[str, int] = field(default_factory=dict, compare=False, hash=False, repr=False)
    # the file's version as it was before load() read it (None when not loaded from a file): an
    # edit made after that is a change to apply, however soon it came
    stamp: tuple[int, int, int] | None = field(default=None, compare=False, hash=False, repr=False)

    def state_path(self) -> Path:
        """Where the daemon keeps state (file secret store, budgets): config or platform default."""
        return Path(self.state_dir) if self.state_dir else state_dir()

    def line_of(self, place: str) -> int | None:
        return self.lines.get(place)

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)
