"""Who may change things through `/_broker/`: the owner's command line, never an agent.

Agents reach the same listener as the command line, so an endpoint that decides something (an
approval, a dashboard link) needs proof an agent does not have: the admin key, 256 random bits
the daemon writes at start to a 0600 file in the state dir (`admin.key`, its directory 0700) and
the command line reads and sends as `X-Broker-Admin`. An agent speaking HTTP cannot read the
file; one with a shell as the user can, which is what `require_passkey` is for.

Owns: making, writing, reading and checking that key (constant time). Must never: log it, put it
in an answer or an error, or accept a key from a file others can read.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from broker.errors import BrokerError

FILE_NAME = "admin.key"
HEADER = "X-Broker-Admin"


def key_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def write_new_key(state_dir: Path) -> str:
    """A fresh key, written 0600 (replacing the last daemon's): returned to the daemon only."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_urlsafe(32)
    path = key_path(state_dir)
    tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, key.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def read_key(state_dir: Path) -> str | None:
    """The running daemon's key, for the command line; None when there is none it may use."""
    path = key_path(state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077 or st.st_uid != os.getuid():
            return None
        return os.read(fd, 256).decode("ascii", "replace").strip() or None
    finally:
        os.close(fd)


class AdminKey:
    """The daemon's admin key, checked on every endpoint that decides something."""

    def __init__(self, key: str) -> None:
        self._key = key.encode("ascii")

    def __repr__(self) -> str:
        return "AdminKey(...)"

    def allows(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode("utf-8", "replace"), self._key)

    def require(self, presented: str | None, what: str) -> None:
        """Raise 403 unless `presented` is the key. The message says how a person does `what`."""
        if not self.allows(presented):
            raise BrokerError(
                "admin_required",
                f"{what} is for the broker's owner: use `agentcard-broker` on this machine, or the "
                "dashboard (`agentcard-broker dashboard`)",
            )
