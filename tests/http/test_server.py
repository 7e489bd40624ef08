"""The agents' side of the daemon (broker/http/server.py, agent_messages.py), spoken to in raw
bytes over real sockets.

What a hand-written HTTP/1.1 server must get right: framing (Content-Length, chunked, and the
ambiguous or unsupported framings refused), keep-alive and pipelining, HTTP/1.0, an unread body
never read as the next request, head limits, idle connections closed, and the answers' own framing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from typing import cast

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.http import framing, listener
from broker.http import server as agents
from broker.http.agent_messages import DateHeader
from tests.conftest import (
    TEST_KEY,
    Broker,
    BrokerFactory,
    Upstream,
    api_config,
    assert_no_secret,
    sse_events,
    store_key,
)

Answer = tuple[int, dict[str, str], bytes, str]  # status, headers (lower-case names), body, version


async def read_answer(reader: asyncio.StreamReader, head_request: bool = False) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ")[0], int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice"
            headers[name.lower()] = value.strip()
    body = b""
    if head_request or status in (204, 304):
        return status, headers, body, version
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 5))[:-2], 16)
            if size == 0:
                assert await asyncio.wait_for(reader.readuntil(b"\r\n"), 5) == b"\r\n"
                break
            body += await asyncio.wait_for(reader.readexactly(size + 2), 5)
            body = body[:-2]
    elif "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    else:
        body = await asyncio.wait_for(reader.read(), 5)  # close-delimited
    return status, headers, body, version


async def closed(reader: asyncio.StreamReader) -> bool:
    """True when the broker closed the connection (EOF or reset) within a second."""
    try:
        return await asyncio.wait_for(reader.read(1), 1.0) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def connect(b: Broker) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", b.port)


def get(b: Broker, path: str, extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: 127.0.0.1:{b.port}\r\n{extra}\r\n".encode()


async def test_pipelined_requests_answered_in_order_on_one_connection(
    broker: Broker, upstream: Upstream
) -> None:
    reader, writer = await connect(broker)
    body = b'{"n": 2}'
    post = f"POST /two HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\nContent-Length: {len(body)}\r\n\r\n"
    writer.write(get(broker, "/one") + post.encode() + body + get(broker, "/three"))
    answers = [await read_answer(reader) for _ in range(3)]
    assert [json.loads(a[2])["path"] for a in answers] == ["/one", "/two", "/three"]
    assert [a[0] for a in answers] == [200, 200, 200]
    assert [(s.method, s.raw_path, s.body) for s in upstream.seen] == [
        ("GET", "/one", b""),
        ("POST", "/two", body),
        ("GET", "/three", b""),
    ]
    assert not await closed(reader)  # HTTP/1.1: kept alive
    writer.close()


async def test_chunked_request_body_is_forwarded_whole(broker: Broker, upstream: Upstream) -> None:
    reader, writer = await connect(broker)
    writer.write(
        f"POST /up HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"5;ext=1\r\nhello\r\n"
    )
    await asyncio.sleep(0.05)  # the rest comes later, in pieces split inside the framing
    for piece in (b"1", b"\r\n ", b"\r", b"\nA\r\n0123456789", b"\r\n0\r\nX-Trailer: t\r\n\r\n"):
        writer.write(piece)
        await asyncio.sleep(0.01)
    status, _, _, _ = await read_answer(reader)
    assert status == 200
    assert upstream.seen[-1].body == b"hello 0123456789"
    writer.write(get(broker, "/after"))  # the framing ended exactly: the connection serves again
    assert json.loads((await read_answer(reader))[2])["path"] == "/after"
    writer.close()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        ("POST /x HTTP/1.1\r\nHOST\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        ("POST /x HTTP/1.1\r\nHOST\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        ("POST /x HTTP/1.1\r\nHOST\r\nTransfer-Encoding: identity\r\n\r\n", 501),
        ("POST /x HTTP/1.1\r\nHOST\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        ("POST /x HTTP/1.1\r\nHOST\r\nContent-Length: -1\r\n\r\n", 400),
        ("POST /x HTTP/1.1\r\nHOST\r\nContent-Length: 0x10\r\n\r\n", 400),
        ("GET /x HTTP/1.1\r\nHOST\r\nX-Folded: a\r\n b\r\n\r\n", 400),
        ("GET /x HTTP/1.1\r\nHOST\r\nX-Space : a\r\n\r\n", 400),
        ("GET /x HTTP/1.1\r\nHOST\r\nX-Bare: a\nX-Other: b\r\n\r\n", 400),
        ("GET /x HTTP/1.1\r\nHOST\r\nX-Nul: a\x00b\r\n\r\n", 400),
        ("GET /x HTTP/2.0\r\nHOST\r\n\r\n", 400),
        ("G(ET /x HTTP/1.1\r\nHOST\r\n\r\n", 400),
        ("POST /x HTTP/1.1\r\nHOST\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        ("POST /x HTTP/1.1\r\nHOST\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n0\r\n\r\n", 400),
    ],
)
async def test_unreadable_requests_refused_and_connection_closed(
    broker: Broker, upstream: Upstream, head: str, status: int
) -> None:
    reader, writer = await connect(broker)
    writer.write(head.replace("HOST", f"Host: 127.0.0.1:{broker.port}").encode() + get(broker, "/smuggled"))
    got, headers, body, _ = await read_answer(reader)
    assert got == status
    assert headers["x-broker-error"] == "bad_request"
    assert json.loads(body)["error"]["code"] == "bad_request"
    assert await closed(reader)  # nothing after an unreadable request is trusted
    assert not any(s.raw_path == "/smuggled" for s in upstream.seen)
    assert not any(s.method == "POST" for s in upstream.seen)
    writer.close()


async def test_head_over_the_limit_is_431_and_closed(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url, limits={"max_header_bytes": 2048}))
    reader, writer = await connect(b)
    writer.write(get(b, "/x", "X-Big: " + "z" * (2048 + framing.REQUEST_LINE_MAX) + "\r\n"))
    status, headers, _, _ = await read_answer(reader)
    assert (status, headers["x-broker-error"]) == (431, "request_too_large")
    assert await closed(reader)
    assert upstream.seen == []
    writer.close()


async def test_unread_body_is_never_read_as_the_next_request(broker: Broker, upstream: Upstream) -> None:
    # refused before its body is read (wrong Host), while most of the body is still to come: what
    # comes after the answer is that body, crafted to look like a request of its own
    smuggled = get(broker, "/smuggled")
    padding = b"x" * 64
    reader, writer = await connect(broker)
    head = f"POST /x HTTP/1.1\r\nHost: evil.example\r\nContent-Length: {len(padding) + len(smuggled)}\r\n\r\n"
    writer.write(head.encode() + padding)
    status, headers, _, _ = await read_answer(reader)
    assert (status, headers["x-broker-error"]) == (403, "host_not_allowed")
    with contextlib.suppress(ConnectionError):
        writer.write(smuggled)
        await writer.drain()
    assert await closed(reader)  # the connection ended with the answer: no second answer
    await asyncio.sleep(0.1)
    assert not any(s.raw_path == "/smuggled" for s in upstream.seen)
    writer.close()


async def test_http10_answers_in_10_and_closes_unless_asked(broker: Broker, upstream: Upstream) -> None:
    reader, writer = await connect(broker)
    writer.write(get(broker, "/a", version="1.0"))
    status, headers, body, version = await read_answer(reader)
    assert (status, version) == (200, "HTTP/1.0")
    assert headers["connection"] == "close"
    assert json.loads(body)["path"] == "/a"
    assert await closed(reader)
    writer.close()

    reader, writer = await connect(broker)
    writer.write(get(broker, "/b", "Connection: keep-alive\r\n", version="1.0"))
    status, headers, _, version = await read_answer(reader)
    assert (status, version, headers["connection"]) == (200, "HTTP/1.0", "keep-alive")
    writer.write(get(broker, "/c", "Connection: keep-alive\r\n", version="1.0"))
    assert json.loads((await read_answer(reader))[2])["path"] == "/c"
    writer.close()


async def test_streamed_answer_to_http10_is_close_delimited(broker: Broker, upstream: Upstream) -> None:
    # not whole when the head arrives (0.05 s between events): streamed to the agent
    upstream.handlers["/events"] = sse_events([f"data: {i}\n\n".encode() for i in range(3)], gap=0.05)
    for version in ("1.0", "1.1"):
        reader, writer = await connect(broker)
        writer.write(get(broker, "/events", version=version))
        status, headers, body, _ = await read_answer(reader)
        assert status == 200
        assert body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
        if version == "1.0":
            assert "transfer-encoding" not in headers and headers["connection"] == "close"
        else:
            assert headers["transfer-encoding"] == "chunked"
            assert not await closed(reader)
        writer.close()


async def test_connection_close_is_honoured(broker: Broker, upstream: Upstream) -> None:
    reader, writer = await connect(broker)
    writer.write(get(broker, "/a", "Connection: close\r\n") + get(broker, "/not-read"))
    status, headers, _, _ = await read_answer(reader)
    assert (status, headers["connection"]) == (200, "close")
    assert await closed(reader)
    assert [s.raw_path for s in upstream.seen] == ["/a"]
    writer.close()


async def test_head_and_no_body_answers_carry_no_body(broker: Broker, upstream: Upstream) -> None:
    async def empty(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    upstream.handlers["/empty"] = empty
    reader, writer = await connect(broker)
    writer.write(
        f"HEAD /_broker/health HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\n\r\n".encode()
        + get(broker, "/empty")
        + get(broker, "/after")
    )
    status, headers, _, _ = await read_answer(reader, head_request=True)
    assert status == 200 and int(headers["content-length"]) > 0  # the length a GET would have
    status, headers, _, _ = await read_answer(reader)
    assert status == 204 and "content-length" not in headers and "transfer-encoding" not in headers
    # had a body been written after either, this would read it as a status line
    assert json.loads((await read_answer(reader))[2])["path"] == "/after"
    writer.close()


async def test_idle_connections_are_closed(
    make_broker: BrokerFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "KEEPALIVE_S", 0.3)
    monkeypatch.setattr(listener, "SWEEP_S", 0.1)
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url))
    reader, writer = await connect(b)
    writer.write(get(b, "/a"))
    assert (await read_answer(reader))[0] == 200
    idle_reader, idle_writer = await connect(b)
    idle_writer.write(b"GET /never-finished HTTP/1.1\r\n")  # a head that never completes
    await asyncio.sleep(0.8)
    assert await closed(reader)
    status, headers, _, _ = await read_answer(idle_reader)  # a half-sent head is told why
    assert (status, headers["x-broker-error"]) == (408, "request_timeout")
    assert await closed(idle_reader)
    writer.close()
    idle_writer.close()


async def test_answers_carry_no_server_header_and_no_secret(broker: Broker, upstream: Upstream) -> None:
    reader, writer = await connect(broker)
    writer.write(get(broker, "/_broker/status"))
    status, headers, body, _ = await read_answer(reader)
    assert status == 200
    assert "server" not in headers  # the broker does not advertise what it runs on
    assert "date" in headers
    assert_no_secret(body)
    writer.close()


# ---------------------------------------------------------------- the parser alone, on any input


class _Transport(asyncio.Transport):
    """Where a connection under test writes: kept in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class _Clock:
    """The one thing of a loop a connection asks before it answers: the time."""

    def time(self) -> float:
        return 0.0


class _Reader(agents.AgentConnection):
    """A connection whose requests are collected instead of answered."""

    def __init__(self) -> None:
        server = listener.AgentServer.__new__(listener.AgentServer)
        server.connections = set()
        server.on_connect = None
        server.date = DateHeader()
        server._max_header_bytes = lambda: 32768
        server.loop = cast(asyncio.AbstractEventLoop, _Clock())
        super().__init__(server)
        self.got: list[agents.Request] = []
        self.connection_made(_Transport())

    def _start(self, req: agents.Request) -> None:
        self.got.append(req)
        self._request = req


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_head_parses_or_is_refused_cleanly(head: bytes) -> None:
    conn = _Reader()
    transport = cast(_Transport, conn.transport)
    conn.data_received(head)
    if not conn.got:
        # refused (answered 4xx/5xx with the broker's error header, then closed) or still incomplete
        if transport.out:
            assert transport.out.split(b" ", 2)[1][:1] in (b"4", b"5")
            assert b"X-Broker-Error: " in transport.out
            assert transport.closed
        return
    req = conn.got[0]
    # what parsed is one request line and clean fields: no line breaks or NUL smuggled through
    assert req.method in framing.FORWARDED_METHODS
    assert req.raw_path.startswith("/") and "#" not in req.raw_path
    assert all(0x21 <= ord(c) <= 0x7E for c in req.raw_path)
    for name, value in req.raw_headers:
        assert not set("\r\n\x00") & set(name + value)


_chunked = st.lists(st.binary(min_size=1, max_size=40), max_size=6)


@settings(max_examples=300, deadline=None)
@given(_chunked, st.lists(st.integers(min_value=1, max_value=17), min_size=1, max_size=20))
def test_chunked_body_any_split_gives_the_same_bytes(parts: list[bytes], cuts: list[int]) -> None:
    head = b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"".join(b"%x;e=1\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\nT: 1\r\n\r\n"
    wire = head + body + b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
    conn = _Reader()
    pos, i = 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        i += 1
        conn.data_received(wire[pos : pos + step])
        pos += step
    first = conn.got[0]
    assert first.content.done
    assert b"".join(first.content._parts) == b"".join(parts)
    # what follows the body is the next request, read whole, waiting its turn
    assert [r.raw_path for r in conn._waiting] == ["/next"]
    assert conn.transport is not None and not cast(_Transport, conn.transport).out


async def test_a_pipelined_request_at_the_head_limit_still_gets_its_body(
    broker: Broker, upstream: Upstream
) -> None:
    # reading pauses while a long pipelined head waits its turn; when that request's body is
    # wanted, reading must resume (it once stayed paused, and the request hung)
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.json_response({"slow": True})

    upstream.handlers["/slow"] = slow
    reader, writer = await connect(broker)
    writer.write(get(broker, "/slow"))
    await asyncio.sleep(0.05)
    # forwarded, so its body is wanted once its turn comes; its fields fill limits.max_header_bytes
    fields = [("Host", f"127.0.0.1:{broker.port}"), ("Content-Type", "application/json")]
    fields.append(("Content-Length", "5"))
    room = broker.daemon.server.max_fields() - sum(len(k) + len(v) + 4 for k, v in fields)
    while room > 0:
        name = f"X-Pad-{len(fields)}"
        take = room - len(name) - 4
        value = "a" * (4000 if take > 4100 else take)  # the last one takes exactly what is left
        fields.append((name, value))
        room -= len(name) + len(value) + 4
    assert room == 0
    head = "POST /echo?" + "q" * 4000 + " HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields)
    writer.write(head.encode() + b"\r\n")
    await asyncio.sleep(0.05)
    writer.write(b"{}   ")
    assert json.loads((await read_answer(reader))[2]) == {"slow": True}
    status, _, _, _ = await read_answer(reader)
    assert status == 200
    assert [s.body for s in upstream.seen] == [b"", b"{}   "]
    writer.close()


async def test_an_agent_not_reading_its_answers_gets_no_more_queued(
    broker: Broker, upstream: Upstream
) -> None:
    big = b"x" * 200_000

    async def large(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big)

    upstream.handlers["/big"] = large
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", broker.port))
    await loop.sock_sendall(sock, get(broker, "/big") * 300)  # ~60 MB of answers, never read
    most = 0
    for _ in range(30):
        await asyncio.sleep(0.05)
        for conn in broker.daemon.server.connections:
            if conn.transport is not None:
                most = max(most, conn.transport.get_write_buffer_size())
    sock.close()
    assert 0 < most < 2_000_000  # about one answer waits, not all of them (57 MB once)
    assert len(upstream.seen) < 50


async def test_a_half_close_after_the_request_still_gets_the_answer(
    broker: Broker, upstream: Upstream
) -> None:
    reader, writer = await connect(broker)
    writer.write(get(broker, "/one"))
    writer.write_eof()  # `nc -N`, some HTTP/1.0 clients: all sent, now waiting for the answer
    status, headers, body, _ = await read_answer(reader)
    assert status == 200 and json.loads(body)["path"] == "/one"
    assert headers["connection"] == "close"
    assert await closed(reader)
    writer.close()


async def test_control_characters_in_a_header_value_are_refused(broker: Broker, upstream: Upstream) -> None:
    reader, writer = await connect(broker)
    writer.write(get(broker, "/x", "X-Bell: a\x07b\r\n"))
    status, headers, _, _ = await read_answer(reader)
    assert (status, headers.get("x-broker-error")) == (400, "bad_request")  # the broker's, not the upstream's
    assert upstream.seen == []
    writer.close()


async def test_peer_and_listener_are_looked_up_when_the_connection_opens(broker: Broker) -> None:
    # in a new-connection-per-request client (MCP legacy mode) these lookups then overlap with
    # the agent writing its request instead of delaying the answer
    reader, writer = await connect(broker)
    await asyncio.sleep(0.1)  # no request sent yet
    (conn,) = broker.daemon.server.connections
    assert conn.facts == (broker.port, os.getuid())  # kept with the connection for its requests
    assert broker.daemon.rt.connections.peers.known(conn.transport) == os.getuid()
    writer.write(get(broker, "/_broker/health"))
    assert (await read_answer(reader))[0] == 200
    writer.close()


async def test_an_agent_leaving_a_quiet_stream_frees_it_at_once(broker: Broker, upstream: Upstream) -> None:
    # the upstream sends one event and then nothing for a long time: the agent's hang-up, not
    # the upstream's next event, ends the forwarding (and frees the upstream connection)
    upstream.handlers["/quiet"] = sse_events([b"data: first\n\n"], linger=4)
    reader, writer = await connect(broker)
    writer.write(get(broker, "/quiet"))
    await asyncio.wait_for(reader.readuntil(b"data: first\n\n"), 5)
    writer.close()  # a full close: FIN, then nothing more to read
    rt = broker.daemon.rt
    left = asyncio.get_running_loop().time()
    for _ in range(40):
        await asyncio.sleep(0.02)
        if rt.in_flight == 0:
            break
    # at once: not when the upstream wakes (4 s), nor when draining its rest gives up (1 s)
    assert rt.in_flight == 0
    assert asyncio.get_running_loop().time() - left < 0.5
    assert not broker.daemon.server.connections
    await asyncio.sleep(0.05)
    audit = [json.loads(x) for x in broker.logs.splitlines() if '"event": "request"' in x]
    assert audit[-1]["path"] == "/quiet" and audit[-1]["error"] == "agent_disconnected"


async def test_an_answer_header_with_a_line_break_is_never_written() -> None:
    # a value with CR or LF would split the head into lines of the sender's choosing (a header,
    # or a whole second answer, injected): the answer is refused whole before any byte goes out
    value = ""

    async def handler(_request: agents.Request) -> agents.StreamResponse:
        return agents.Response(headers={"X-Echo": value}, body=b"ok")

    server = listener.AgentServer(handler, lambda: 32768)
    site = await server.listen_tcp("127.0.0.1", 0)
    port = site.sockets[0].getsockname()[1]
    try:
        for value, status in (("plain", 200), ("a\r\nSet-Cookie: x=1", 500), ("a\nX-Injected: 1", 500)):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            got, headers, body, _ = await read_answer(reader)
            assert got == status, value
            assert "set-cookie" not in headers and "x-injected" not in headers
            if status == 500:  # a fault of the broker's own, never passed off as the agent's
                assert headers["x-broker-error"] == "internal_error"
                assert json.loads(body)["error"]["code"] == "internal_error"
            assert (headers.get("x-echo"), body) == (("plain", b"ok") if status == 200 else (None, body))
            writer.close()
    finally:
        await server.shutdown(1.0)


async def test_an_upgrade_is_answered_as_plain_http_and_never_with_a_body(
    broker: Broker, upstream: Upstream
) -> None:
    # `curl --http2` over http:// asks to Upgrade to h2c: the broker switches no protocol, answers
    # in HTTP/1.1 and closes (llhttp stops reading at an upgrade). With a body, llhttp would read
    # none of it, so that request is refused rather than its body read as the next request.
    upgrade = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    reader, writer = await connect(broker)
    writer.write(get(broker, "/plain", upgrade) + get(broker, "/after-upgrade"))
    status, headers, body, version = await read_answer(reader)
    assert (status, version) == (200, "HTTP/1.1")
    assert json.loads(body)["path"] == "/plain"
    assert headers["connection"] == "close"
    assert await closed(reader)
    seen = upstream.seen[-1]
    assert "Upgrade" not in seen.headers and "HTTP2-Settings" not in seen.headers
    writer.close()

    reader, writer = await connect(broker)
    hidden = get(broker, "/hidden")  # the body: a request, should anyone read it as one
    head = f"POST /smuggle HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\n{upgrade}"
    writer.write(f"{head}Content-Length: {len(hidden)}\r\n\r\n".encode() + hidden)
    status, headers, _, _ = await read_answer(reader)
    assert (status, headers["x-broker-error"]) == (400, "bad_request")
    assert await closed(reader)
    writer.close()
    assert [s.raw_path for s in upstream.seen] == ["/plain"]


async def test_a_head_under_the_limit_sent_in_pieces_is_read(broker: Broker, upstream: Upstream) -> None:
    # the head's fields and the raw bytes fed while it is incomplete are counted apart: added to
    # one count, a 24 KiB head trickled in 1 KiB writes once counted as ~48 KiB and got 431
    fields = "".join(f"X-Pad-{i}: {'p' * 1000}\r\n" for i in range(24))
    wire = get(broker, "/trickled", fields)
    reader, writer = await connect(broker)
    for i in range(0, len(wire), 1024):
        writer.write(wire[i : i + 1024])
        await writer.drain()
        await asyncio.sleep(0.005)
    status, _, body, _ = await read_answer(reader)
    assert status == 200
    assert json.loads(body)["path"] == "/trickled"
    assert upstream.seen[-1].headers["X-Pad-23"] == "p" * 1000
    writer.close()


async def _ok_server() -> tuple[listener.AgentServer, int]:
    async def handler(request: agents.Request) -> agents.StreamResponse:
        return agents.Response(body=request.raw_path.encode())

    server = listener.AgentServer(handler, lambda: 32768)
    site = await server.listen_tcp("127.0.0.1", 0)
    return server, site.sockets[0].getsockname()[1]


async def test_shutdown_serves_the_first_request_of_a_connection_just_made() -> None:
    # a reverse proxy opens a connection per request: one accepted just before the shutdown has
    # its request on the way; closing it would turn that request into a 502 the proxy cannot retry
    server, port = await _ok_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(100):
        if server.connections:
            break
        await asyncio.sleep(0.01)
    assert server.connections  # accepted, nothing sent yet
    stopping = asyncio.create_task(server.shutdown(5.0))
    await asyncio.sleep(0.2)
    writer.write(b"GET /late HTTP/1.1\r\nHost: h\r\n\r\n")
    status, headers, body, _ = await read_answer(reader)
    assert (status, body) == (200, b"/late")
    assert headers["connection"] == "close" and await closed(reader)
    await asyncio.wait_for(stopping, 3)
    with pytest.raises(OSError):  # and nothing new is accepted
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()


async def test_shutdown_accepts_what_the_kernel_already_accepted() -> None:
    # connections in the listen backlog (the kernel finished their handshake; the event loop has
    # not accepted them yet) would be reset when the listening socket closes
    server, port = await _ok_server()
    clients = []
    for _ in range(3):
        s = socket.socket()
        s.connect(("127.0.0.1", port))  # no await since: the loop has not accepted them
        s.sendall(b"GET /queued HTTP/1.1\r\nHost: h\r\n\r\n")
        clients.append(s)
    stopping = asyncio.create_task(server.shutdown(5.0))

    def answer(s: socket.socket) -> bytes:
        s.settimeout(5)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got

    answers = await asyncio.gather(*(asyncio.to_thread(answer, s) for s in clients))
    await asyncio.wait_for(stopping, 3)
    for got in answers:
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"/queued"), got[:200]
    for s in clients:
        s.close()


async def test_shutdown_closes_a_connection_whose_first_request_never_comes() -> None:
    server, port = await _ok_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(100):
        if server.connections:
            break
        await asyncio.sleep(0.01)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(server.shutdown(10.0), 5)
    took = asyncio.get_running_loop().time() - started
    assert listener.FIRST_REQUEST_S - 0.1 <= took < listener.FIRST_REQUEST_S + 1.0
    assert await closed(reader)
    writer.close()
