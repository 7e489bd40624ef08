"""The systemd notification protocol (sd_notify(3)): READY=1, STOPPING=1, WATCHDOG=1, STATUS=.

Owns: sending datagrams to $NOTIFY_SOCKET (path or abstract `@name`) and the watchdog interval
from $WATCHDOG_USEC. A no-op when not started by systemd. Must never: raise into the daemon (a
lost notification must not take serving down), or send anything but the fields it is given.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if addr.startswith("@"):
            self._address = b"\0" + addr[1:].encode()
        elif addr.startswith("/"):
            self._address = addr
        self.watchdog_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send `KEY=value` lines, e.g. send(READY=1, STATUS="serving"). True when delivered."""
        if self._address is None:
            return False
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self._address)
                s.sendall(payload)
        except OSError:
            return False
        return True
