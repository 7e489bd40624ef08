"""config.yaml -> an immutable `Config` snapshot: the names the rest of the broker imports.

The package, layer by layer (each imports only those above it):
  issues.py     ConfigIssue / ConfigError: a problem named by its place and line
  locations.py  where the config and the state live (platformdirs), a file's version stamp
  model.py      the frozen dataclasses of the snapshot
  safe_yaml.py  YAML text -> plain values, with the line of every place
  checker.py    typed reads of plain values that turn each problem into an issue
  checks.py     plain values -> the model, checking every rule of SPEC.md "Config file"
  per_user.py   the keys of SPEC.md "Per-user routes" (public_url, store, clients, user headers),
                which checks.py calls
  loading.py    the file on disk -> Config: file safety, read, parse, check (or, for a file
                that does not load, its listen addresses alone)

Owns: nothing of its own; it re-exports the public names so that callers write
`from broker.config import Config, load`. Must never: hold logic.
"""

from broker.config.checker import Checker
from broker.config.checks import parse_listen
from broker.config.issues import ConfigError, ConfigIssue
from broker.config.loading import load, load_listen_only
from broker.config.locations import file_stamp, find_config, state_dir
from broker.config.model import (
    DEFAULT_AMOUNT_FIELDS,
    ApiKeyAuth,
    Auth,
    ClientCredentialsAuth,
    Config,
    Limits,
    Listen,
    LogConfig,
    OAuthAuth,
    PathRule,
    PlatformClient,
    Policy,
    RedisSettings,
    Route,
    SecretRef,
    Timeouts,
    Window,
)

__all__ = [
    "DEFAULT_AMOUNT_FIELDS",
    "ApiKeyAuth",
    "Auth",
    "Checker",
    "ClientCredentialsAuth",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Limits",
    "Listen",
    "LogConfig",
    "OAuthAuth",
    "PathRule",
    "PlatformClient",
    "Policy",
    "RedisSettings",
    "Route",
    "SecretRef",
    "Timeouts",
    "Window",
    "file_stamp",
    "find_config",
    "load",
    "load_listen_only",
    "parse_listen",
    "state_dir",
]
