"""config.yaml -> an immutable `Config` snapshot: the names the rest of the broker imports.

Owns: nothing of its own; it re-exports the package's public names so that callers write
`from broker.config import Config, load`. Must never: hold logic, or import a name that no
caller uses.
"""

from broker.config.checks import (
    DEFAULT_AMOUNT_FIELDS,
    ApiKeyAuth,
    ClientCredentialsAuth,
    Config,
    ConfigError,
    ConfigIssue,
    Listen,
    OAuthAuth,
    PathRule,
    Policy,
    Route,
    SecretRef,
    _Checker,
    file_stamp,
    find_config,
    load,
    parse_listen,
    state_dir,
)

__all__ = [
    "DEFAULT_AMOUNT_FIELDS",
    "ApiKeyAuth",
    "ClientCredentialsAuth",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "Listen",
    "OAuthAuth",
    "PathRule",
    "Policy",
    "Route",
    "SecretRef",
    "_Checker",
    "file_stamp",
    "find_config",
    "load",
    "parse_listen",
    "state_dir",
]
