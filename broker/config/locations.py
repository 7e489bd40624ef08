"""Where the config file and the daemon's state live, and how to tell one version of a file.

Owns: the order in which the config is looked for (--config, $AGENTCARD_BROKER_CONFIG, the
platform's user config dir, the working directory), the platform's user state dir, and the
stamp that tells whether a file changed. Must never: read or check a config's content.
"""

from __future__ import annotations

import os
from pathlib import Path

from broker.config.issues import ConfigError, ConfigIssue

APP_NAME = "agentcard-broker"
CONFIG_ENV = "AGENTCARD_BROKER_CONFIG"


def candidate_paths() -> list[Path]:
    """Where the config is looked for when --config is not given, in order."""
    import platformdirs

    found: list[Path] = []
    env = os.environ.get(CONFIG_ENV)
    if env:
        found.append(Path(env).expanduser())
    found.append(Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / "config.yaml")
    found.append(Path.cwd() / "config.yaml")
    return found


def find_config(explicit: str | None) -> Path:
    """The config path to use. Raises ConfigError naming every place looked at."""
    if explicit:
        return Path(explicit).expanduser()
    paths = candidate_paths()
    if os.environ.get(CONFIG_ENV):
        return paths[0]  # an explicit environment choice is never silently skipped
    for p in paths:
        if p.exists():
            return p
    looked = ", ".join(str(p) for p in paths)
    raise ConfigError(
        str(paths[-1]),
        [
            ConfigIssue(
                "",
                f"no config file found (looked in: {looked}); pass --config PATH or copy "
                "the example config.yaml from the project to one of those places",
            )
        ],
    )


def state_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir(APP_NAME, appauthor=False))


def file_stamp(path: str) -> tuple[int, int, int] | None:
    """What identifies one version of a file: inode, mtime, size (a rename-save changes the inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)
