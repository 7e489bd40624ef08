"""Who is on the other end of a connection: the peer's uid, so other users can be refused.

Owns: SO_PEERCRED (Linux) / LOCAL_PEERCRED (macOS) for unix sockets, and on Linux the owner of
a loopback TCP peer's socket, asked of the kernel with one sock_diag netlink query (falling
back to reading /proc/net/tcp(6)), once per connection. Must
never: guess. When the owner of a TCP peer cannot be found, the answer is "unknown", and the
caller refuses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import struct
import sys
import weakref
from pathlib import Path

UNKNOWN = -1
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


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_UID_OFFSET = 16 + 64  # nlmsghdr, then inet_diag_msg: 4 bytes, sockid (48), expires/rqueue/wqueue, uid


def _diag_request(local: tuple[str, int], peer: tuple[str, int], family: int, seq: int) -> bytes:
    """A sock_diag query, number `seq`, for the peer's socket: source the peer, destination us."""

    def addr(host: str) -> bytes:
        return socket.inet_pton(family, host.split("%", 1)[0]).ljust(16, b"\0")

    sockid = struct.pack("!HH", peer[1], local[1]) + addr(peer[0]) + addr(local[0])
    sockid += struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid
    return struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0) + req


def proc_uid(local: tuple[str, int], peer: tuple[str, int], family: int) -> int:
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


class PeerLookup:
    """Asks, once per connection, whose process is on the other end; keeps the answer as long
    as the connection lives. One netlink socket serves every lookup (a socket per connection
    was two more system calls); it is used only from the event loop."""

    def __init__(self) -> None:
        self._uids: weakref.WeakKeyDictionary[asyncio.BaseTransport, int] = weakref.WeakKeyDictionary()
        self._netlink: socket.socket | None = None
        self._seq = itertools.count(1)

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()
            self._netlink = None

    def known(self, transport: asyncio.BaseTransport) -> int | None:
        """The uid already looked up for this connection, if any."""
        return self._uids.get(transport)

    def peer_uid(self, transport: asyncio.BaseTransport | None) -> int | None:
        """The peer's uid; None when this OS offers no way to tell; UNKNOWN when lookup failed."""
        if transport is None:
            return UNKNOWN
        cached = self._uids.get(transport)
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
            uid = self.tcp_peer_uid(local[:2], peer[:2], sock.family) if local and peer else UNKNOWN
            if uid == UNKNOWN and peer and not _is_loopback(peer[0]):
                # no socket of this machine's owns the other end: a remote peer (`allow_remote`),
                # which no uid can describe; a local process on a non-loopback address is found
                uid = None
        else:
            uid = None
        if uid is not None:
            self._uids[transport] = uid
        return uid

    def tcp_peer_uid(self, local: tuple[str, int], peer: tuple[str, int], family: int) -> int:
        """The uid owning the peer's end of a loopback TCP connection (Linux), or UNKNOWN."""
        if family == socket.AF_INET6 and peer[0].startswith("::ffff:"):
            family, local, peer = socket.AF_INET, (local[0][7:], local[1]), (peer[0][7:], peer[1])
        try:
            return self.netlink_uid(local, peer, family)
        except OSError:
            # no AF_NETLINK here (a sandbox): read the table instead, slower with many sockets
            return proc_uid(local, peer, family)

    def netlink_uid(self, local: tuple[str, int], peer: tuple[str, int], family: int) -> int:
        """One socket's owner through sock_diag (what `ss` uses): microseconds, whatever the
        table size. Replies carry the query's number, so one left unread by a query that timed
        out is skipped."""
        seq = next(self._seq) & 0xFFFFFFFF
        msg = _diag_request(local, peer, family, seq)
        try:
            if self._netlink is None:
                self._netlink = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
                self._netlink.settimeout(1.0)
            self._netlink.send(msg)
            for _ in range(8):
                data = self._netlink.recv(65536)
                if len(data) >= 16 and struct.unpack_from("=I", data, 8)[0] == seq:
                    break
            else:
                return UNKNOWN
        except OSError:
            self.close()  # a fresh socket next time
            raise
        if len(data) < _UID_OFFSET + 4 or struct.unpack_from("=H", data, 4)[0] == NLMSG_ERROR:
            return UNKNOWN
        return int(struct.unpack_from("=I", data, _UID_OFFSET)[0])


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool((mapped or address).is_loopback)
