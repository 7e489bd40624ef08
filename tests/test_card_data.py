"""`card_data: redact`'s masker (broker/policy/card_data.py) on its own: what is card data, its
masks, and that a stream cut anywhere gives what the whole answer gives."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.policy.card_data import BLANKED, MAX_DIGITS, CardMasker, luhn, mask_whole

VISA = "4242424242424242"
AMEX = "378282246310005"
VISA13 = "4222222222222"
MAESTRO19 = "6759649826438453003"  # Luhn-valid 19 digits


def with_check_digit(payload: str) -> str:
    """`payload` and the digit that makes it Luhn-valid."""
    return next(payload + d for d in "0123456789" if luhn((payload + d).encode()))


def streamed(body: bytes, cuts: list[int]) -> bytes:
    masker = CardMasker()
    out, at = [], 0
    for cut in [*sorted(set(cuts)), len(body)]:
        out.append(masker.feed(body[at:cut]))
        at = cut
    out.append(masker.flush())
    return b"".join(out)


def test_the_vectors_are_luhn_valid_and_their_neighbours_are_not() -> None:
    for number in (VISA, AMEX, VISA13, MAESTRO19, with_check_digit("1" * 17)):
        assert luhn(number.encode())
    assert not luhn(b"4242424242424241")


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (VISA, "************4242"),
        ("4242 4242 4242 4242", "**** **** **** 4242"),
        ("4242-4242-4242-4242", "****-****-****-4242"),
        ("3782 822463 10005", "**** ****** *0005"),  # Amex, 4-6-5
        (AMEX, "***********0005"),
        (VISA13, "*********2222"),
        (MAESTRO19, "***************3003"),
        (f"card {VISA}.", "card ************4242."),
        (f"x{VISA}y", "x************4242y"),  # letters around are no shield
        (f"12 {VISA}", "12 ************4242"),  # a 2-digit group does not join it
        (f"{VISA} and {AMEX}", "************4242 and ***********0005"),
    ],
)
def test_card_numbers_keep_their_last_four(text: str, masked: str) -> None:
    assert mask_whole(text.encode()) == masked.encode()


@pytest.mark.parametrize(
    "text",
    [
        "4242424242424241",  # Luhn fails
        "order 1234567890123456 at 1714000000001",  # ids and a timestamp, Luhn fails
        '{"amount_cents": 5000, "id": "c_123", "created": "2026-01-31T10:00:00Z"}',
        with_check_digit("4" * 11),  # 12 digits, Luhn-valid: too short
        with_check_digit("4" * 19),  # 20 digits, Luhn-valid: an id, not a card
        "42 42 42 42 42 42 42 42",  # 16 Luhn-valid digits in pairs: not how cards are printed
        "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
        "4242  4242  4242  4242",  # double spaces end the number
        "1-2-3-4-5-6-7-8-9-0-1-2-3",
    ],
)
def test_what_is_not_a_card_is_left_byte_for_byte(text: str) -> None:
    assert mask_whole(text.encode()) == text.encode()


def test_a_number_inside_a_longer_valid_run_is_masked_but_a_longer_group_is_not() -> None:
    # 4 groups of the 6 are a card (no other 13 to 19 digits of it pass Luhn): only its digits go
    assert mask_whole(b"1111 4242 4242 4242 4242 9999") == b"1111 **** **** **** 4242 9999"
    assert (
        mask_whole(b"a" + with_check_digit("5" * 20).encode()) == b"a" + with_check_digit("5" * 20).encode()
    )


def test_json_stays_valid_strings_and_bare_integers() -> None:
    doc = {"number": VISA, "id": "4242424242424241", "n": int(VISA), "t": 1714000000001, "f": 4.5}
    out = mask_whole(json.dumps(doc).encode())
    got = json.loads(out)
    assert got["number"] == "************4242"
    assert got["n"] == "**********4242"  # a bare integer becomes a string of the same length
    assert (got["id"], got["t"], got["f"]) == ("4242424242424241", 1714000000001, 4.5)
    assert len(out) == len(json.dumps(doc))
    # a float's digits: masked in place (no API sends a card number as a float)
    assert mask_whole(f'{{"x": {VISA}.5}}'.encode()) == b'{"x": ************4242.5}'


def test_numbers_and_keys_inside_escaped_json() -> None:
    inner = {"number": VISA, "n": int(VISA), "cvc": "123", "exp_month": 12, "exp_year": 2030, "brand": "visa"}
    outer = {"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text", "text": json.dumps(inner)}]}}
    raw = json.dumps(outer).encode()
    got = json.loads(mask_whole(raw))
    text = json.loads(got["result"]["content"][0]["text"])
    assert text == {
        "number": "************4242",
        "n": "********4242",
        "cvc": "",
        "exp_month": None,
        "exp_year": None,
        "brand": "visa",
    }
    assert got["id"] == 3


@pytest.mark.parametrize("key", BLANKED)
def test_every_cvv_and_expiry_key_is_blanked_in_any_case(key: str) -> None:
    for name in (key, key.upper()):
        doc = {name: "123", "other": "123", "n": {name: 2030}}
        assert json.loads(mask_whole(json.dumps(doc).encode())) == {
            name: "",
            "other": "123",
            "n": {name: None},
        }


def test_blanked_values_by_type() -> None:
    doc = {
        "cvv": "123",
        "exp": "12/30",
        "expiry": {"month": 12, "year": 2030, "note": "a } in a string"},
        "expiration": [12, 2030],
        "cvc": None,
        "cvc2": True,
        "security_code": 123,
        "exp_year": -2.5e3,
        "expiry_month": "x" * 300,  # longer than any CVV or date: left
        "expirations": "12/30",  # not a blanked key
    }
    raw = json.dumps(doc, indent=2).encode()
    got = json.loads(mask_whole(raw))
    assert got == {
        **doc,
        "cvv": "",
        "exp": "",
        "expiry": None,
        "expiration": None,
        "security_code": None,
        "exp_year": None,
    }


def test_sse_events_are_masked_and_the_rest_kept() -> None:
    data = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"card": VISA, "CVC": "999"}})
    raw = f"event: message\nid: 7\ndata: {data}\n\n: keepalive\n\n".encode()
    out = mask_whole(raw)
    assert out.startswith(b"event: message\nid: 7\ndata: ") and out.endswith(b"\n\n: keepalive\n\n")
    event = json.loads(out.split(b"data: ")[1].split(b"\n")[0])
    assert event["result"] == {"card": "************4242", "CVC": ""}


def test_nothing_but_a_possible_card_is_held_back() -> None:
    masker = CardMasker()
    assert masker.feed(b"data: {}\n\n") == b"data: {}\n\n"  # an event with no digit passes at once
    assert masker.feed(b'data: {"card": "4242 4242') == b'data: {"card": "'
    assert masker.feed(b" 4242 4242") == b""
    assert masker.feed(b'"}\n\n') == b'**** **** **** 4242"}\n\n'
    assert masker.feed(b'{"cvc": "1') == b"{"  # a key whose value has not ended
    assert masker.feed(b'23", "a": 1') == b'"cvc": "", "a": '
    assert masker.feed(b"}") == b"1}"
    assert masker.flush() == b""
    long_digits = b"7" * 10_000  # an over-long run: all but the last 20 digits go on
    assert len(CardMasker().feed(long_digits)) == len(long_digits) - (MAX_DIGITS + 1)
    grouped = CardMasker().feed(b"1234 " * 2000)
    assert len(grouped) >= 5 * 2000 - 2 * MAX_DIGITS
    partial = CardMasker()
    assert partial.feed(b'{"a": "b", "Expiry') == b'{"a": "b", '
    assert partial.flush() == b'"Expiry'  # the end of the answer: nothing more can come


# -- any chunking gives what the whole answer gives

PIECES = [
    VISA,
    "4242 4242 4242 4242",
    "4242-4242-4242-4242",
    AMEX,
    MAESTRO19,
    "4242424242424241",
    "1714000000001",
    with_check_digit("9" * 19),
    "12",
    "0",
    " ",
    "-",
    ".",
    "e",
    '"',
    "\\",
    '\\"',
    ":",
    ", ",
    "{",
    "}",
    "[",
    "]",
    "\n\n",
    "data: ",
    '"cvc": ',
    '"CVV":"12"',
    '\\"exp_month\\": ',
    '\\"12\\"',
    '"expiry": {"m": [1, "}"]}',
    "true",
    "null",
    "x",
]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=24).map("".join).map(str.encode),
    st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_any_chunking_gives_the_whole_answers_masks(body: bytes, cuts: list[int]) -> None:
    assert streamed(body, [c for c in cuts if c < len(body)]) == mask_whole(body)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=12, max_value=18).flatmap(
        lambda n: st.text(alphabet="0123456789", min_size=n, max_size=n)
    ),
    st.sampled_from(["", " ", "-"]),
    st.text(alphabet='ab "{}:,\n-', max_size=20),
    st.text(alphabet='ab "{}:,\n.', max_size=20),
    st.lists(st.integers(min_value=1, max_value=60), max_size=6),
)
def test_a_card_never_passes_whole(payload: str, sep: str, before: str, after: str, cuts: list[int]) -> None:
    number = with_check_digit(payload)  # printed in fours: the last group may be 1 to 4 digits
    printed = sep.join(re.findall(".{1,4}", number)) if sep else number
    body = f"{before}{printed}{after}".encode()
    out = streamed(body, [c for c in cuts if c < len(body)])
    assert re.sub(r"[^0-9]", "", out.decode()) == number[-4:]
    assert len(out) == len(body)  # masks keep lengths, a bare JSON integer's quotes too


# Big integers as object values (where a card number becomes a string) and in strings; a bare
# one in an array or at the top gets `*`s like in prose, which no JSON parser would take.
JSON_DOCS = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**12), max_value=10**12)
    | st.text(max_size=12)
    | st.integers(min_value=0).map(str)
    | st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(JSON_DOCS)
def test_json_without_card_data_is_untouched_and_stays_json(doc: object) -> None:
    raw = json.dumps(doc).encode()
    keys = {k.lower() for k in BLANKED}
    has_key = any(k.lower() in keys for k in re.findall(r'"([^"\\]*)":', raw.decode()))
    out = mask_whole(raw)
    json.loads(out)  # whatever it held, it still parses
    if not has_key and not re.search(rb"[0-9]{13}", raw):
        assert out == raw
