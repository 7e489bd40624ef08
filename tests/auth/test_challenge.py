"""broker/auth/oauth/challenge.py: WWW-Authenticate (RFC 9110 §11.6.1, RFC 6750 §3), including
what a hostile or broken upstream might send."""

from __future__ import annotations

import time

import pytest

from broker.auth.oauth.challenge import (
    MAX_CHALLENGES,
    MAX_SCOPES,
    challenges,
    insufficient_scope,
    parse_challenges,
)


def test_rfc6750_examples() -> None:
    (c,) = parse_challenges('Bearer realm="example"')
    assert (c.scheme, c.params) == ("bearer", {"realm": "example"})
    (c,) = parse_challenges(
        'Bearer realm="example", error="invalid_token",\t error_description="The access token expired"'
    )
    assert c.params == {
        "realm": "example",
        "error": "invalid_token",
        "error_description": "The access token expired",
    }
    assert insufficient_scope(['Bearer error="insufficient_scope", scope="a b"']) == {"a", "b"}


@pytest.mark.parametrize(
    "header, wanted",
    [
        ('Bearer error="insufficient_scope", scope="a b"', {"a", "b"}),
        ('bearer ERROR="insufficient_scope",SCOPE="x"', {"x"}),  # names and schemes are case-blind
        ("Bearer error=insufficient_scope, scope=one", {"one"}),  # token values, not only quoted
        ('Bearer error = "insufficient_scope" , scope = "a  b"', {"a", "b"}),  # BWS, doubled SP
        ('Bearer error="insufficient_scope"', set()),  # no scope named
        ('Bearer scope="a b", error="insufficient_scope"', {"a", "b"}),  # any order
        # several challenges in one header: Basic's realm does not leak into Bearer
        ('Basic realm="x", Bearer error="insufficient_scope", scope="cards:write"', {"cards:write"}),
        (
            'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple", '
            'Bearer error="insufficient_scope", scope="z"',
            {"z"},
        ),
        ('DPoP abc123==, Bearer error="insufficient_scope", scope="t"', {"t"}),  # a token68 first
        ('Bearer error="insufficient_scope", scope="a \\"b\\" c"', {"a", "c"}),  # '"' is no scope char
        ('Bearer error="insufficient_scope", scope="ok ba\\\\d"', {"ok"}),  # nor is a backslash
        ('Bearer error="insufficient_scope", scope="a", scope="evil"', {"a"}),  # a repeat: the first
        ('Bearer error="invalid_token", Bearer error="insufficient_scope", scope="s"', {"s"}),
    ],
)
def test_step_up_scopes(header: str, wanted: set[str]) -> None:
    assert insufficient_scope([header]) == wanted


@pytest.mark.parametrize(
    "header",
    [
        "",
        ",,, ,",
        "Bearer",
        'Bearer error="invalid_token"',
        'Basic error="insufficient_scope", scope="a"',  # not a Bearer challenge
        'Bearer error="insufficient_scope',  # unterminated: nothing of it is believed
        'Bearer error="insufficient_scope\\',
        'Bearer error=, scope="a"',
        'Bearer error="insufficient_scope"\r\nX-Injected: 1',  # only up to the fault... see below
        '"Bearer" error="insufficient_scope"',
        "=== error=insufficient_scope",
        'Bearer realm="a" error="insufficient_scope"',  # no comma between params: a fault
        'Bearer error="insufficient_scope\x00", scope="a"',
        "Bearer xyz=",  # a token68, not a param
    ],
)
def test_malformed_or_other_headers_ask_for_nothing(header: str) -> None:
    found = insufficient_scope([header])
    if header.startswith('Bearer error="insufficient_scope"\r\n'):
        assert found == set()  # the challenge itself was well formed before the CRLF
    else:
        assert found is None


def test_several_header_lines_are_read_in_order() -> None:
    assert insufficient_scope(['Basic realm="x"', 'Bearer error="insufficient_scope", scope="q"']) == {"q"}
    assert [c.scheme for c in challenges(['Basic realm="x"', "Negotiate abc=", "Bearer"])] == [
        "basic",
        "negotiate",
        "bearer",
    ]


def test_hostile_sizes_are_bounded_and_fast() -> None:
    huge_scope = " ".join(f"s{i}" for i in range(10_000))
    found = insufficient_scope([f'Bearer error="insufficient_scope", scope="{huge_scope}"'])
    assert found is not None and len(found) <= MAX_SCOPES
    many = ", ".join(f"S{i} realm=x" for i in range(5000)) + ', Bearer error="insufficient_scope"'
    assert len(challenges([many] * 10)) <= MAX_CHALLENGES
    started = time.monotonic()
    for bad in ['Bearer a="' + "\\" * 100_000, "Bearer " + "a=b, " * 100_000, "," * 1_000_000, '"' * 100_000]:
        parse_challenges(bad)
    assert time.monotonic() - started < 1.0
