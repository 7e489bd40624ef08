"""A client for the running daemon's `/_broker/` endpoints: what the command line asks it.

Owns: reaching the daemon on the first listen address of a config (a TCP address or a unix
socket), with the Host header its guard admits, and reading the JSON it answers. Standard
library only and synchronous: a command asks one question and exits. Must never: send or print
a credential (these endpoints need none and show none), or raise because the daemon is not
running: "nothing answered" is an answer (None), as is an answer that is not the daemon's.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.config import Config, Listen


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix stream socket; `host` only names the request's Host."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class DaemonClient:
    """The daemon that `config` describes, asked over its first listen address.

    Each method returns the daemon's JSON answer, or None when nothing answers within `timeout`
    seconds, the answer is an HTTP error, or it is not a JSON object.
    """

    def __init__(self, config: Config, timeout: float = 3.0) -> None:
        self.config = config
        self.timeout = timeout

    @property
    def address(self) -> Listen:
        """Where the daemon is asked: the config's first listen address."""
        return self.config.listen[0]

    def status(self) -> dict[str, Any] | None:
        """`/_broker/status`: version, pid, listeners, config, and each route's state."""
        return self._request("GET", "/_broker/status")

    def reload(self) -> dict[str, Any] | None:
        """`/_broker/reload`: re-read config.yaml and the secret store before answering, so a
        `status` asked next shows a credential just stored."""
        return self._request("POST", "/_broker/reload")

    def _connection(self) -> tuple[http.client.HTTPConnection, str]:
        """A connection to the address and the Host header to send on it."""
        listen = self.address
        allowed = self.config.allowed_hosts
        if listen.kind == "unix":
            return _UnixHTTPConnection(listen.path, self.timeout), allowed[0] if allowed else "localhost"
        name = allowed[0] if allowed else listen.host
        conn = http.client.HTTPConnection(listen.host, listen.port, timeout=self.timeout)
        return conn, f"{name}:{listen.port}"

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        """An endpoint that decides something, asked with the admin key the running daemon wrote
        to the state dir. (status, JSON answer); (0, {}) when nothing answered or there is no key."""
        from broker.admin.access import HEADER, read_key

        key = read_key(self.config.state_path())
        if key is None:
            return 0, {}
        raw = json.dumps(body).encode() if body is not None else b""
        conn, host_header = self._connection()
        headers = {"Host": host_header, "Content-Length": str(len(raw)), HEADER: key}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=raw, headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
        except (OSError, http.client.HTTPException):
            return 0, {}
        finally:
            conn.close()
        try:
            doc = json.loads(answer)
        except ValueError:
            doc = {}
        return resp.status, doc if isinstance(doc, dict) else {}

    def _request(self, method: str, path: str) -> dict[str, Any] | None:
        conn, host_header = self._connection()
        try:
            conn.request(method, path, headers={"Host": host_header, "Content-Length": "0"})
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
        if resp.status >= 400:
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None
