"""broker/scrub.py: secrets masked in text and in streamed bodies, even split across chunks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.scrub import MIN_SECRET_LEN, SecretSet, StreamScrubber, mask_for
from tests.conftest import LIVE_KEY, TEST_KEY

KEY = TEST_KEY.encode()
ACS = "acs_FAKEclientSecret0123456789abcdef"
TOKEN = "eyJhbGciOiJFUzI1NiJ9.FAKEaccess.token-value"


def secrets(*values: str) -> SecretSet:
    s = SecretSet()
    s.add(*values)
    return s


def run(scrubber: StreamScrubber, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    outs = [scrubber.feed(c) for c in chunks]
    return outs, scrubber.flush()


def assert_clean(out: bytes, *values: bytes) -> None:
    for v in values:
        assert v not in out
        assert v[8:] not in out  # not even the part after sk_test_


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize("n", [8, 9, 10, 11, 36, 200])
def test_mask_has_the_secret_length_and_none_of_its_bytes(n: int) -> None:
    value = bytes(range(65, 65 + 26)) * 8
    value = value[:n]
    m = mask_for(value)
    assert len(m) == n
    assert value not in m
    if n >= 10:
        assert m.startswith(b"[REDACTED") and m.endswith(b"]")


# ---------------------------------------------------------------- whole bodies


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([KEY, ACS.encode(), KEY[:12], ACS.encode()[5:], b"sk_", b'{"a": 1}', b"\n", b"x"]),
        max_size=12,
    )
)
def test_scrub_whole_is_a_scrubber_fed_the_body_at_once(pieces: list[bytes]) -> None:
    s = secrets(TEST_KEY, ACS)
    body = b"".join(pieces)
    outs, tail = run(s.scrubber(), [body])
    out = s.scrub_whole(body)
    assert out == b"".join(outs) + tail
    assert len(out) == len(body)
    assert KEY not in out and ACS.encode() not in out  # pieces of them may stay: they are no secret


# ---------------------------------------------------------------- split secrets


def test_secret_split_at_every_position_across_two_chunks() -> None:
    s = secrets(TEST_KEY)
    body = b'{"error": "bad key ' + KEY + b'", "n": 1}'
    start = body.index(KEY)
    for cut in range(len(body) + 1):
        outs, tail = run(s.scrubber(), [body[:cut], body[cut:]])
        out = b"".join(outs) + tail
        assert len(out) == len(body), cut
        assert_clean(out, KEY)
        assert out == body[:start] + mask_for(KEY) + body[start + len(KEY) :], cut


def test_secret_split_at_every_pair_of_positions_across_three_chunks() -> None:
    s = secrets(TEST_KEY)
    body = b"data: " + KEY + b"\n\n"
    expected = b"data: " + mask_for(KEY) + b"\n\n"
    for i, j in itertools.combinations_with_replacement(range(len(body) + 1), 2):
        outs, tail = run(s.scrubber(), [body[:i], body[i:j], body[j:]])
        out = b"".join(outs) + tail
        assert out == expected, (i, j)
        assert tail == b""  # the body ends in an SSE event end: nothing left to flush


def test_secret_fed_one_byte_at_a_time() -> None:
    s = secrets(TEST_KEY)
    body = b"x" + KEY + b"y" + KEY
    outs, tail = run(s.scrubber(), [bytes([b]) for b in body])
    out = b"".join(outs) + tail
    assert out == b"x" + mask_for(KEY) + b"y" + mask_for(KEY)
    for piece in outs:  # no single emitted piece carries even a long run of the key
        assert KEY[8:16] not in piece


def test_no_secrets_means_pass_through() -> None:
    sc = SecretSet().scrubber()
    assert sc.feed(b"sk_test_") == b"sk_test_"
    assert sc.flush() == b""


# ---------------------------------------------------------------- holding back


def test_possible_secret_start_is_held_then_released_unchanged() -> None:
    sc = secrets(TEST_KEY).scrubber()
    first = sc.feed(b"hello " + KEY[:12])
    assert first == b"hello "
    assert sc.flush() == KEY[:12]
    assert sc.flush() == b""


def test_held_prefix_released_when_text_diverges() -> None:
    sc = secrets(TEST_KEY).scrubber()
    out = sc.feed(b"abc " + KEY[:-1])
    out += sc.feed(b"!")  # the last byte differs: it was never the key
    assert out == b"abc " + KEY[:-1] + b"!"
    assert sc.flush() == b""


def test_only_a_real_prefix_is_held() -> None:
    sc = secrets(TEST_KEY).scrubber()
    assert sc.feed(b"the sk_tesX is not it") == b"the sk_tesX is not it"
    assert sc.feed(b"ends with s") == b"ends with "  # "s" could start the key
    assert sc.feed(b"q") == b"sq"


def test_sse_event_end_is_emitted_whole() -> None:
    sc = secrets(TEST_KEY, ACS).scrubber()
    event = b'event: message\ndata: {"jsonrpc": "2.0", "id": 1, "result": {}}\n\n'
    assert sc.feed(event) == event
    assert sc.feed(b"data: sk_te") == b"data: "
    # the next chunk closes the event: the held bytes and the chunk come out together
    assert sc.feed(b"a\n\n") == b"sk_tea\n\n"
    assert sc.flush() == b""


def test_sse_event_with_secret_is_masked_and_not_held() -> None:
    sc = secrets(TEST_KEY).scrubber()
    out = sc.feed(b"data: " + KEY[:5])
    out += sc.feed(KEY[5:] + b"\n\n")
    assert out == b"data: " + mask_for(KEY) + b"\n\n"
    assert sc.flush() == b""


# ---------------------------------------------------------------- several secrets


def test_multiple_secrets_masked_in_one_stream() -> None:
    s = secrets(TEST_KEY, ACS, TOKEN)
    body = b"|".join(v.encode() for v in (TOKEN, TEST_KEY, ACS, TEST_KEY))
    for cut in range(0, len(body) + 1, 3):
        outs, tail = run(s.scrubber(), [body[:cut], body[cut:]])
        out = b"".join(outs) + tail
        assert len(out) == len(body)
        assert out.count(b"|") == 3
        for v in (TEST_KEY, ACS, TOKEN):
            assert v.encode() not in out


def test_secrets_sharing_a_prefix() -> None:
    short = "sk_test_FAKEkey01"
    long_ = TEST_KEY  # starts with `short`
    s = secrets(short, long_)
    body = b"a " + long_.encode() + b" b " + short.encode() + b" c"
    for cut in range(len(body) + 1):
        outs, tail = run(s.scrubber(), [body[:cut], body[cut:]])
        out = b"".join(outs) + tail
        assert len(out) == len(body)
        assert short.encode() not in out, cut
        assert out.startswith(b"a ") and out.endswith(b" c")


def test_prefix_of_one_secret_completing_another() -> None:
    a = "abcdefgh-XYZ1"
    b = "abcdefgh-QRS2"
    s = secrets(a, b)
    sc = s.scrubber()
    assert sc.feed(b"> abcdefgh-") == b"> "
    out = sc.feed(b"QRS2 <")
    assert out == mask_for(b.encode()) + b" <"
    assert sc.flush() == b""


def test_self_overlapping_secret() -> None:
    secret = "aaaaaaab"
    s = secrets(secret)
    body = b"aaaaaaaaaaab aab"
    expected = body.replace(secret.encode(), mask_for(secret.encode()))
    for cut in range(len(body) + 1):
        outs, tail = run(s.scrubber(), [body[:cut], body[cut:]])
        assert b"".join(outs) + tail == expected, cut


# ---------------------------------------------------------------- SecretSet


def test_secret_set_ignores_short_empty_and_repeated_values() -> None:
    s = SecretSet()
    s.add(None, "", "short", "x" * (MIN_SECRET_LEN - 1))
    assert len(s) == 0
    s.add(TEST_KEY, TEST_KEY)
    s.add(TEST_KEY)
    assert len(s) == 1
    assert s.redact(f"xx{TEST_KEY}yy") == "xx[REDACTED]yy"
    assert s.redact("sk_test_ only") == "sk_test_ only"
    assert s.redact("short is fine") == "short is fine"


def test_value_added_later_is_masked_by_new_scrubbers_and_redact() -> None:
    s = secrets(TEST_KEY)
    s.add(TOKEN)
    assert len(s) == 2
    sc = s.scrubber()
    out = sc.feed(TOKEN.encode()[:7]) + sc.feed(TOKEN.encode()[7:] + b"\n") + sc.flush()
    assert out == mask_for(TOKEN.encode()) + b"\n"
    assert TOKEN not in s.redact(f"t={TOKEN}")


def test_redact_masks_held_values() -> None:
    s = secrets(TOKEN, "plain-held-value-123")
    text = f"Authorization: Bearer {TOKEN}; other=plain-held-value-123; end"
    out = s.redact(text)
    assert TOKEN not in out
    assert "plain-held-value-123" not in out
    assert out.count("[REDACTED]") == 2
    assert out.startswith("Authorization: Bearer ") and out.endswith("; end")


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        (f"key={LIVE_KEY}", LIVE_KEY[8:]),
        (f"key={TEST_KEY}", TEST_KEY[8:]),
        (f'{{"client_secret": "{ACS}"}}', ACS[4:]),
        ("bearer sk_test_abcd", "abcd"),
        ("sk_live_Zz-9_x and more", "Zz-9_x"),
        ("(acs_0123456789)", "0123456789"),
    ],
)
def test_redact_masks_secret_shaped_values_not_held(text: str, gone: str) -> None:
    out = SecretSet().redact(text)
    assert gone not in out
    assert "[REDACTED]" in out


@pytest.mark.parametrize("text", ["sk_test_", "tasks and access", "sk_other_abcdef", "no secrets here"])
def test_redact_leaves_ordinary_text(text: str) -> None:
    assert SecretSet().redact(text) == text


def test_redact_with_held_value_that_is_also_secret_shaped() -> None:
    s = secrets(TEST_KEY)
    out = s.redact(f"a {TEST_KEY} b {LIVE_KEY} c")
    assert TEST_KEY[8:] not in out
    assert LIVE_KEY[8:] not in out
    assert out.startswith("a ") and out.endswith(" c")


# ---------------------------------------------------------------- property


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    parts = draw(st.lists(st.binary(max_size=40), min_size=1, max_size=6))
    # bytes that look like the start of the key make the hold-back logic work hardest
    alphabet = st.sampled_from([b"s", b"sk_", b"sk_test_", KEY[:20], b"\n\n", b"x"])
    noise = draw(st.lists(alphabet, max_size=4))
    pieces: list[bytes] = []
    for i, p in enumerate(parts):
        pieces.append(p)
        if i < len(noise):
            pieces.append(noise[i])
        if draw(st.booleans()):
            pieces.append(KEY)
    pieces.append(KEY if draw(st.booleans()) else b"")
    data = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0, *cuts, len(data)]
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    return data, chunks


@settings(max_examples=200, deadline=None)
@given(streams())
def test_chunked_output_equals_one_shot_and_has_no_secret(stream: tuple[bytes, list[bytes]]) -> None:
    data, chunks = stream
    s = secrets(TEST_KEY)

    one = s.scrubber()
    whole = one.feed(data) + one.flush()

    sc = s.scrubber()
    outs, tail = run(sc, chunks)
    joined = b"".join(outs) + tail

    assert joined == whole
    assert len(joined) == len(data)
    assert KEY not in joined
    assert whole == data.replace(KEY, mask_for(KEY))


def test_shape_redaction_after_underscore_but_not_inside_words() -> None:
    s = SecretSet()
    assert "sk_live_ABCDEFGH" not in s.redact("x_sk_live_ABCDEFGH")
    assert s.redact("task_test_1234567") == "task_test_1234567"


HELD_OR_SHAPED = ["", TEST_KEY, "sk_live_abcd1234", "acs_zzzz9"]


@given(st.text(max_size=60), st.text(max_size=60), st.sampled_from(HELD_OR_SHAPED))
def test_may_hold_is_false_only_when_redact_changes_nothing(before: str, after: str, middle: str) -> None:
    """The one look response headers get before any per-value redaction: never a false 'no'."""
    s = SecretSet()
    s.add(TEST_KEY)
    text = before + middle + after
    if not s.may_hold(text):
        assert s.redact(text) == text
    if middle:
        assert s.may_hold(text)
    assert not s.may_hold("application/json; charset=utf-8\nMon, 30 Nov 2026 09:01:27 GMT")
