"""A corpus of hostile framings played through an in-process broker, byte for byte.

Agents' requests go in raw over a socket and their answers are read by a small parser here;
the upstream is a plain `asyncio.start_server` peer that records every request it got (raw) and
writes canned bytes back. Each table row names the bytes and the outcome the contract asks for
(SPEC.md, "What agents see" and "Requests the broker will not reason about, and answers it will
not pass on"): the agent's status and `X-Broker-Error`, what reached the upstream, that no secret
can be recovered from the agent's bytes (after any decompression), and whether the connection is
closed or still answers the agent's next request with its own answer.

At the end, a differential test: any request head that llhttp (httptools) refuses is refused by
the broker too, and never reaches the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import threading
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.conftest import TEST_KEY, Broker, BrokerFactory, api_config, assert_no_secret, store_key

READ_S = 3.0  # the longest any single read from the broker may take
CASE_S = 12.0  # the longest a whole case may take
KEY = TEST_KEY.encode()
BEARER = f"Bearer {TEST_KEY}"
HOST = b"{host}"  # replaced by 127.0.0.1:<the broker's port> in every raw request

# ---------------------------------------------------------------- the raw upstream


@dataclass
class Got:
    """One request as the upstream read it."""

    method: str
    target: str
    version: str
    fields: list[tuple[str, str]]
    body: bytes = b""  # with any chunked framing removed
    trailers: list[tuple[str, str]] = field(default_factory=list)
    raw: bytes = b""  # head and body exactly as they came
    complete: bool = True  # False: the sender stopped (or went away) inside the request

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.fields if k.lower() == name.lower()]


@dataclass
class Canned:
    """What the upstream writes for one path: `parts`, `gap` s apart; then it closes, or keeps
    reading requests on the connection."""

    parts: tuple[bytes, ...]
    gap: float = 0.0
    close: bool = False


def ok_answer(got: Got) -> bytes:
    body = json.dumps({"path": got.target, "method": got.method}).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


class RawUpstream:
    """Reads one request at a time (head, then its Content-Length or chunked body), records it,
    and answers with the canned bytes for its path, or a JSON body naming the path."""

    def __init__(self, answers: dict[str, Canned] | None = None) -> None:
        self.answers = answers or {}
        self.got: list[Got] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def complete(self) -> list[Got]:
        return [g for g in self.got if g.complete]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while (got := await self._read(reader)) is not None:
                self.got.append(got)
                if not got.complete:
                    return
                canned = self.answers.get(got.path) or Canned((ok_answer(got),))
                for i, part in enumerate(canned.parts):
                    if i:
                        await asyncio.sleep(canned.gap)
                    writer.write(part)
                    await writer.drain()
                if canned.close:
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> Got | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                return None
            return Got("", "", "", [], raw=exc.partial, complete=False)
        lines = head[:-4].decode("latin-1").split("\r\n")
        method, target, version = [*lines[0].split(" "), "", "", ""][:3]
        fields = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
        got = Got(method, target, version, fields, raw=head)
        te = ",".join(got.values("Transfer-Encoding")).lower()
        try:
            if "chunked" in te:
                body = bytearray()
                while True:
                    line = await reader.readuntil(b"\r\n")
                    got.raw += line
                    size = int(line[:-2].split(b";", 1)[0], 16)
                    if size == 0:
                        break
                    data = await reader.readexactly(size + 2)
                    got.raw += data
                    body += data[:-2]
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    got.raw += line
                    name, _, value = line[:-2].decode("latin-1").partition(":")
                    got.trailers.append((name, value.strip()))
                got.raw += line
                got.body = bytes(body)
            elif got.values("Content-Length"):
                got.body = await reader.readexactly(int(got.values("Content-Length")[0]))
                got.raw += got.body
        except (asyncio.IncompleteReadError, ValueError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError):
                got.raw += exc.partial
            got.complete = False
        return got


# ---------------------------------------------------------------- the agent's side


class NoAnswer(AssertionError):
    """The broker closed the connection before a whole answer head."""


@dataclass
class Answer:
    status: int
    version: str
    fields: list[tuple[str, str]]
    body: bytes
    raw: bytes
    complete: bool  # False: the connection ended inside the body

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.fields if k.lower() == name.lower()]
        return values[0] if values else None

    @property
    def error(self) -> str | None:
        return self.get("X-Broker-Error")

    @property
    def says_close(self) -> bool:
        conn = (self.get("Connection") or "").lower()
        return "close" in [t.strip() for t in conn.split(",")] or (
            self.version == "HTTP/1.0" and "keep-alive" not in conn
        )

    def json(self) -> Any:
        return json.loads(self.body)


async def _read(awaitable: Awaitable[bytes], what: str) -> bytes:
    try:
        return await asyncio.wait_for(awaitable, READ_S)
    except TimeoutError:
        raise AssertionError(f"the broker neither sent {what} nor closed within {READ_S} s") from None


async def read_answer(reader: asyncio.StreamReader, head_request: bool = False) -> Answer:
    """One answer as an HTTP/1.1 client reads it; interim 1xx answers are skipped."""
    raw = bytearray()
    while True:
        try:
            head = await _read(reader.readuntil(b"\r\n\r\n"), "an answer head")
        except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
            partial = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
            raise NoAnswer(f"closed without an answer (got {bytes(raw) + partial!r:.200})") from None
        raw += head
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, code, _ = [*lines[0].split(" ", 2), ""][:3]
        assert version in ("HTTP/1.1", "HTTP/1.0") and code.isdigit() and len(code) == 3, lines[0]
        status = int(code)
        if status >= 200:
            break
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        assert colon and name == name.strip() and "\x00" not in line, f"the broker wrote a bad field {line!r}"
        fields.append((name, value.strip()))
    ans = Answer(status, version, fields, b"", b"", True)
    te = (ans.get("Transfer-Encoding") or "").lower()
    body = bytearray()
    try:
        if head_request or status in (204, 304):
            pass
        elif te:
            assert te == "chunked", f"the broker answered with Transfer-Encoding: {te}"
            while True:
                line = await _read(reader.readuntil(b"\r\n"), "a chunk size line")
                raw += line
                size = int(line[:-2].split(b";", 1)[0], 16)
                if size == 0:
                    while (line := await _read(reader.readuntil(b"\r\n"), "the trailer section")) != b"\r\n":
                        raw += line
                        ans.fields.append(("trailer:" + line.decode("latin-1").partition(":")[0], ""))
                    raw += line
                    break
                data = await _read(reader.readexactly(size + 2), "chunk data")
                raw += data
                assert data.endswith(b"\r\n"), "the broker wrote chunk data without its CRLF"
                body += data[:-2]
        elif ans.get("Content-Length") is not None:
            data = await _read(reader.readexactly(int(ans.get("Content-Length") or 0)), "the body")
            raw += data
            body += data
        else:  # close-delimited: whatever comes until the end
            data = await _read(reader.read(), "the close-delimited body")
            raw += data
            body += data
    except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
        if isinstance(exc, asyncio.IncompleteReadError):
            raw += exc.partial
            body += exc.partial
        ans.complete = False
    ans.body, ans.raw = bytes(body), bytes(raw)
    return ans


async def closed(reader: asyncio.StreamReader, within: float = 1.0) -> bool:
    """True when the broker ends the connection (EOF or reset) within `within` s, sending nothing."""
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def decodings(data: bytes, depth: int = 3) -> list[bytes]:
    """Every gzip/zlib/raw-deflate decompression that can be made of `data` or of what it holds
    (streams starting anywhere in it, nested up to `depth` deep; truncated streams give what they can)."""
    out: list[bytes] = []
    todo = [data]
    for _ in range(depth):
        found: list[bytes] = []
        for blob in todo:
            starts = {0}
            for magic in (b"\x1f\x8b", b"x\x9c", b"x\x01", b"x^", b"x\xda"):
                at = blob.find(magic)
                while at != -1 and len(starts) < 32:
                    starts.add(at)
                    at = blob.find(magic, at + 1)
            for start in sorted(starts):
                for wbits in (47, -15):  # gzip or zlib header (auto), raw deflate
                    try:
                        plain = zlib.decompressobj(wbits).decompress(blob[start:], 1 << 24)
                    except zlib.error:
                        continue
                    if plain and plain not in out and plain not in found:
                        found.append(plain)
        out += found
        todo = found
    return out


def assert_clean(ans: Answer) -> None:
    assert_no_secret(ans.raw, ans.body)
    for plain in decodings(ans.raw) + decodings(ans.body):
        assert_no_secret(plain)


# ---------------------------------------------------------------- a broker and its upstream


@dataclass
class Rig:
    b: Broker
    up: RawUpstream
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.b.port}"

    def fill(self, raw: bytes) -> bytes:
        return raw.replace(HOST, self.host.encode())

    def get(self, target: str, extra: str = "") -> bytes:
        return f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\n{extra}\r\n".encode()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """An agent's connection; closed at the end of the test whatever happens (a failed case
        must not leave a request in flight for the broker's drain to wait on)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.b.port)
        self.writers.append(writer)
        return reader, writer


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(make_broker: BrokerFactory) -> AsyncIterator[RigFactory]:
    """rig(answers=..., policy=..., **top-level config): a raw upstream and a broker whose one
    route (prefix /, api_key auth with TEST_KEY stored) forwards to it."""
    rigs: list[Rig] = []

    async def start(answers: dict[str, Canned] | None = None, policy: Any = None, **top: Any) -> Rig:
        up = RawUpstream(answers)
        await up.start()
        store_key(TEST_KEY)
        route: dict[str, Any] = {
            "name": "api",
            "prefix": "/",
            "upstream": up.url,
            "auth": {"type": "api_key", "key": "keyring"},
        }
        if policy is not None:
            route["policy"] = policy
        top["timeouts"] = {"drain": 1, **top.get("timeouts", {})}
        rigs.append(Rig(await make_broker(api_config(up.url, routes=[route], **top)), up))
        return rigs[-1]

    yield start
    for r in rigs:
        for writer in r.writers:
            writer.close()
        await r.up.stop()


DROPPED = (
    "Proxy-Authorization",
    "Cookie",
    "Forwarded",
    "X-Real-IP",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
)  # and X-Forwarded-*


def assert_forwarded_clean(got: Got) -> None:
    """What the upstream may see of an agent's request: the broker's key, and only that."""
    assert got.values("Authorization") == [BEARER]
    assert got.raw.count(KEY[8:]) == 1, "the key reached the upstream somewhere else too"
    names = {n.lower() for n, _ in got.fields}
    for name in DROPPED:
        assert name.lower() not in names, f"{name} reached the upstream"
    assert not any(n.startswith("x-forwarded-") for n in names), "X-Forwarded-* reached the upstream"
    assert b"agent-token" not in got.raw and b"agent-session" not in got.raw


async def assert_after(
    rig: Rig, ans: Answer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, after: str
) -> None:
    """After an answer: "close" (the broker must end the connection), "keep" (the next request
    gets its own answer), or "either" (as the answer's Connection header says)."""
    if after == "either":
        after = "close" if ans.says_close else "keep"
    with contextlib.suppress(ConnectionError):
        writer.write(rig.get("/next"))
        await writer.drain()
    if after == "close":
        assert await closed(reader), "the connection was kept after an answer that must end it"
        await asyncio.sleep(0.05)
        assert not [g for g in rig.up.got if g.path == "/next"], "a request after the close was forwarded"
        return
    nxt = await read_answer(reader)
    assert nxt.complete
    assert (nxt.status, nxt.json()["path"]) == (200, "/next"), "the next request got another answer"
    assert_clean(nxt)


# ---------------------------------------------------------------- agents' requests


@dataclass
class Req:
    raw: bytes
    expect: set[tuple[int, str | None]]  # allowed (status, X-Broker-Error); None: any code (must exist)
    after: str = "either"
    upstream: str | None = None  # the one path that must reach the upstream; None: nothing may
    partial_ok: bool = False  # an unfinished request (head, no body end) may have reached it
    check: Callable[[Got], None] | None = None
    top: dict[str, Any] = field(default_factory=dict)


BAD = {(400, "bad_request")}
H = b"Host: " + HOST + b"\r\n"


def req(line: bytes, fields: bytes = b"", body: bytes = b"") -> bytes:
    return line + b"\r\n" + H + fields + b"\r\n" + body


def post_chunked(body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
    return req(b"POST /up " + version, b"Transfer-Encoding: chunked\r\n", body)


def trailers_dropped(got: Got) -> None:
    assert got.body == b"hello"
    assert got.trailers == [] and not got.values("X-Trailer")
    wire = got.raw[got.raw.index(b"\r\n\r\n") + 4 :]
    assert b"X-Trailer" not in got.raw and b"ext" not in wire and b";" not in wire
    assert wire == b"5\r\nhello\r\n0\r\n\r\n" or wire == b"hello", wire  # re-framed, or a length


def only_key(name: str, value: str) -> Req:
    return Req(req(b"GET /x HTTP/1.1", f"{name}: {value}\r\n".encode()), {(200, None)}, "keep", "/x")


AGENT_CASES: dict[str, Req] = {
    # methods
    "connect-authority": Req(
        b"CONNECT other.example:443 HTTP/1.1\r\n" + H + b"\r\n", {(405, "method_not_allowed")}
    ),
    "connect-origin-form": Req(req(b"CONNECT /x HTTP/1.1"), {(405, "method_not_allowed")}),
    "trace": Req(req(b"TRACE /x HTTP/1.1"), {(405, "method_not_allowed")}),
    "propfind": Req(req(b"PROPFIND /x HTTP/1.1"), {(501, "method_not_allowed")}),
    "foo": Req(req(b"FOO /x HTTP/1.1"), {(501, "method_not_allowed")}),
    "lowercase-get": Req(req(b"get /x HTTP/1.1"), {(501, "method_not_allowed")}),
    "mixed-case-get": Req(req(b"Get /x HTTP/1.1"), {(501, "method_not_allowed")}),
    # request targets
    "target-fragment": Req(req(b"GET /x#frag HTTP/1.1"), BAD),
    "target-utf8": Req(req(b"GET /caf\xc3\xa9 HTTP/1.1"), BAD),
    "target-high-byte": Req(req(b"GET /a\xffb HTTP/1.1"), BAD),
    "target-control-char": Req(req(b"GET /a\x01b HTTP/1.1"), BAD),
    "target-del": Req(req(b"GET /a\x7fb HTTP/1.1"), BAD),
    "target-tab": Req(req(b"GET /a\tb HTTP/1.1"), BAD),
    "target-encoded-nul": Req(req(b"GET /a%00b HTTP/1.1"), BAD),
    "target-encoded-nul-in-query": Req(req(b"GET /a?x=%00 HTTP/1.1"), BAD),
    "target-absolute-form": Req(req(b"GET http://other.example/x HTTP/1.1"), BAD),
    "target-absolute-form-self": Req(req(b"GET http://" + HOST + b"/x HTTP/1.1"), BAD),
    "target-asterisk-options": Req(req(b"OPTIONS * HTTP/1.1"), BAD),
    "target-asterisk-get": Req(req(b"GET * HTTP/1.1"), BAD),
    "target-no-leading-slash": Req(req(b"GET x HTTP/1.1"), BAD),
    # malformed heads and bodies: refused, and the connection ends
    "cl-and-te": Req(
        req(b"POST /x HTTP/1.1", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        BAD,
        "close",
    ),
    "two-content-lengths": Req(
        req(b"POST /x HTTP/1.1", b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd"), BAD, "close"
    ),
    "te-gzip-chunked": Req(
        req(b"POST /x HTTP/1.1", b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
        {(400, "bad_request"), (501, None)},
        "close",
    ),
    "te-identity-chunked": Req(
        req(b"POST /x HTTP/1.1", b"Transfer-Encoding: identity, chunked\r\n", b"0\r\n\r\n"),
        {(400, "bad_request"), (501, None)},
        "close",
    ),
    "obs-fold": Req(req(b"GET /x HTTP/1.1", b"X-Folded: a\r\n b\r\n"), BAD, "close"),
    "obs-fold-tab": Req(req(b"GET /x HTTP/1.1", b"X-Folded: a\r\n\tb\r\n"), BAD, "close"),
    "space-before-colon": Req(req(b"GET /x HTTP/1.1", b"X-Space : a\r\n"), BAD, "close"),
    "bare-lf-everywhere": Req(b"GET /x HTTP/1.1\nHost: " + HOST + b"\nX-A: b\n\n", BAD, "close"),
    "bare-lf-one-field": Req(req(b"GET /x HTTP/1.1", b"X-A: a\nX-B: b\r\n"), BAD, "close"),
    "bare-cr-in-value": Req(req(b"GET /x HTTP/1.1", b"X-A: a\rb\r\n"), BAD, "close"),
    "nul-in-value": Req(req(b"GET /x HTTP/1.1", b"X-Nul: a\x00b\r\n"), BAD, "close"),
    "http09": Req(b"GET /\r\n", BAD, "close"),
    "http09-blank-line": Req(b"GET /\r\n\r\n", BAD, "close"),
    "chunked-on-http10": Req(post_chunked(b"5\r\nhello\r\n0\r\n\r\n", b"HTTP/1.0"), BAD, "close"),
    "chunk-size-invalid": Req(post_chunked(b"zz\r\nhello\r\n0\r\n\r\n"), BAD, "close", partial_ok=True),
    "chunk-line-bare-lf": Req(post_chunked(b"5\nhello\r\n0\r\n\r\n"), BAD, "close", partial_ok=True),
    "chunk-data-overruns": Req(post_chunked(b"3\r\nabcd\r\n0\r\n\r\n"), BAD, "close", partial_ok=True),
    "head-over-limit-a-little": Req(
        req(b"GET /x HTTP/1.1", b"X-Big: " + b"z" * 3000 + b"\r\n"),
        {(431, "request_too_large")},
        "either",  # the head was read whole: keeping the connection is safe if the answer says so
        top={"limits": {"max_header_bytes": 2048}},
    ),
    "head-over-limit-a-lot": Req(
        req(b"GET /x HTTP/1.1", (b"X-Big: " + b"z" * 1000 + b"\r\n") * 20),
        {(431, "request_too_large")},
        "close",
        top={"limits": {"max_header_bytes": 2048}},
    ),
    # headers the edge drops; the upstream sees only the broker's key
    "drop-forwarded": only_key("Forwarded", "for=1.2.3.4;host=evil.example"),
    "drop-x-forwarded-for": only_key("X-Forwarded-For", "1.2.3.4"),
    "drop-x-forwarded-host": only_key("X-Forwarded-Host", "evil.example"),
    "drop-x-forwarded-proto": only_key("X-Forwarded-Proto", "https"),
    "drop-x-forwarded-lowercase": only_key("x-forwarded-for", "1.2.3.4"),
    "drop-x-real-ip": only_key("X-Real-IP", "1.2.3.4"),
    "drop-method-override": only_key("X-HTTP-Method-Override", "GET"),
    "drop-x-http-method": only_key("X-HTTP-Method", "GET"),
    "drop-authorization": only_key("Authorization", "Bearer agent-token"),
    "drop-authorization-key-shaped": only_key("Authorization", "Bearer sk_test_agent-token"),
    "drop-proxy-authorization": only_key("Proxy-Authorization", "Basic agent-token"),
    "drop-cookie": only_key("Cookie", "sid=agent-session"),
    # trailers and chunk extensions are read, never forwarded
    "trailer-and-extension": Req(
        post_chunked(b"5;ext=1\r\nhello\r\n0\r\nX-Trailer: v\r\n\r\n"),
        {(200, None)},
        "keep",
        "/up",
        check=trailers_dropped,
    ),
    "trailer-only": Req(
        post_chunked(b"5\r\nhello\r\n0\r\nX-Trailer: v\r\n\r\n"),
        {(200, None)},
        "keep",
        "/up",
        check=trailers_dropped,
    ),
    "extension-only": Req(
        post_chunked(b"5;ext=1\r\nhello\r\n0\r\n\r\n"), {(200, None)}, "keep", "/up", check=trailers_dropped
    ),
}


@pytest.mark.parametrize("case", AGENT_CASES.values(), ids=AGENT_CASES.keys())
async def test_agent_request(rig: RigFactory, case: Req) -> None:
    async with asyncio.timeout(CASE_S):
        r = await rig(**case.top)
        reader, writer = await r.connect()
        writer.write(r.fill(case.raw))
        ans = await read_answer(reader)
        assert ans.complete
        expected = {s for s, _ in case.expect}
        assert ans.status in expected, (ans.status, ans.error, ans.body[:200])
        if ans.status >= 300:
            assert ans.error is not None, "a refusal without X-Broker-Error"
            codes = {c for s, c in case.expect if s == ans.status}
            assert None in codes or ans.error in codes, (ans.status, ans.error)
            assert json.loads(ans.body)["error"]["code"] == ans.error
        assert_clean(ans)
        await assert_after(r, ans, reader, writer, case.after)
        writer.close()
        await asyncio.sleep(0.05)
        sent = [g for g in r.up.got if g.path != "/next"]
        if case.upstream is None:
            if case.partial_ok:
                assert not [g for g in sent if g.complete], "a refused request reached the upstream whole"
            else:
                assert sent == [], "a refused request reached the upstream"
        else:
            assert [g.target for g in sent] == [case.upstream]
            assert sent[0].complete
            assert_forwarded_clean(sent[0])
            if case.check is not None:
                case.check(sent[0])


# ---------------------------------------------------------------- path rules cannot be spelled around

DENIED_PATHS = [
    "/api/v1/cards/c1/details",
    "/api/v1/cards/c1/details/",
    "/api/v1/cards/c1/DETAILS",
    "/API/V1/Cards/c1/Details",
    "/api/v1/cards/c1/details;x=1",
    "/api/v1/cards/c1;x/details",
    "/api/v1//cards/c1/details",
    "/api/v1/cards/c1//details",
    "/api/v1/cards/c1/%64etails",
    "/api/v1/cards/c1%2Fdetails",
    "/api/v1/cards/c1%5Cdetails",
    "/api/v1/cards/c1\\details",
    "/api/v1/cards/c1/det%2561ils",
    "/api/v1/cards/c1/./details",
    "/api/v1/cards/x/../c1/details",
    "/api/v1/cards/c1/details#x",
    "/api/v1/cards/c1/details?x=1",
]
DENY = {"deny": ["GET /api/v1/cards/*/details"]}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", p) for p in DENIED_PATHS] + [("get", "/api/v1/cards/c1/details")],
    ids=[p for p in DENIED_PATHS] + ["lowercase-get"],
)
async def test_denied_path_is_refused_however_spelled(rig: RigFactory, method: str, path: str) -> None:
    async with asyncio.timeout(CASE_S):
        r = await rig(policy=DENY)
        reader, writer = await r.connect()
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: {r.host}\r\n\r\n".encode())
        ans = await read_answer(reader)
        allowed = {(403, "policy_denied"), (400, "bad_request")}
        if method != "GET":
            allowed.add((501, "method_not_allowed"))
        assert (ans.status, ans.error) in allowed, (ans.status, ans.error, ans.body[:200])
        assert_clean(ans)
        await assert_after(r, ans, reader, writer, "either")
        writer.close()
        assert [g for g in r.up.got if g.path != "/next"] == [], "a denied request reached the upstream"


async def test_allowed_path_next_to_the_rule_passes(rig: RigFactory) -> None:
    async with asyncio.timeout(CASE_S):
        r = await rig(policy=DENY)
        reader, writer = await r.connect()
        writer.write(r.get("/api/v1/cards/c1"))
        ans = await read_answer(reader)
        assert (ans.status, ans.json()["path"]) == (200, "/api/v1/cards/c1")
        assert_clean(ans)
        await assert_after(r, ans, reader, writer, "keep")
        writer.close()
        assert [g.target for g in r.up.got] == ["/api/v1/cards/c1", "/next"]
        assert_forwarded_clean(r.up.got[0])


@pytest.mark.parametrize(
    ("sent", "forwarded"),
    [
        ("/api/v1//cards", ("/api/v1/cards",)),
        ("/api/v1/cards//", ("/api/v1/cards/", "/api/v1/cards")),
        ("/api/v1/%7Euser", ("/api/v1/~user",)),
        ("/api/v1/%7euser", ("/api/v1/~user",)),
        ("/api/v1/%7Euser?q=%7E", ("/api/v1/~user?q=%7E",)),
    ],
    ids=["empty-segment", "empty-trailing-segment", "tilde-upper", "tilde-lower", "query-untouched"],
)
async def test_the_upstream_receives_the_path_that_was_checked(
    rig: RigFactory, sent: str, forwarded: tuple[str, ...]
) -> None:
    async with asyncio.timeout(CASE_S):
        r = await rig()
        reader, writer = await r.connect()
        writer.write(r.get(sent))
        ans = await read_answer(reader)
        assert ans.status == 200, (ans.status, ans.error, ans.body[:200])
        assert ans.json()["path"] in forwarded
        assert_clean(ans)
        await assert_after(r, ans, reader, writer, "keep")
        writer.close()
        assert [g.target for g in r.up.got] == [ans.json()["path"], "/next"]


# ---------------------------------------------------------------- the guard and the clocks


async def test_guard_refusal_does_not_wait_for_the_body(rig: RigFactory) -> None:
    async with asyncio.timeout(CASE_S):
        r = await rig()
        reader, writer = await r.connect()
        started = time.monotonic()
        writer.write(
            f"POST /x HTTP/1.1\r\nHost: evil.example:{r.b.port}\r\nContent-Length: 100\r\n\r\n".encode()
        )
        ans = await read_answer(reader)
        assert time.monotonic() - started < 1.0, "the guard waited for a body it will not read"
        assert (ans.status, ans.error) == (403, "host_not_allowed")
        assert_clean(ans)
        assert await closed(reader), "the unread body would be read as the next request"
        writer.close()
        assert r.up.got == []


@pytest.mark.parametrize(
    ("policy", "raw"),
    [
        (
            {"max_amount_cents": 5000},
            b"POST /api/v1/cards HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\n"
            b"Content-Length: 50\r\n\r\n" + b'{"amount_c',
        ),
        (
            {"tools": {"deny": ["x"]}},
            b"POST /mcp HTTP/1.1\r\n" + H + b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b'a\r\n{"jsonrpc"',
        ),
    ],
    ids=["content-length-amount-policy", "chunked-tools-policy"],
)
async def test_a_stalled_body_a_policy_reads_times_out(
    rig: RigFactory, policy: dict[str, Any], raw: bytes
) -> None:
    async with asyncio.timeout(CASE_S):
        r = await rig(policy=policy, timeouts={"idle": 0.3})
        reader, writer = await r.connect()
        started = time.monotonic()
        writer.write(r.fill(raw))
        ans = await read_answer(reader)
        assert time.monotonic() - started < 2.0
        assert (ans.status, ans.error) == (408, "request_timeout"), (ans.status, ans.error)
        assert_clean(ans)
        assert await closed(reader), "a connection with a half-read body was kept"
        writer.close()
        assert r.up.got == []


async def test_first_byte_counts_from_the_end_of_the_upload(rig: RigFactory) -> None:
    async with asyncio.timeout(CASE_S):
        r = await rig(timeouts={"first_byte": 0.5})
        reader, writer = await r.connect()
        writer.write(f"POST /up HTTP/1.1\r\nHost: {r.host}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        early = b""  # an answer that comes while the upload is still going on
        for _ in range(5):
            writer.write(b"5\r\nabcde\r\n")
            with contextlib.suppress(TimeoutError):
                early = await asyncio.wait_for(reader.read(65536), 0.2)
            if early:
                break
        else:
            writer.write(b"0\r\n\r\n")
        if early:
            seen = asyncio.StreamReader()
            seen.feed_data(early)
            seen.feed_eof()
            ans = await read_answer(seen)
            raise AssertionError(f"answered before the upload ended: {ans.status} {ans.error}")
        ans = await read_answer(reader)
        assert (ans.status, ans.error) == (200, None), (ans.status, ans.error, ans.body[:200])
        assert_clean(ans)
        assert [(g.target, g.body) for g in r.up.got] == [("/up", b"abcde" * 5)]
        assert_forwarded_clean(r.up.got[0])
        await assert_after(r, ans, reader, writer, "keep")
        writer.close()


# ---------------------------------------------------------------- upstreams' answers


@dataclass
class Ans:
    canned: Canned
    expect: set[tuple[int, str | None]] | None  # None: the answer must be cut (head sent, body incomplete)
    after: str = "either"
    body: bytes | None = None  # the exact body the agent must get
    check: Callable[[Answer], None] | None = None


UPSTREAM_ERROR = {(502, "upstream_error")}


def once(*parts: bytes, close: bool = False) -> Canned:
    return Canned(tuple(parts), close=close)


def later(*parts: bytes) -> Canned:
    return Canned(tuple(parts), gap=0.2)


def bad(raw: bytes, close: bool = False) -> Ans:
    return Ans(once(raw, close=close), UPSTREAM_ERROR)


def clean(body: bytes, *extra: Callable[[Answer], None]) -> Callable[[Answer], None]:
    def check(ans: Answer) -> None:
        assert ans.body == body
        for c in extra:
            c(ans)

    return check


def no_field(name: str) -> Callable[[Answer], None]:
    def check(ans: Answer) -> None:
        assert all(name.lower() not in k.lower() for k, _ in ans.fields), f"{name} reached the agent"

    return check


def decoded(prefix: bytes) -> Callable[[Answer], None]:
    def check(ans: Answer) -> None:
        if ans.status == 200:
            assert ans.get("Content-Encoding") is None, "the agent got the coding the broker decoded"
            assert ans.body.startswith(prefix), ans.body[:80]

    return check


def chunks(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
CHUNKED = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
HELLO5 = b"Content-Length: 5\r\n\r\nhello"
SECRET_TEXT = b"your key is " + KEY + b" (echoed)"
GZ = gzip.compress(SECRET_TEXT)


def with_length(head: bytes, body: bytes) -> bytes:
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


UPSTREAM_CASES: dict[str, Ans] = {
    # ambiguous or unsupported framing
    "cl-and-te": bad(OK_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks(b"hello")),
    "te-gzip-chunked": bad(
        OK_HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunks(gzip.compress(b"hello"))
    ),
    "te-chunked-chunked": bad(OK_HEAD + b"Transfer-Encoding: chunked, chunked\r\n\r\n" + chunks(b"hello")),
    "te-two-chunked-fields": bad(
        OK_HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks(b"hello")
    ),
    "te-identity": bad(OK_HEAD + b"Transfer-Encoding: identity\r\n\r\nhello", close=True),
    # content codings the broker cannot scrub through
    "ce-gzip-twice-as-fields": bad(
        with_length(OK_HEAD + b"Content-Encoding: gzip\r\nContent-Encoding: gzip\r\n", gzip.compress(GZ))
    ),
    "ce-gzip-gzip": bad(with_length(OK_HEAD + b"Content-Encoding: gzip, gzip\r\n", gzip.compress(GZ))),
    "ce-empty": bad(with_length(OK_HEAD + b"Content-Encoding: \r\n", b"hello")),
    "ce-br": bad(with_length(OK_HEAD + b"Content-Encoding: br\r\n", b"\x1b\x04\x00\xf8\xa5\x9f\xd3")),
    "ce-compress": bad(with_length(OK_HEAD + b"Content-Encoding: compress\r\n", b"\x1f\x9d\x90hello")),
    # malformed heads
    "status-letters": bad(b"HTTP/1.1 2xx OK\r\n" + HELLO5),
    "status-four-digits": bad(b"HTTP/1.1 2000 OK\r\n" + HELLO5),
    "status-no-version": bad(b"200 OK\r\n" + HELLO5),
    "status-garbage": bad(b"hello there\r\n\r\n", close=True),
    "obs-fold": bad(OK_HEAD + b"X-A: a\r\n b\r\n" + HELLO5),
    "bare-lf-head": bad(b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello"),
    "bare-lf-one-field": bad(OK_HEAD + b"X-A: a\nX-B: b\r\n" + HELLO5),
    "bare-cr-in-value": bad(OK_HEAD + b"X-A: a\rb\r\n" + HELLO5),
    "nul-in-value": bad(OK_HEAD + b"X-A: a\x00b\r\n" + HELLO5),
    "space-before-colon": bad(OK_HEAD + b"X-A : b\r\n" + HELLO5),
    "space-before-colon-content-length": bad(OK_HEAD + b"Content-Length : 5\r\n\r\nhello", close=True),
    # malformed chunks that arrive with the head: nothing has gone to the agent yet
    "chunk-size-invalid": bad(CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk-line-bare-lf": bad(CHUNKED + b"5\nhello\r\n0\r\n\r\n"),
    "chunk-data-overruns": bad(CHUNKED + b"5\r\nhelloXX\r\n0\r\n\r\n"),
    # malformed chunks after the head went out: the agent's answer is cut, never completed
    "late-chunk-size-invalid": Ans(later(CHUNKED + b"5\r\nhello\r\n", b"zz\r\nmore\r\n0\r\n\r\n"), None),
    "late-chunk-line-bare-lf": Ans(later(CHUNKED + b"5\r\nhello\r\n", b"4\nmore\r\n0\r\n\r\n"), None),
    "late-upstream-eof": Ans(Canned((CHUNKED + b"5\r\nhello\r\n", b"4\r\nmo"), gap=0.2, close=True), None),
    # an answer that is longer than it says: the rest is not the next answer
    "bytes-after-the-body": Ans(once(OK_HEAD + HELLO5 + b"GARBAGE"), {(200, None)}, "keep", b"hello"),
    "an-answer-after-the-body": Ans(
        once(OK_HEAD + HELLO5 + b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"),
        {(200, None)},
        "keep",
        b"hello",
    ),
    # what must never reach the agent
    "trailer-with-the-key": Ans(
        once(CHUNKED + b"5\r\nhello\r\n0\r\nX-Secret: " + KEY + b"\r\n\r\n"),
        {(200, None)},
        "keep",
        b"hello",
        no_field("X-Secret"),
    ),
    "chunk-extension-with-the-key": Ans(
        once(CHUNKED + b"5;k=" + KEY + b"\r\nhello\r\n0;last\r\n\r\n"), {(200, None)}, "keep", b"hello"
    ),
    "key-in-a-header": Ans(
        once(OK_HEAD + b"X-Echo: " + KEY + b"\r\n" + HELLO5), {(200, None)}, "keep", b"hello"
    ),
    "key-in-the-reason-phrase": Ans(
        once(b"HTTP/1.1 400 Bad key " + KEY + b"\r\n" + HELLO5), {(400, None)}, "keep"
    ),
    "key-in-a-length-body": Ans(once(with_length(OK_HEAD, SECRET_TEXT)), {(200, None)}, "keep"),
    "key-split-across-chunks": Ans(
        later(CHUNKED + b"%x\r\n%s\r\n" % (20, SECRET_TEXT[:20]), chunks(SECRET_TEXT[20:])),
        {(200, None)},
        "keep",
    ),
    "key-gzipped": Ans(
        once(with_length(OK_HEAD + b"Content-Encoding: gzip\r\n", GZ)),
        {(200, None)},
        "keep",
        None,
        decoded(b"your key is "),
    ),
    "key-gzipped-chunked": Ans(
        once(
            OK_HEAD
            + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks(GZ[:10], GZ[10:])
        ),
        {(200, None)},
        "keep",
        None,
        decoded(b"your key is "),
    ),
    "key-deflated": Ans(
        once(with_length(OK_HEAD + b"Content-Encoding: deflate\r\n", zlib.compress(SECRET_TEXT))),
        {(200, None), (502, "upstream_error")},
        "either",
        None,
        decoded(b"your key is "),
    ),
}


@pytest.mark.parametrize("case", UPSTREAM_CASES.values(), ids=UPSTREAM_CASES.keys())
async def test_upstream_answer(rig: RigFactory, case: Ans) -> None:
    async with asyncio.timeout(CASE_S):
        r = await rig(answers={"/x": case.canned})
        reader, writer = await r.connect()
        started = time.monotonic()
        writer.write(r.get("/x"))
        ans = await read_answer(reader)
        took = time.monotonic() - started
        assert_clean(ans)
        assert [g.target for g in r.up.got] == ["/x"], "the request was not sent exactly once"
        assert_forwarded_clean(r.up.got[0])
        assert took < 1.5, f"answered (or cut) after {took:.2f} s"
        if case.expect is None:
            assert ans.status == 200 and not ans.complete, "an answer cut upstream reached the agent whole"
            assert b"0\r\n\r\n" not in ans.raw[ans.raw.index(b"\r\n\r\n") :]
            assert await closed(reader)
            writer.close()
            return
        assert ans.complete, "the broker cut an answer it had accepted"
        assert (ans.status, ans.error) in case.expect, (ans.status, ans.error, ans.body[:200])
        if ans.error is not None:
            assert json.loads(ans.body)["error"]["code"] == ans.error
        if case.body is not None:
            assert ans.body == case.body
        if case.check is not None:
            case.check(ans)
        await assert_after(r, ans, reader, writer, case.after)
        writer.close()


# ---------------------------------------------------------------- differential: llhttp vs the broker

INSERTS = [
    b"\r",
    b"\n",
    b"\x00",
    b" ",
    b"\t",
    b"\r\n ",
    b"\r\n\t",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"\xc3\xa9",
    b"\x0b",
    b":",
]
FIELDS = [
    b"Content-Length: 0",
    b"Content-Length: 0\r\nContent-Length: 1",
    b"Content-Length: 0, 0",
    b"Content-Length: +0",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: chunked, chunked",
    b"Transfer-Encoding: xchunked",
    b"Transfer-Encoding : chunked",
    b" Transfer-Encoding: chunked",
    b"X-Fold: a\r\n b",
    b"X-Nul: a\x00b",
    b"X-High: \xff\xfe",
]
METHODS = [
    b"GET",
    b"get",
    b"Get",
    b"gET",
    b"G ET",
    b"G\x00ET",
    b"POST",
    b"PROPFIND",
    b"FOO",
    b"TRACE",
    b"GET\t",
]
VERSIONS = [
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/0.9",
    b"HTTP/2.0",
    b"http/1.1",
    b"HTTP/1.10",
    b"HTTP/1.1 ",
    b"HTTP/1",
]

Op = tuple[str, int, int]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 200), st.integers(0, len(INSERTS) - 1)),
        st.tuples(st.just("field"), st.integers(0, 4), st.integers(0, len(FIELDS) - 1)),
        st.tuples(st.just("method"), st.just(0), st.integers(0, len(METHODS) - 1)),
        st.tuples(st.just("version"), st.just(0), st.integers(0, len(VERSIONS) - 1)),
    ),
    min_size=1,
    max_size=3,
)


def mutate(host: str, mutations: list[Op]) -> bytes:
    """A valid GET head with `mutations` applied before its final blank line."""
    method, version = b"GET", b"HTTP/1.1"
    fields = [f"Host: {host}".encode(), b"User-Agent: corpus", b"Accept: */*"]
    inserts: list[tuple[int, bytes]] = []
    for kind, at, i in mutations:
        if kind == "method":
            method = METHODS[i]
        elif kind == "version":
            version = VERSIONS[i]
        elif kind == "field":
            fields.insert(min(at, len(fields)), FIELDS[i])
        else:
            inserts.append((at, INSERTS[i]))
    head = method + b" /fuzz " + version + b"\r\n" + b"".join(f + b"\r\n" for f in fields)
    for at, data in inserts:
        at = min(at, len(head))
        head = head[:at] + data + head[at:]
    return head + b"\r\n"


def llhttp_refuses(head: bytes) -> bool:
    try:
        httptools.HttpRequestParser(object()).feed_data(head)
    except httptools.HttpParserError:
        return True
    except httptools.HttpParserUpgrade:
        return False
    return False


async def probe(r: Rig, head: bytes) -> str:
    """Send one head; return what went wrong, or "" when the broker refused it as it should."""
    before = len(r.up.got)
    reader, writer = await r.connect()
    try:
        writer.write(head)
        try:
            ans = await asyncio.wait_for(read_answer(reader), 1.5)
        except NoAnswer:
            ans = None
        except (TimeoutError, AssertionError) as exc:
            return f"no answer and no close: {exc}"
        if ans is not None and (ans.status < 400 or ans.error is None):
            return f"answered {ans.status} X-Broker-Error={ans.error}"
        await asyncio.sleep(0.01)
        if len(r.up.got) != before:
            return f"the upstream received {r.up.got[before:]!r:.300}"
        return ""
    finally:
        writer.close()


async def test_heads_llhttp_refuses_are_refused_by_the_broker(rig: RigFactory) -> None:
    r = await rig()
    loop = asyncio.get_running_loop()
    probed: list[bytes] = []
    stop_at = time.monotonic() + 40  # a bound on the whole run, whatever the broker does

    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(ops)
    @example([("field", 4, 1)])  # two Content-Lengths
    @example([("field", 4, 4), ("field", 4, 0)])  # Transfer-Encoding and Content-Length
    @example([("method", 0, 1)])  # get
    @example([("insert", 10, 2)])  # NUL in the Host field
    def differential(mutations: list[Op]) -> None:
        if time.monotonic() > stop_at:
            return
        head = mutate(r.host, mutations)
        if head.find(b"\r\n\r\n") != len(head) - 4 or not llhttp_refuses(head):
            return  # what llhttp accepts, or a whole head followed by more: not this test's subject
        probed.append(head)
        problem = asyncio.run_coroutine_threadsafe(probe(r, head), loop).result(timeout=10)
        assert not problem, f"{head!r}: {problem}"

    assert threading.current_thread() is threading.main_thread()
    await asyncio.wait_for(asyncio.to_thread(differential), 50)
    assert len(probed) > 30, (
        f"only {len(probed)} heads llhttp refuses were generated: too few to say anything"
    )
