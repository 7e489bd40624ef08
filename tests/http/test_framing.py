"""framing.py alone: the rules both sides apply on top of llhttp, each asserted both ways.

The corpus (test_framing_corpus.py) plays them through a daemon; here each rule is one call, so a
rule loosened or tightened by a change fails here by name.
"""

from __future__ import annotations

import httptools
import pytest

from broker.http import framing
from broker.http.framing import BadRequest


@pytest.mark.parametrize(
    ("method", "status"),
    [("GET", None), ("PATCH", None), ("TRACE", 405), ("CONNECT", 405), ("PROPFIND", 501)],
)
def test_methods(method: str, status: int | None) -> None:
    if status is None:
        framing.check_method(method)
        return
    with pytest.raises(BadRequest) as refused:
        framing.check_method(method)
    assert (refused.value.status, refused.value.code) == (status, "method_not_allowed")


@pytest.mark.parametrize(
    ("target", "ok"),
    [
        ("/a/b?c=d&e=%2F", True),
        ("/", True),
        ("/a#frag", False),
        ("/a%00b", False),
        ("http://elsewhere/a", False),
        ("*", False),
        ("/caf\u00e9", False),
        ("/a b", False),
    ],
)
def test_targets(target: str, ok: bool) -> None:
    if ok:
        framing.check_target(target)
        return
    with pytest.raises(BadRequest) as refused:
        framing.check_target(target)
    assert refused.value.status == 400


@pytest.mark.parametrize(
    ("fields", "ok"),
    [(["chunked"], True), (["Chunked"], True), (["gzip, chunked"], False), (["chunked", "chunked"], False)],
)
def test_only_one_chunked_transfer_coding(fields: list[str], ok: bool) -> None:
    assert framing.only_chunked(fields) is ok


@pytest.mark.parametrize(
    ("fields", "ok"),
    [
        (["gzip"], True),
        (["DEFLATE"], True),
        (["identity"], True),
        (["br"], False),
        ([""], False),
        (["gzip", "gzip"], False),
    ],
)
def test_content_codings_the_broker_decodes(fields: list[str], ok: bool) -> None:
    assert framing.decodable_coding(fields) is ok


def test_http09_request_line() -> None:
    assert framing.is_http09_request(b"GET /\r\n")
    assert not framing.is_http09_request(b"GET / HTTP/1.1\r\nHost: h\r\n")
    assert not framing.is_http09_request(b"GET /")  # not a whole line yet


def test_what_llhttp_refused_becomes_the_answer() -> None:
    def refused(wire: bytes) -> BadRequest:
        parser = httptools.HttpRequestParser(object())
        with pytest.raises(httptools.HttpParserError) as caught:
            parser.feed_data(wire)
        return framing.refused_request(caught.value, wire)

    assert refused(b"FOO / HTTP/1.1\r\n\r\n").status == 501  # a token, not a method llhttp knows
    assert refused(b"G@T / HTTP/1.1\r\n\r\n").status == 400
    assert refused(b"GET / HTTP/1.1\r\nHost : h\r\n\r\n").code == "bad_request"


def test_list_field_tokens() -> None:
    assert framing.tokens(["Keep-Alive, ,Upgrade", "close"]) == ["keep-alive", "upgrade", "close"]
