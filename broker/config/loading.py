"""A config file on disk -> a checked `Config`, or a `ConfigError` listing every problem.

Owns: refusing a file that others could edit, reading it as UTF-8, and running it through
safe_yaml and checks, stamping the result with the file's version as it was before the read;
and, for a file that does not load, its listen addresses alone (`load_listen_only`).
Must never: report only the first problem, or touch the secret store.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from broker.config.checker import Checker
from broker.config.checks import DEFAULT_PORT, build_config, parse_listen
from broker.config.issues import ConfigError, ConfigIssue
from broker.config.locations import file_stamp
from broker.config.model import Config, Listen
from broker.config.safe_yaml import parse_yaml


def check_file_safety(path: Path) -> list[ConfigIssue]:
    """A config that others could edit would let them point our credentials elsewhere."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return [ConfigIssue("", "file not found")]
    except OSError as exc:
        return [ConfigIssue("", f"cannot read: {exc.strerror}")]
    problems = []
    if not stat.S_ISREG(st.st_mode):
        problems.append(ConfigIssue("", "not a regular file"))
    if st.st_mode & 0o022:
        problems.append(ConfigIssue("", f"is group- or world-writable; run: chmod go-w {path}"))
    if st.st_uid not in (os.getuid(), 0):  # root can rewrite anything anyway
        owner = f"is owned by uid {st.st_uid}, not by this user ({os.getuid()}) or root"
        problems.append(ConfigIssue("", owner))
    return problems


def load(path: Path) -> Config:
    """Read and check the config at `path`. Raises ConfigError listing every problem."""
    spath = str(path)
    stamp = file_stamp(spath)  # before reading: an edit racing the read is seen as a change
    issues = check_file_safety(path)
    if issues:
        raise ConfigError(spath, issues)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(spath, [ConfigIssue("", f"cannot read: {type(exc).__name__}")]) from None
    data, lines = parse_yaml(text, issues)
    if issues:
        raise ConfigError(spath, issues)
    cfg = build_config(data, lines, spath, issues)
    if cfg is None:
        raise ConfigError(spath, issues)
    return replace(cfg, stamp=stamp)


def load_listen_only(path: str) -> Config | None:
    """A Config holding only the `listen:` addresses of the file at `path`, which load() refused.

    A broken file must not hide a running daemon (it keeps serving its previous config), so
    `status` still needs to know where to ask. Nothing else of the file is checked, nor its
    safety: it only says where to connect, and nothing is bound or trusted. An address that
    does not parse is skipped (a remote one is kept); a file that cannot be read as YAML, or
    has no `listen:` list, gives the default address. None when no address is left.
    """
    items: Any = None
    try:
        if Path(path).is_file():  # never a FIFO or a device, which a read would wait on
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            items = raw.get("listen") if isinstance(raw, dict) else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass
    if isinstance(items, str):  # `listen: 127.0.0.1:9000`, which load() takes as a list of one
        items = [items]
    if not isinstance(items, list):
        items = [f"127.0.0.1:{DEFAULT_PORT}"]
    listens: list[Listen] = []
    for item in items:
        found = parse_listen(item, "listen", True, Checker({}, []))
        if found is not None:
            listens.append(found)
    if not listens:
        return None
    return Config(path=path, listen=tuple(listens), routes=())
