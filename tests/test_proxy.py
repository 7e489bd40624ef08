"""Forwarding through an in-process broker: a real aiohttp agent, a real recording upstream."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import json
import re
import threading
from pathlib import Path

import aiohttp
import keyring
import pytest
from aiohttp import web
from keyrings.alt.file import PlaintextKeyring

from tests.conftest import (
    LIVE_KEY,
    TEST_KEY,
    Broker,
    BrokerFactory,
    Upstream,
    api_config,
    assert_no_secret,
    raw_http,
    sse_events,
    store_key,
    write_config,
)

BEARER = f"Bearer {TEST_KEY}"


async def test_forwards_with_key_and_drops_agent_credentials(broker: Broker, upstream: Upstream) -> None:
    async with broker.request(
        "GET",
        "/api/v1/cards?limit=5&q=a%20b",
        headers={
            "Authorization": "Bearer agent-made-this-up",
            "Proxy-Authorization": "Basic eDp5",
            "Cookie": "session=agent",
            "X-Custom": "kept",
        },
    ) as r:
        body = await r.read()
        assert r.status == 200
    seen = upstream.seen[-1]
    assert seen.raw_path == "/api/v1/cards?limit=5&q=a%20b"  # query untouched
    assert seen.headers.getall("Authorization") == [BEARER]
    assert "Proxy-Authorization" not in seen.headers
    assert "Cookie" not in seen.headers
    assert seen.headers["X-Custom"] == "kept"
    assert seen.headers["Host"] == upstream.url.removeprefix("http://")
    assert_no_secret(body, str(dict(r.headers)))


async def test_connection_header_cannot_strip_injected_key(broker: Broker, upstream: Upstream) -> None:
    async with broker.request(
        "GET",
        "/x",
        headers={"Connection": "keep-alive, Authorization, X-Drop-Me", "X-Drop-Me": "1", "Keep-Alive": "t=5"},
    ) as r:
        assert r.status == 200
    seen = upstream.seen[-1]
    assert seen.headers.getall("Authorization") == [BEARER]
    assert "X-Drop-Me" not in seen.headers
    assert "Keep-Alive" not in seen.headers


async def test_hop_by_hop_and_cors_and_cookies_dropped_from_response(
    broker: Broker, upstream: Upstream
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="hi",
            headers={
                "Set-Cookie": "sid=1",
                "Access-Control-Allow-Origin": "*",
                "Access-Control-Allow-Credentials": "true",
                "Keep-Alive": "timeout=5",
                "Connection": "X-Upstream-Private",
                "X-Upstream-Private": "1",
                "X-Kept": "yes",
                "WWW-Authenticate": 'Bearer realm="x"',
            },
        )

    upstream.handlers["/h"] = handler
    async with broker.request("GET", "/h") as r:
        assert r.status == 200
        assert await r.text() == "hi"
        names = {k.lower() for k in r.headers}
    assert "set-cookie" not in names
    assert not any(n.startswith("access-control-") for n in names)
    assert "keep-alive" not in names
    assert "x-upstream-private" not in names
    assert "www-authenticate" not in names
    assert "x-kept" in names


async def test_header_names_are_matched_whatever_their_case(broker: Broker, upstream: Upstream) -> None:
    """Node's fetch and HTTP/2-minded servers write names in lower case: the same rules apply."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            text="hi",
            headers={
                "set-cookie": "sid=1",
                "www-authenticate": 'Bearer realm="x"',
                "access-control-allow-origin": "*",
                "keep-alive": "timeout=5",
                "connection": "x-upstream-private",
                "X-UPSTREAM-PRIVATE": "1",
                "x-kept": "yes",
                "location": "/api/v1/cards/c_1",
            },
        )

    upstream.handlers["/lower"] = handler
    async with broker.request(
        "GET",
        "/lower",
        headers={
            "authorization": "Bearer agent-made-this-up",
            "proxy-authorization": "Basic eDp5",
            "cookie": "session=agent",
            "connection": "keep-alive, x-drop-me",
            "X-DROP-ME": "1",
            "x-custom": "kept",
        },
    ) as r:
        assert r.status == 200
        names = {k.lower() for k in r.headers}
    seen = upstream.seen[-1]
    assert seen.headers.getall("Authorization") == [BEARER]
    assert "Proxy-Authorization" not in seen.headers
    assert "Cookie" not in seen.headers
    assert "X-Drop-Me" not in seen.headers
    assert seen.headers["X-Custom"] == "kept"
    assert {"set-cookie", "www-authenticate", "access-control-allow-origin", "keep-alive"}.isdisjoint(names)
    assert "x-upstream-private" not in names
    assert "x-kept" in names
    assert r.headers["Location"] == f"http://127.0.0.1:{broker.port}/api/v1/cards/c_1"


@pytest.mark.parametrize(
    ("prefix_routes", "path", "expected_route", "expected_path"),
    [
        ([("mcp", "/mcp", "/mcp"), ("api", "/", "")], "/mcp", "mcp", "/mcp"),
        ([("mcp", "/mcp", "/mcp"), ("api", "/", "")], "/mcp/x?y=1", "mcp", "/mcp/x?y=1"),
        ([("mcp", "/mcp", "/mcp"), ("api", "/", "")], "/mcpx", "api", "/mcpx"),
        (
            [("v2", "/api/v2", "/api/v2"), ("api", "/", "")],
            "/api/v2/oauth/token",
            "v2",
            "/api/v2/oauth/token",
        ),
        ([("v2", "/api/v2", "/base"), ("api", "/", "")], "/api/v2", "v2", "/base"),
        ([("v2", "/api/v2", "/base/"), ("api", "/", "")], "/api/v2/a", "v2", "/base/a"),
        ([("v2", "/api/v2", "/api/v2"), ("api", "/", "")], "/api/v20/x", "api", "/api/v20/x"),
    ],
)
async def test_longest_prefix_on_whole_segments(
    make_broker: BrokerFactory,
    upstream: Upstream,
    prefix_routes: list[tuple[str, str, str]],
    path: str,
    expected_route: str,
    expected_path: str,
) -> None:
    routes = []
    for name, prefix, up_path in prefix_routes:
        store_key(TEST_KEY + name, name)
        routes.append(
            {"name": name, "prefix": prefix, "upstream": upstream.url + up_path, "auth": {"type": "api_key"}}
        )
    b = await make_broker(api_config(upstream.url, routes=routes))
    async with b.request("GET", path) as r:
        assert r.status == 200
    assert upstream.seen[-1].raw_path == expected_path
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}{expected_route}"


async def test_no_route(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(TEST_KEY, "v1")
    routes = [
        {"name": "v1", "prefix": "/api/v1", "upstream": upstream.url + "/api/v1", "auth": {"type": "api_key"}}
    ]
    b = await make_broker(api_config(upstream.url, routes=routes))
    async with b.request("GET", "/other") as r:
        assert r.status == 404
        assert r.headers["X-Broker-Error"] == "no_route"
        assert (await r.json())["error"]["code"] == "no_route"
    assert upstream.seen == []


@pytest.mark.parametrize(
    "path",
    [
        "/a/../b",
        "/a/%2e%2e/b",
        "/a/%2E%2e/b",
        "/a/..%2fb",
        "/a/..%2Fb",
        "/..",
        "/a/%252e%252e/b",
        "/a/.%2e/b",
        "/a/..%5cb",
        "/a/./b",
    ],
)
async def test_dot_segments_refused(broker: Broker, upstream: Upstream, path: str) -> None:
    resp = await raw_http(
        broker.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\n\r\n".encode()
    )
    assert resp.startswith(b"HTTP/1.1 400")
    assert b"X-Broker-Error: bad_request" in resp
    assert upstream.seen == []


@pytest.mark.parametrize(
    "host",
    ["evil.example:{port}", "127.0.0.1:1", "127.0.0.1", "localhost.evil.example:{port}", "127.0.0.2:{port}"],
)
async def test_host_guard(broker: Broker, upstream: Upstream, host: str) -> None:
    h = host.format(port=broker.port)
    resp = await raw_http(broker.port, f"GET /x HTTP/1.1\r\nHost: {h}\r\n\r\n".encode())
    assert resp.startswith(b"HTTP/1.1 403")
    assert b"X-Broker-Error: host_not_allowed" in resp
    assert upstream.seen == []


async def test_host_guard_accepts_each_allowed_name(broker: Broker, upstream: Upstream) -> None:
    for name in ("127.0.0.1", "localhost", "LOCALHOST", "[::1]"):
        resp = await raw_http(broker.port, f"GET /x HTTP/1.1\r\nHost: {name}:{broker.port}\r\n\r\n".encode())
        assert resp.startswith(b"HTTP/1.1 200"), name
    assert len(upstream.seen) == 4


async def test_missing_or_double_host_refused(broker: Broker, upstream: Upstream) -> None:
    resp = await raw_http(broker.port, b"GET /x HTTP/1.0\r\n\r\n")
    assert resp.startswith(b"HTTP/1.0 403")
    h = f"127.0.0.1:{broker.port}"
    resp = await raw_http(broker.port, f"GET /x HTTP/1.1\r\nHost: {h}\r\nHost: evil:1\r\n\r\n".encode())
    assert not resp.startswith(b"HTTP/1.1 200")
    assert upstream.seen == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
)
async def test_browser_guard(broker: Broker, upstream: Upstream, headers: dict[str, str]) -> None:
    async with broker.request("POST", "/api/v1/cards", headers=headers, json={"amount_cents": 1}) as r:
        assert r.status == 403
        assert r.headers["X-Broker-Error"] == "origin_not_allowed"
        assert not any(k.lower().startswith("access-control-") for k in r.headers)
    assert upstream.seen == []


async def test_allowed_origin_passes_without_cors_headers(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url, allowed_origins=["http://localhost:3000"]))
    async with b.request(
        "GET", "/x", headers={"Origin": "http://localhost:3000", "Sec-Fetch-Site": "same-origin"}
    ) as r:
        assert r.status == 200
        assert not any(k.lower().startswith("access-control-") for k in r.headers)
    assert len(upstream.seen) == 1


async def test_absolute_form_and_connect_refused(broker: Broker, upstream: Upstream) -> None:
    h = f"127.0.0.1:{broker.port}"
    resp = await raw_http(broker.port, f"GET http://{h}/x HTTP/1.1\r\nHost: {h}\r\n\r\n".encode())
    assert resp.startswith(b"HTTP/1.1 400")
    assert b"X-Broker-Error: bad_request" in resp
    resp = await raw_http(broker.port, f"CONNECT {h} HTTP/1.1\r\nHost: {h}\r\n\r\n".encode())
    assert resp.split(b" ")[1] in (b"400", b"403", b"405")
    assert upstream.seen == []


async def test_upstream_401_becomes_credential_rejected(broker: Broker, upstream: Upstream) -> None:
    async def reject(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": "bad key"}, status=401, headers={"WWW-Authenticate": 'Bearer resource_metadata="x"'}
        )

    upstream.handlers["/api/v1/cards"] = reject
    async with broker.request("GET", "/api/v1/cards") as r:
        assert r.status == 503
        assert r.headers["X-Broker-Error"] == "credential_rejected"
        assert "WWW-Authenticate" not in r.headers
        doc = await r.json()
        assert "agentcard-broker set-key api" in doc["error"]["message"]
    async with broker.request("GET", "/_broker/status") as r:
        status = await r.json()
    assert status["routes"][0]["state"] == "credential_rejected"
    # the upstream accepts again: the route recovers
    del upstream.handlers["/api/v1/cards"]
    async with broker.request("GET", "/api/v1/cards") as r:
        assert r.status == 200
    async with broker.request("GET", "/_broker/status") as r:
        assert (await r.json())["routes"][0]["state"] == "ready"


async def test_upstream_error_body_echoing_key_is_scrubbed(broker: Broker, upstream: Upstream) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        auth = request.headers["Authorization"]
        return web.json_response(
            {"error": f"key {auth.split()[1]} is suspended"}, status=403, headers={"X-Echo": auth}
        )

    upstream.handlers["/e"] = echo
    async with broker.request("GET", "/e") as r:
        assert r.status == 403
        raw = await r.read()
        assert int(r.headers["Content-Length"]) == len(raw)
        assert "[REDACTED" in r.headers["X-Echo"]
        assert_no_secret(raw, str(dict(r.headers)))
    assert json.loads(raw)["error"].startswith("key [REDACTED")


async def test_key_split_across_chunks_is_scrubbed(broker: Broker, upstream: Upstream) -> None:
    async def split(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b'{"echo": "' + TEST_KEY[:13].encode())
        await asyncio.sleep(0.05)
        await resp.write(TEST_KEY[13:].encode() + b'"}')
        await resp.write_eof()
        return resp

    upstream.handlers["/split"] = split
    async with broker.request("GET", "/split") as r:
        raw = await r.read()
    assert_no_secret(raw)
    assert json.loads(raw)["echo"].startswith("[REDACTED")
    assert len(json.loads(raw)["echo"]) == len(TEST_KEY)


async def test_gzip_response_is_decoded_and_scrubbed(broker: Broker, upstream: Upstream) -> None:
    async def gz(request: web.Request) -> web.StreamResponse:
        body = gzip.compress(json.dumps({"key": request.headers["Authorization"]}).encode())
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    upstream.handlers["/gz"] = gz
    async with broker.request("GET", "/gz", headers={"Accept-Encoding": "gzip"}) as r:
        raw = await r.read()
        assert "Content-Encoding" not in r.headers
    assert_no_secret(raw)
    assert json.loads(raw)["key"].startswith("Bearer [REDACTED")


async def test_sse_events_arrive_one_by_one(broker: Broker, upstream: Upstream) -> None:
    release = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: message\ndata: one\n\n")
        await asyncio.wait_for(release.wait(), 5)  # the next event only after the agent saw the first
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp

    upstream.handlers["/sse"] = sse
    async with broker.request("GET", "/sse") as r:
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 3)
        assert first == b"event: message\ndata: one\n\n"
        release.set()
        rest = await asyncio.wait_for(r.content.read(), 3)
    assert rest == b"data: two\n\n"


async def test_request_body_streams_to_upstream(broker: Broker, upstream: Upstream) -> None:
    got_first = asyncio.Event()
    received: list[bytes] = []

    async def sink(request: web.Request) -> web.StreamResponse:
        async for chunk in request.content.iter_any():
            received.append(chunk)
            got_first.set()
        return web.json_response({"bytes": sum(map(len, received))})

    upstream.handlers["/upload"] = sink
    upstream.streaming.add("/upload")

    async def body():  # type: ignore[no-untyped-def]
        yield b"a" * 1000
        # the second part is sent only once the upstream has the first: proof of streaming
        await asyncio.wait_for(got_first.wait(), 5)
        yield b"b" * 1000

    async with broker.request("POST", "/upload", data=body()) as r:
        assert r.status == 200
        assert (await r.json())["bytes"] == 2000


async def test_body_forwarded_byte_for_byte(broker: Broker, upstream: Upstream) -> None:
    payload = gzip.compress(b'{"amount_cents": 100}')
    async with broker.request(
        "POST",
        "/api/v1/cards",
        data=payload,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    ) as r:
        assert r.status == 200
    seen = upstream.seen[-1]
    assert seen.body == payload
    assert seen.headers["Content-Length"] == str(len(payload))
    assert seen.headers["Content-Encoding"] == "gzip"


async def test_body_limits(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url, limits={"max_body_bytes": 1000, "max_header_bytes": 2048}))
    async with b.request("POST", "/x", data=b"x" * 1001) as r:
        assert r.status == 413
        assert r.headers["X-Broker-Error"] == "request_too_large"

    async def chunked():  # type: ignore[no-untyped-def]
        for _ in range(5):
            yield b"y" * 400

    async with b.request("POST", "/chunked", data=chunked()) as r:
        assert r.status == 413
    assert not any(s.raw_path == "/x" for s in upstream.seen)
    assert not any(s.body for s in upstream.seen)
    async with b.request("GET", "/h", headers={"X-Big": "z" * 3000}) as r:
        assert r.status in (400, 431)
    async with b.request("GET", "/h", headers={f"X-Many-{i}": "z" * 100 for i in range(25)}) as r:
        assert r.status == 431
        assert r.headers["X-Broker-Error"] == "request_too_large"
    async with b.request("POST", "/ok", data=b"x" * 1000) as r:
        assert r.status == 200
    assert [s.raw_path for s in upstream.seen] == ["/ok"]


async def test_redirect_not_followed_and_location_rewritten(broker: Broker, upstream: Upstream) -> None:
    async def redirect_in(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{upstream.url}/api/v1/cards/2?x=1")

    async def redirect_rel(request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther("/api/v1/cards/3")

    async def redirect_out(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("https://elsewhere.example/login")

    upstream.handlers.update({"/in": redirect_in, "/rel": redirect_rel, "/out": redirect_out})
    async with broker.request("GET", "/in", allow_redirects=False) as r:
        assert r.status == 302
        assert r.headers["Location"] == f"http://127.0.0.1:{broker.port}/api/v1/cards/2?x=1"
    async with broker.request("GET", "/rel", allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"] == f"http://127.0.0.1:{broker.port}/api/v1/cards/3"
    async with broker.request("GET", "/out", allow_redirects=False) as r:
        assert r.headers["Location"] == "https://elsewhere.example/login"
    assert [s.raw_path for s in upstream.seen] == ["/in", "/rel", "/out"]  # nothing followed


async def test_no_credential_names_the_fix(make_broker: BrokerFactory, upstream: Upstream) -> None:
    b = await make_broker(api_config(upstream.url))
    async with b.request("GET", "/api/v1/cards") as r:
        assert r.status == 503
        assert r.headers["X-Broker-Error"] == "no_credential"
        doc = await r.json()
    assert doc["error"]["route"] == "api"
    assert "run: agentcard-broker set-key api" in doc["error"]["message"]
    # a JSON-RPC request gets a JSON-RPC error with its id
    rpc = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
    async with b.request("POST", "/mcp", json=rpc) as r:
        assert r.status == 503
        doc = await r.json()
    assert doc["id"] == 7
    assert doc["error"]["code"] == -32001
    assert doc["error"]["data"] == {"code": "no_credential", "route": "api"}
    assert "set-key api" in doc["error"]["message"]
    assert upstream.seen == []
    # the key arrives; after a reload poke (what set-key does) the next request works
    store_key(TEST_KEY)
    async with b.request("POST", "/_broker/reload") as r:
        assert r.status == 200
    async with b.request("GET", "/api/v1/cards") as r:
        assert r.status == 200


async def test_live_key_blocked_unless_allowed(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(LIVE_KEY)
    b = await make_broker(api_config(upstream.url))
    async with b.request("GET", "/api/v1/cards") as r:
        assert r.status == 403
        assert r.headers["X-Broker-Error"] == "live_mode_blocked"
        assert "allow_live" in (await r.json())["error"]["message"]
    assert upstream.seen == []
    b2 = await make_broker(api_config(upstream.url, auth={"type": "api_key", "allow_live": True}))
    async with b2.request("GET", "/api/v1/cards") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {LIVE_KEY}"
    async with b2.request("GET", "/_broker/status") as r:
        assert (await r.json())["routes"][0]["mode"] == "live"


async def test_env_and_file_key_references(
    make_broker: BrokerFactory, upstream: Upstream, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AGENTCARD_API_KEY", TEST_KEY + "env")
    b = await make_broker(api_config(upstream.url, auth={"type": "api_key", "key": "env:AGENTCARD_API_KEY"}))
    async with b.request("GET", "/a") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}env"

    key_file = tmp_path / "key"
    key_file.write_text(TEST_KEY + "file\n")
    key_file.chmod(0o644)
    b2 = await make_broker(api_config(upstream.url, auth={"type": "api_key", "key": f"file:{key_file}"}))
    async with b2.request("GET", "/b") as r:
        assert r.status == 503
        assert f"chmod 600 {key_file}" in (await r.json())["error"]["message"]
    key_file.chmod(0o600)
    b2.daemon.rt.credentials["api"].invalidate()
    async with b2.request("GET", "/b") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}file"


async def test_unreachable_and_timeouts(make_broker: BrokerFactory, upstream: Upstream) -> None:
    store_key(TEST_KEY)
    # a port nothing listens on
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    b = await make_broker(api_config(f"http://127.0.0.1:{dead_port}"))
    async with b.request("POST", "/api/v1/cards", json={"amount_cents": 5}) as r:
        assert r.status == 502
        assert r.headers["X-Broker-Error"] == "upstream_unreachable"

    async def slow_head(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"partial")
        await asyncio.sleep(3)
        await resp.write(b"never")
        return resp

    upstream.handlers.update({"/slow": slow_head, "/stall": stalls})
    b2 = await make_broker(api_config(upstream.url, timeouts={"first_byte": 0.3, "idle": 0.5}))
    async with b2.request("GET", "/slow") as r:
        assert r.status == 504
        assert r.headers["X-Broker-Error"] == "upstream_timeout"
    with pytest.raises(aiohttp.ClientPayloadError):
        async with b2.request("GET", "/stall") as r:
            assert r.status == 200
            await r.read()  # the broker cuts the stream: a truncated body never looks whole
    await asyncio.sleep(0.1)
    assert '"error": "stream_idle_timeout"' in b2.logs


async def test_head_request(broker: Broker, upstream: Upstream) -> None:
    async with broker.request("HEAD", "/api/v1/cards") as r:
        assert r.status == 200
    assert upstream.seen[-1].method == "HEAD"


async def test_admin_endpoints(broker: Broker, upstream: Upstream) -> None:
    async with broker.request("GET", "/api/v1/cards") as r:
        assert r.status == 200
    async with broker.request("GET", "/_broker/health") as r:
        assert r.status == 200
        assert (await r.json())["status"] == "ok"
    async with broker.request("GET", "/_broker/status") as r:
        raw = await r.read()
    doc = json.loads(raw)
    assert set(doc) >= {"version", "pid", "listen", "config", "routes"}
    assert doc["config"]["error"] is None
    route = doc["routes"][0]
    assert route["name"] == "api"
    assert route["state"] == "ready"
    assert route["mode"] == "test"
    assert route["requests"] == 1
    assert route["expires_at"] is None
    async with broker.request("GET", "/_broker/metrics") as r:
        metrics = await r.text()
    assert 'agentcard_broker_requests_total{route="api",status="200"} 1' in metrics
    assert 'agentcard_broker_request_duration_seconds_count{route="api"} 1' in metrics
    assert 'agentcard_broker_auth_state{route="api",state="ready"} 1' in metrics
    assert 'agentcard_broker_auth_state{route="api",state="no_credential"} 0' in metrics
    assert_no_secret(raw, metrics)
    async with broker.request("GET", "/_broker/nope") as r:
        assert r.status == 404
    async with broker.request("POST", "/_broker/health") as r:
        assert r.status == 405
    resp = await raw_http(broker.port, b"GET /_broker/status HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 403")
    # the reserved paths never reach the upstream
    assert [s.raw_path for s in upstream.seen] == ["/api/v1/cards"]


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("POST", False)])
async def test_a_pooled_connection_closed_under_a_request(
    make_broker: BrokerFactory, method: str, retried: bool
) -> None:
    """The upstream closes a kept-alive connection just as the next request goes out on it:
    a GET is sent again on a new connection, a POST (it may spend) is not."""
    seen: list[tuple[int, bytes]] = []
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        index = connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                seen.append((index, head.split(b" ")[0]))
                if index == 0 and len(seen) == 2:
                    break  # the second request on the first connection: hang up, no answer
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store_key(TEST_KEY)
    try:
        b = await make_broker(api_config(f"http://127.0.0.1:{port}"))
        async with b.request("GET", "/first") as r:
            assert r.status == 200
        async with b.request(method, "/second", data=b"{}" if method == "POST" else None) as r:
            assert r.status == (200 if retried else 502)
        assert [i for i, _ in seen] == ([0, 0, 1] if retried else [0, 0])
    finally:
        server.close()


async def test_upstream_errors_counted(make_broker: BrokerFactory) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config("http://127.0.0.1:9"))
    async with b.request("GET", "/x") as r:
        assert r.status == 502
    async with b.request("GET", "/_broker/metrics") as r:
        text = await r.text()
    assert 'agentcard_broker_upstream_errors_total{route="api",kind="upstream_unreachable"} 1' in text


async def test_logs_audit_every_request_and_never_hold_secrets(broker: Broker, upstream: Upstream) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(text=request.headers["Authorization"], status=500)

    upstream.handlers["/echo"] = echo
    async with broker.request("GET", "/echo?token=tok123&key=k456&code=c789&client_secret=s1&page=2") as r:
        assert r.status == 500
    async with broker.request("GET", "/x", headers={"Host": "evil"}) as r:
        assert r.status == 403
    async with broker.request("GET", f"/cards/{TEST_KEY}/x") as r:  # a key pasted into a path
        assert r.status == 200
    import structlog

    structlog.get_logger("test").debug("debug event", value=f"Bearer {TEST_KEY}", other=["x", TEST_KEY])
    try:
        raise RuntimeError(f"boom with {TEST_KEY}")
    except RuntimeError:
        structlog.get_logger("test").exception("with traceback")
    import logging

    logging.getLogger("aiohttp.server").error("stdlib says %s", TEST_KEY)
    text = broker.logs
    assert_no_secret(text)
    events = broker.log_events()
    audit = [e for e in events if e["event"] == "request"]
    assert len(audit) == 3
    first = audit[0]
    assert first["route"] == "api"
    assert first["status"] == 500
    assert first["method"] == "GET"
    assert (
        first["path"]
        == "/echo?token=[REDACTED]&key=[REDACTED]&code=[REDACTED]&client_secret=[REDACTED]&page=2"
    )
    assert first["bytes_out"] > 0
    assert first["duration_ms"] >= 0
    assert len(first["request_id"]) == 16
    assert audit[1]["error"] == "host_not_allowed"
    assert audit[2]["path"] == "/cards/[REDACTED]/x"
    # the same shape as every other JSON line: fields, then event, level, an ISO UTC timestamp
    assert list(first)[-3:] == ["event", "level", "timestamp"]
    assert first["level"] == "info"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["timestamp"])
    stamp = datetime.datetime.fromisoformat(first["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60
    assert any("boom with" in e.get("exception", "") for e in events)
    assert any(e["event"].startswith("stdlib says") for e in events)


async def test_large_body_streams_both_ways(broker: Broker, upstream: Upstream) -> None:
    size = 64 * 1024 * 1024

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = size
        await resp.prepare(request)
        chunk = b"z" * 65536
        for _ in range(size // len(chunk)):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    upstream.handlers["/big"] = download
    total = 0
    async with broker.request("GET", "/big") as r:
        assert r.headers["Content-Length"] == str(size)
        async for chunk in r.content.iter_any():
            total += len(chunk)
    assert total == size


async def test_expect_100_continue_answered_after_checks(broker: Broker, upstream: Upstream) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    try:
        writer.write(
            f"POST /api/v1/cards HTTP/1.1\r\nHost: 127.0.0.1:{broker.port}\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\nContent-Type: application/json\r\n\r\n".encode()
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)  # well under curl's 1 s wait
        assert interim.startswith(b"HTTP/1.1 100")
        writer.write(b'{"a":')
        await writer.drain()
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()
    assert upstream.seen[-1].body == b'{"a":'
    assert "Expect" not in upstream.seen[-1].headers


async def test_secret_store_file(make_broker: BrokerFactory, upstream: Upstream, isolated_env) -> None:  # type: ignore[no-untyped-def]
    from broker.auth.secret_store import FileStore
    from broker.config import state_dir

    store = FileStore(state_dir() / "secrets.json")
    store.set("api", TEST_KEY + "file")
    assert (state_dir() / "secrets.json").stat().st_mode & 0o777 == 0o600
    b = await make_broker(api_config(upstream.url, secret_store="file"))
    async with b.request("GET", "/x") as r:
        assert r.status == 200
    assert upstream.seen[-1].headers["Authorization"] == f"Bearer {TEST_KEY}file"
    assert any(e["event"] == "secret_store.plaintext_file" for e in b.log_events())
    async with b.request("GET", "/_broker/status") as r:
        assert (await r.json())["secret_store"].startswith("file (")


async def test_many_long_streams_at_once(broker: Broker, upstream: Upstream) -> None:
    """Long-lived streams (MCP GET streams, SSE) must not queue behind a connection-pool cap."""
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: hello\n\n")
        await release.wait()
        await resp.write_eof()
        return resp

    upstream.handlers["/events"] = stream
    n = 150
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        responses = [await s.get(f"{broker.url}/events").__aenter__() for _ in range(n)]
        firsts = await asyncio.wait_for(
            asyncio.gather(*(r.content.readuntil(b"\n\n") for r in responses)), 10
        )
        assert firsts == [b"data: hello\n\n"] * n
        release.set()
        for r in responses:
            await r.read()
            r.release()


class SlowKeyring(PlaintextKeyring):
    """The file backend, whose reads wait until the test opens the gate: a keyring slow to answer
    (a locked Secret Service, a D-Bus round trip), with the real backend underneath."""

    gate = threading.Event()

    def get_password(self, service: str, username: str) -> str | None:
        assert self.gate.wait(10.0)
        return super().get_password(service, username)


async def test_status_right_after_start_waits_for_the_key_read(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    # the key is read in the background after start; status, asked meanwhile, waits for that read
    # rather than telling a user who just started the daemon "no_credential: not read yet"
    store_key(TEST_KEY)
    SlowKeyring.gate.clear()
    keyring.set_keyring(SlowKeyring())
    broker = await make_broker(api_config(upstream.url))
    asked = asyncio.get_running_loop().time()
    asyncio.get_running_loop().call_later(0.3, SlowKeyring.gate.set)
    async with broker.request("GET", "/_broker/status") as r:
        route = (await r.json())["routes"][0]
    assert asyncio.get_running_loop().time() - asked >= 0.25  # it did wait for the read
    assert (route["state"], route["mode"]) == ("ready", "test")
    async with broker.request("GET", "/_broker/metrics") as r:
        assert 'agentcard_broker_auth_state{route="api",state="ready"} 1' in await r.text()


async def test_log_level_edit_applies_on_reload(make_broker: BrokerFactory, upstream: Upstream) -> None:
    # log.level is managed through config.yaml like everything else: no restart to see requests
    store_key(TEST_KEY)
    doc = api_config(upstream.url, log={"level": "warning", "format": "json"})
    b = await make_broker(doc)
    async with b.request("GET", "/api/v1/cards") as r:
        assert r.status == 200
    assert '"event": "request"' not in b.logs  # the audit line is info: not at warning

    doc["log"]["level"] = "info"
    write_config(Path(b.daemon.rt.config_path), doc)
    async with b.request("POST", "/_broker/reload") as r:
        assert (await r.json())["reloaded"] is True
    async with b.request("GET", "/api/v1/cards?after=reload") as r:
        assert r.status == 200
    lines = [json.loads(line) for line in b.logs.splitlines() if line.startswith("{")]
    audits = [x for x in lines if x.get("event") == "request"]
    assert [a["path"] for a in audits] == ["/api/v1/cards?after=reload"]
    assert any(x.get("event") == "config.reloaded" for x in lines)
    assert_no_secret(b.logs)

    doc["log"]["level"] = "error"
    write_config(Path(b.daemon.rt.config_path), doc)
    async with b.request("POST", "/_broker/reload") as r:
        assert r.status == 200
    before = b.logs
    async with b.request("GET", "/api/v1/cards?quiet") as r:
        assert r.status == 200
    assert b.logs == before  # and back down again


async def test_a_stream_that_keeps_moving_outlives_the_idle_timeout(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    # idle is the longest gap between bytes, not the length of the stream
    upstream.handlers["/ticks"] = sse_events([f"data: {i}\n\n".encode() for i in range(8)], gap=0.15)
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url, timeouts={"idle": 0.5}))
    async with b.request("GET", "/ticks") as r:
        body = await r.read()
    assert body == b"".join(f"data: {i}\n\n".encode() for i in range(8))  # 1.2 s, gaps of 0.15 s
    assert '"error": "stream_idle_timeout"' not in b.logs


async def test_connection_close_drops_a_field_named_close_both_ways(
    broker: Broker, upstream: Upstream
) -> None:
    # RFC 9110 §7.6.1: every field the Connection header names is dropped, `close` included
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok", headers={"Connection": "close", "Close": "from-upstream"})

    upstream.handlers["/closing"] = answer
    async with broker.request("GET", "/closing", headers={"Connection": "close", "Close": "from-agent"}) as r:
        assert r.status == 200
        assert "Close" not in r.headers
    assert "Close" not in upstream.seen[-1].headers
