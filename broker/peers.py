"""Who is on the other end of a connection: the peer's uid, so other users can be refused.

Owns: SO_PEERCRED (Linux) / LOCAL_PEERCRED (macOS) for unix sockets, and on Linux the
/proc/net/tcp(6) lookup of a loopback TCP peer's socket owner, cached per connection. Must
never: guess. When the owner of a TCP peer cannot be found, the answer is "unknown", and the
caller refuses.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import weakref
from pathlib import Path

UNKNOWN = -1
_cache: weakref.WeakKeyDictionary[asyncio.BaseTransport, int] = weakref.WeakKeyDictionary()
PROC_TCP_READABLE = sys.platform.startswith("linux") and Path("/proc/net/tcp").exists()


def _unix_peer_uid(sock: socket.socket) -> int | None:
    if sys.platform.startswith("linux"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[1])
    local_peercred = getattr(socket, "LOCAL_PEERCRED", None)
    if local_peercred is not None:  # macOS/BSD: struct xucred {u_int version; uid_t uid; ...}
        creds = sock.getsockopt(0, local_peercred, 76)
        return int(struct.unpack_from("2I", creds)[1])
    return None


def _hex_v4(host: str, port: int) -> str:
    packed = socket.inet_pton(socket.AF_INET, host)
    return f"{struct.unpack('<I', packed)[0]:08X}:{port:04X}"


def _hex_v6(host: str, port: int) -> str:
    packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
    words = struct.unpack("=4I", packed)  # /proc prints each 32-bit word in host byte order
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def tcp_peer_uid(local: tuple[str, int], peer: tuple[str, int], family: int) -> int:
    """The uid owning the peer's end of a loopback TCP connection (Linux), or UNKNOWN."""
    if family == socket.AF_INET6 and peer[0].startswith("::ffff:"):
        family, local, peer = socket.AF_INET, (local[0][7:], local[1]), (peer[0][7:], peer[1])
    fmt = _hex_v4 if family == socket.AF_INET else _hex_v6
    table = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
    # the peer's socket: its local address is the peer, its remote address is us
    needle = f"{fmt(*peer)} {fmt(*local)}"
    try:
        text = Path(table).read_text()
    except OSError:
        return UNKNOWN
    at = text.find(needle)
    if at == -1:
        return UNKNOWN
    fields = text[at : text.find("\n", at)].split()
    # local rem st tx:rx tr:when retrnsmt uid
    return int(fields[6]) if len(fields) > 6 and fields[6].isdigit() else UNKNOWN


def peer_uid(transport: asyncio.BaseTransport | None) -> int | None:
    """The peer's uid; None when this OS offers no way to tell; UNKNOWN when lookup failed."""
    if transport is None:
        return UNKNOWN
    cached = _cache.get(transport)
    if cached is not None:
        return cached
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is None:
        return UNKNOWN
    uid: int | None
    if sock.family == socket.AF_UNIX:
        uid = _unix_peer_uid(sock)
    elif PROC_TCP_READABLE and sock.family in (socket.AF_INET, socket.AF_INET6):
        local = transport.get_extra_info("sockname")
        peer = transport.get_extra_info("peername")
        uid = tcp_peer_uid(local[:2], peer[:2], sock.family) if local and peer else UNKNOWN
    else:
        uid = None
    if uid is not None:
        _cache[transport] = uid
    return uid
