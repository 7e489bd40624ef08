"""Peer uids of loopback TCP connections: the netlink query and the /proc fallback agree."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from broker.service import peers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_both_lookups_find_this_process(family: int, host: str) -> None:
    try:
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.bind((host, 0))
    except OSError:
        pytest.skip(f"no {host} here")
    srv.listen()
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect(srv.getsockname()[:2])
    conn, _ = srv.accept()
    try:
        local, peer = conn.getsockname()[:2], conn.getpeername()[:2]
        lookup = peers.PeerLookup()
        assert lookup.netlink_uid(local, peer, family) == os.getuid()
        assert peers.proc_uid(local, peer, family) == os.getuid()
        assert lookup.tcp_peer_uid(local, peer, family) == os.getuid()
        # a connection that does not exist is unknown, never someone's
        ghost = (peer[0], 1)
        assert lookup.netlink_uid(local, ghost, family) == peers.UNKNOWN
        assert peers.proc_uid(local, ghost, family) == peers.UNKNOWN
        lookup.close()
    finally:
        for s in (conn, client, srv):
            s.close()


def test_netlink_socket_is_reused_and_skips_a_stale_reply() -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.connect(srv.getsockname())
    conn, _ = srv.accept()
    try:
        local, peer = conn.getsockname(), conn.getpeername()
        lookup = peers.PeerLookup()
        assert lookup.netlink_uid(local, peer, socket.AF_INET) == os.getuid()
        nl = lookup._netlink
        assert nl is not None
        # a reply nobody read (a query that timed out) waits in the socket: an error for a ghost
        nl.send(peers._diag_request(local, (peer[0], 1), socket.AF_INET, seq=0))
        assert lookup.netlink_uid(local, peer, socket.AF_INET) == os.getuid()  # not the ghost's
        assert lookup._netlink is nl  # one socket for every lookup, not one per connection
        lookup.close()
    finally:
        for s in (conn, client, srv):
            s.close()


class _SeenFrom:
    """A real accepted socket's transport facts, with the peer address another host would have:
    what the broker sees of a connection that came through the network (`allow_remote`)."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.sock, self.peer = sock, peer

    def get_extra_info(self, name: str) -> object:
        return {"socket": self.sock, "sockname": self.sock.getsockname(), "peername": self.peer}.get(name)


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (("192.0.2.7", 40000), None),  # another host: no uid can describe it, none is refused
        (("2001:db8::7", 40000), None),
        (("127.0.0.1", 1), peers.UNKNOWN),  # a loopback peer nobody owns: refused as unknown
        (("::1", 1), peers.UNKNOWN),
    ],
)
def test_a_remote_peer_has_no_uid_but_an_unowned_loopback_one_is_unknown(
    peer: tuple[str, int], expected: int | None
) -> None:
    family = socket.AF_INET6 if ":" in peer[0] else socket.AF_INET
    srv = socket.socket(family, socket.SOCK_STREAM)
    srv.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    try:
        lookup = peers.PeerLookup()
        assert lookup.peer_uid(_SeenFrom(srv, peer)) == expected  # type: ignore[arg-type]
        lookup.close()
    finally:
        srv.close()
