"""broker/routing.py: longest whole-segment prefix match, forwarded URLs, dot-segment refusal."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from broker.config import ApiKeyAuth, Route
from broker.errors import BrokerError
from broker.routing import RouteTable, normalize_path

API = Route("api", "/", "https://api.agentcard.sh", ApiKeyAuth())
MCP = Route("mcp", "/mcp", "https://mcp.agentcard.sh/mcp", ApiKeyAuth())
V2 = Route("platform", "/api/v2", "https://api.agentcard.sh/api/v2", ApiKeyAuth())
DEEP = Route("deep", "/api/v2/special", "https://special.example/base/", ApiKeyAuth())
ROUTES = (API, MCP, V2, DEEP)


@pytest.fixture
def table() -> RouteTable:
    return RouteTable(ROUTES)


def refused(table: RouteTable, path: str) -> BrokerError:
    with pytest.raises(BrokerError) as info:
        table.target(path)
    return info.value


# ---------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("path", "route"),
    [
        ("/mcp", "mcp"),
        ("/mcp/", "mcp"),
        ("/mcp/x", "mcp"),
        ("/mcp/x/y", "mcp"),
        ("/mcpx", "api"),
        ("/mcp-x/y", "api"),
        ("/", "api"),
        ("/api/v1/cards", "api"),
        ("/api/v2", "platform"),
        ("/api/v2/cards", "platform"),
        ("/api/v2x", "api"),
        ("/api/v2/special", "deep"),
        ("/api/v2/special/a", "deep"),
        ("/api/v2/specialist", "platform"),
    ],
)
def test_longest_prefix_on_whole_segments(table: RouteTable, path: str, route: str) -> None:
    matched = table.match(path)
    assert matched is not None
    assert matched.name == route
    assert table.target(path).route.name == route


def test_route_order_does_not_matter() -> None:
    for routes in (ROUTES, tuple(reversed(ROUTES))):
        t = RouteTable(routes)
        assert t.match("/mcp/a").name == "mcp"  # type: ignore[union-attr]
        assert t.match("/api/v2/special/a").name == "deep"  # type: ignore[union-attr]


def test_no_route_without_a_catch_all() -> None:
    t = RouteTable((MCP, V2))
    assert t.match("/mcpx") is None
    assert t.match("/") is None
    err = refused(t, "/api/v1/cards")
    assert err.code == "no_route"
    assert err.status == 404


# ---------------------------------------------------------------- forwarded URL


@pytest.mark.parametrize(
    ("request_target", "url", "rest"),
    [
        ("/mcp", "https://mcp.agentcard.sh/mcp", ""),
        ("/mcp/", "https://mcp.agentcard.sh/mcp/", "/"),
        ("/mcp/x?y=1", "https://mcp.agentcard.sh/mcp/x?y=1", "/x"),
        ("/mcp?x", "https://mcp.agentcard.sh/mcp?x", ""),
        ("/", "https://api.agentcard.sh/", "/"),
        ("/api/v1/cards?limit=5", "https://api.agentcard.sh/api/v1/cards?limit=5", "/api/v1/cards"),
        ("/api/v2/cards", "https://api.agentcard.sh/api/v2/cards", "/cards"),
        ("/api/v2/special/a", "https://special.example/base/a", "/a"),
        ("/api/v2/special", "https://special.example/base/", ""),
    ],
)
def test_forwarded_url_is_upstream_plus_rest_plus_query(
    table: RouteTable, request_target: str, url: str, rest: str
) -> None:
    t = table.target(request_target)
    assert str(t.url) == url
    assert t.rest == rest


@pytest.mark.parametrize(
    "query",
    [
        "q=a+b",
        "q=a%20b&x=%2F%2f",
        "x=%zz&y=%",
        "a=1&a=2&&b",
        "redirect=https%3A%2F%2Fevil.example%2F",
        "path=../../etc/passwd",
        "u=%E2%82%AC&v=€",
    ],
)
def test_query_string_is_untouched(table: RouteTable, query: str) -> None:
    t = table.target(f"/mcp/tools?{query}")
    assert t.url.raw_query_string == query
    assert str(t.url) == f"https://mcp.agentcard.sh/mcp/tools?{query}"


@pytest.mark.parametrize(
    ("raw", "sent"),
    [
        ("/a%2Fb", "/a%2Fb"),  # an encoded slash stays encoded: it is not a separator
        ("/a%2fb", "/a%2Fb"),
        ("/a+b", "/a+b"),
        ("/a%20b", "/a%20b"),
        ("/%7e%41%7A", "/~Az"),  # unreserved characters are decoded (RFC 3986 6.2.2.2)
        ("/%2d%2E%5f", "/-._"),
        ("/a%3ab", "/a%3Ab"),
        ("/cards/%252F", "/cards/%252F"),
        ("/a..b/c.", "/a..b/c."),  # dots inside a segment are fine
        ("/.well-known/x", "/.well-known/x"),
    ],
)
def test_path_encodings_forwarded_as_normalized(table: RouteTable, raw: str, sent: str) -> None:
    assert normalize_path(raw) == sent
    t = table.target(raw)
    assert t.url.raw_path == sent
    assert str(t.url) == "https://api.agentcard.sh" + sent


def test_encoded_slash_does_not_create_a_segment_match(table: RouteTable) -> None:
    # /mcp%2Fx is one segment "mcp/x", not the /mcp route
    t = table.target("/mcp%2Fx")
    assert t.route.name == "api"
    assert t.url.raw_path == "/mcp%2Fx"


# ---------------------------------------------------------------- dot-segments


@pytest.mark.parametrize(
    "path",
    [
        "/..",
        "/.",
        "/mcp/..",
        "/mcp/.",
        "/mcp/../api/v1/cards",
        "/mcp/./x",
        "/mcp/%2e%2e/secret",
        "/mcp/%2E%2e/secret",
        "/mcp/.%2e/secret",
        "/mcp/%2e./secret",
        "/mcp/%2e/x",
        "/mcp/..%2fsecret",
        "/mcp/..%2Fsecret",
        "/mcp/x%2f..%2fy",
        "/mcp/%252e%252e/secret",
        "/mcp/%25252e%25252e/secret",
        "/mcp/..\\secret",
        "/mcp\\..\\secret",
        "/mcp/%5c..%5csecret",
        "/mcp/x/..",
        "/mcp/x/../../..",
    ],
)
def test_dot_segments_refused_in_every_encoding(table: RouteTable, path: str) -> None:
    err = refused(table, path)
    assert err.code == "bad_request"
    assert err.status == 400
    with pytest.raises(BrokerError):
        normalize_path(path)


def test_dot_segments_in_query_are_not_the_path(table: RouteTable) -> None:
    t = table.target("/mcp/x?p=/../..&q=%2e%2e")
    assert t.url.raw_path == "/mcp/x"
    assert t.url.raw_query_string == "p=/../..&q=%2e%2e"


@pytest.mark.parametrize("path", ["/a%00b", "/a\x00b", "/a%2500b"])
def test_nul_refused(table: RouteTable, path: str) -> None:
    assert refused(table, path).code == "bad_request"


def test_quadruple_encoded_dot_segment_refused(table: RouteTable) -> None:
    path = "/mcp/%2525252e%2525252e/secret"  # fully decoded: /mcp/../secret
    assert full_decode(path) == "/mcp/../secret"
    try:
        table.target(path)
    except BrokerError as exc:
        assert exc.code == "bad_request"
    else:
        raise AssertionError(f"{path} was forwarded")


# ---------------------------------------------------------------- broker_path_for


@pytest.mark.parametrize(
    ("route", "upstream_url", "expected"),
    [
        (MCP, "https://mcp.agentcard.sh/mcp", "/mcp"),
        (MCP, "https://mcp.agentcard.sh/mcp/x?y=1", "/mcp/x?y=1"),
        (MCP, "https://mcp.agentcard.sh/mcp/a%2Fb?x=%2F", "/mcp/a%2Fb?x=%2F"),
        (MCP, "https://mcp.agentcard.sh/other", None),
        (MCP, "https://mcp.agentcard.sh/mcpx", None),
        (MCP, "https://evil.example/mcp", None),
        (MCP, "http://mcp.agentcard.sh/mcp", None),
        (MCP, "https://mcp.agentcard.sh:444/mcp", None),
        (API, "https://api.agentcard.sh/", "/"),
        (API, "https://api.agentcard.sh", "/"),
        (API, "https://api.agentcard.sh/api/v1/cards?page=2", "/api/v1/cards?page=2"),
        (API, "https://mcp.agentcard.sh/mcp", None),
        (V2, "https://api.agentcard.sh/api/v2/cards/1", "/api/v2/cards/1"),
        (V2, "https://api.agentcard.sh/api/v1/cards/1", None),
        (DEEP, "https://special.example/base/a", "/api/v2/special/a"),
    ],
)
def test_broker_path_for(table: RouteTable, route: Route, upstream_url: str, expected: str | None) -> None:
    assert table.broker_path_for(route, URL(upstream_url, encoded=True)) == expected


@pytest.mark.parametrize(
    "path", ["/mcp", "/mcp/x/y?z=1&w=%2F", "/api/v1/cards?q=a+b", "/api/v2/c", "/api/v2/special/q"]
)
def test_broker_path_for_inverts_target(table: RouteTable, path: str) -> None:
    t = table.target(path)
    assert table.broker_path_for(t.route, t.url) == path


# ---------------------------------------------------------------- property


def full_decode(s: str) -> str:
    for _ in range(50):
        d = unquote(s)
        if d == s:
            return d
        s = d
    return s


PIECES = st.sampled_from(
    ["/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%25", "%", "%00", "+", "?", "#",
     "mcp", "api", "v2", "special", "a", "x", "é", " ", ";", "%41", "%7e"]
)  # fmt: skip
PATHS = st.one_of(
    st.text(min_size=0, max_size=40).map(lambda s: "/" + s),
    st.lists(st.one_of(PIECES, st.text(max_size=3)), max_size=14).map(lambda xs: "/" + "".join(xs)),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(PATHS)
def test_target_never_escapes_the_upstream_path(path: str) -> None:
    table = RouteTable(ROUTES)
    try:
        t = table.target(path)
    except BrokerError as exc:
        assert exc.code in ("bad_request", "no_route")
        return
    upstream_path = URL(t.route.upstream).raw_path
    sent = t.url.raw_path
    base = upstream_path.rstrip("/")
    assert sent in (upstream_path, base) or sent.startswith(base + "/"), (path, sent)
    assert sent.startswith("/")
    decoded = full_decode(sent)
    segments = re.split(r"[/\\]", decoded)
    assert "." not in segments, (path, sent)
    assert ".." not in segments, (path, sent)
    # the destination host comes from the config, never from the request
    assert (t.url.scheme, t.url.raw_authority) == (
        URL(t.route.upstream).scheme,
        URL(t.route.upstream).raw_authority,
    )
    query = path.partition("?")[2]
    assert t.url.raw_query_string == query
