"""`card_data: redact`: card numbers, CVVs and expiry dates taken out of answers as they stream.

A `CardMasker` is fed one answer's bytes (after the secret scrubber) and gives them back with:

- every card number masked to its last 4: a Luhn-valid run of 13 to 19 digits, written whole or
  grouped by single spaces or dashes as cards are printed (`4242 4242 4242 4242`,
  `3782-822463-10005`), each masked digit a `*`, separators kept, so the length is the same and
  a number in a JSON string (or in JSON escaped inside a string, as MCP tool results carry it)
  stays valid. A group of 1 or 2 digits is only ever a number's last (`4222 2222 2222 2`); a
  group of more than 19 digits is not a card (an id). A bare JSON integer after a key
  (`"n": 4242424242424242`, also `\\"n\\": …` escaped) becomes a string of the same length
  (`"**********4242"`), so the document still parses; anywhere else (an array, a float's digits)
  a bare number gets `*`s like any other: safe first, valid JSON second.
- CVV and expiry values blanked, for the keys in `BLANKED` (any case): a string becomes `""`, a
  number, object or array `null`; `true`/`false`/`null` stay. In JSON, in SSE `data:` lines, and
  in JSON escaped inside a JSON string (`\\"cvc\\": \\"123\\"`). Scanned on the bytes, so nothing
  else in the answer changes (no re-serialising); a value longer than the bounds below is left.

Both work on the byte stream with the same hold-back: at a chunk's end only a tail that could
still become card data waits for the next chunk (a trailing run of digits, at most 19 of them
with their separators, or 20 of an over-long one; a key whose value has not ended, at most
`MAX_CONTAINER` bytes), so a number split across chunks is masked and SSE events pass as they
arrive. A whole answer gives what the same bytes give streamed in any chunking.

Owns: what counts as card data in an answer and its masks. Must never: let a Luhn-valid number
through whole, whatever the chunking; change a byte that is not card data; hold back more than a
bounded tail that could still be card data.
"""

from __future__ import annotations

import re

BLANKED = (
    "cvv", "cvc", "cvv2", "cvc2", "security_code", "securityCode", "card_verification",
    "exp", "expiry", "expiration", "exp_month", "exp_year", "expMonth", "expYear",
    "expiry_month", "expiry_year", "expiration_date", "expirationDate",
)  # fmt: skip
_KEYS = frozenset(k.lower().encode() for k in BLANKED)
MIN_DIGITS, MAX_DIGITS = 13, 19
MIN_GROUP = 3  # printed cards group 3 to 6 digits: "1 2 3 …" or "12 34 …" is not a card
MAX_STRING = 256  # a blanked string value longer than this is left (it is not a CVV or a date)
MAX_CONTAINER = 4096  # the same for an object or array under a blanked key
_WS = 16  # whitespace around a key's colon, at most
_HEAD_TAIL = 2 + max(len(k) for k in _KEYS) + 2 + _WS + 1 + _WS + 8  # the longest partial key

_SEP = b" -"
_FLAT = bytes.maketrans(b"0123456789", b"0000000000")
_CANDIDATE = re.compile(rb"000[0 -]{10,}")  # on the digits flattened: where a card number may be
_GROUP = re.compile(rb"[0-9]+")
# A blanked key and its colon: `"cvv": ` in JSON, `\"cvv\": ` in JSON escaped inside a string
_KEY_ALT = b"|".join(re.escape(k) for k in sorted(_KEYS, key=len, reverse=True))
_HEAD = re.compile(rb'(?<!\\)(\\?)"(' + _KEY_ALT + rb')\1"[ \t\r\n]{0,16}:[ \t\r\n]{0,16}')  # lower case
_KEY_STARTS = (b'"cv', b'"sec', b'"card_v', b'"exp')  # found with bytes.find, fast: every key
_HEAD_REST = re.compile(rb"[ \t\r\n]{0,16}(?::[ \t\r\n]{0,16})?")
_WORD = re.compile(rb"[A-Za-z0-9_]*")
_NUMBER = re.compile(rb"-?[0-9]{1,40}(?:\.[0-9]{1,40})?(?:[eE][+-]?[0-9]{1,40})?(?![0-9.eE+-])")
_NUMBER_START = re.compile(rb"-?[0-9.eE+-]{0,124}")
# a string value: plain, or escaped inside a string (`\"` … `\"`, its own escapes doubled)
_STR = (
    re.compile(rb'"(?:[^"\\]|\\.){0,%d}"' % MAX_STRING, re.S),
    re.compile(rb'\\"(?:[^"\\]|\\[/bfnrtu]|\\\\(?:\\["\\/]|[^"\\])){0,%d}\\"' % MAX_STRING),
)
_STR_START = (
    re.compile(rb'"(?:[^"\\]|\\.){0,%d}\\?' % MAX_STRING, re.S),
    re.compile(rb'\\(?:"(?:[^"\\]|\\[/bfnrtu]|\\\\(?:\\["\\/]|[^"\\])){0,%d}\\{0,3})?' % MAX_STRING),
)
# tokens inside an object or array: strings (skipped whole), an unclosed quote, brackets; the
# escaped form also has the outer string's other escapes, and its end (a bare `"`: malformed)
_TOKENS = (
    re.compile(rb'"(?:[^"\\]|\\.)*"|"|[{}\[\]]', re.S),
    re.compile(rb'\\"(?:[^"\\]|\\[/bfnrtu]|\\\\(?:\\["\\/]|[^"\\]))*\\"|\\"|\\.|"|[{}\[\]]', re.S),
)
_BLANK = ((b'""', b"null"), (b'\\"\\"', b"null"))
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)
_PARTIAL = -1  # a value that may still end in the next chunk
_CTX = 32  # bytes of what went out kept for looking behind (digits blotted out)
_BLOT = bytes.maketrans(b"0123456789", b"xxxxxxxxxx")


def luhn(digits: bytes) -> bool:
    """The Luhn check (ISO/IEC 7812) on ASCII digits."""
    total = 0
    for i, c in enumerate(reversed(digits)):
        total += _DOUBLED[c - 48] if i & 1 else c - 48
    return total % 10 == 0


class CardMasker:
    """Masks card data in one answer fed chunk by chunk; a fresh one per answer (the class is
    the factory a `Verdict.answer` names)."""

    __slots__ = ("_ctx", "_held", "_held_out")

    def __init__(self) -> None:
        self._ctx = b""  # the last bytes that went out, as sent by the upstream, digits blotted
        self._held = b""  # the tail kept back, as sent by the upstream
        self._held_out: bytes | None = None  # that tail with the masks found in it so far, if any

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        return self._scan(self._ctx + self._held + chunk, final=False)

    def flush(self) -> bytes:
        if not self._held:
            return b""
        return self._scan(self._ctx + self._held, final=True)

    def _scan(self, text: bytes, final: bool) -> bytes:
        base = len(self._ctx)
        stars, bare = _card_numbers(text, base, final)
        edits, hold = _blank_keys(text, base, final)
        if not final:
            hold = min(hold, _digits_hold(text, base))
            for key, _, end, _ in edits:
                if key < hold < end:  # a key whose value ends in the tail: found again next time
                    hold = key
            edits = [e for e in edits if e[2] <= hold]
        self._ctx = text[max(0, hold - _CTX) : hold].translate(_BLOT)
        if not (stars or bare or edits or self._held_out is not None):
            self._held = text[hold:]  # nothing to mask: the usual chunk
            return text[base:hold]
        out = bytearray(text[base:])
        if self._held_out is not None:
            out[: len(self._held_out)] = self._held_out  # masks found in the tail last time
        for p in stars:
            out[p - base] = 42  # "*"
        for p, mask in bare:
            out[p - base : p - base + len(mask)] = mask
        rel = hold - base
        self._held = text[hold:]
        tail = bytes(out[rel:])
        self._held_out = tail if tail != self._held else None
        if not edits:
            return bytes(out[:rel])
        parts: list[bytes | bytearray] = []
        at = 0
        for _, start, end, blank in edits:
            parts += (out[at : start - base], blank)
            at = end - base
        parts.append(out[at:rel])
        return b"".join(parts)


def mask_whole(body: bytes) -> bytes:
    """A whole answer masked: what a CardMasker fed `body` in any chunks, then flushed, gives."""
    return CardMasker()._scan(body, final=True)


# -- card numbers


def _card_numbers(text: bytes, base: int, final: bool) -> tuple[set[int], list[tuple[int, bytes]]]:
    """The card numbers settled in text[base:]: the digits to mask with `*`, and the bare JSON
    integers to turn into strings (position, same-length mask)."""
    stars: set[int] = set()
    bare: list[tuple[int, bytes]] = []
    n = len(text)
    # a window's first group has 3 digits and 10 more digits or separators follow: a literal
    # prefix on the digits flattened to "0" is what lets `re` skip through a chunk quickly
    for cand in _CANDIDATE.finditer(text.translate(_FLAT), base):
        last_open = not final and cand.end() == n
        groups = [g.span() for g in _GROUP.finditer(text, cand.start(), cand.end())]
        undecided = False  # whether the last run is one group or more
        if last_open and 48 <= text[n - 1] <= 57:
            whole = groups.pop()  # still being written: not a whole group yet
            if not groups:
                continue
            if whole[0] - groups[-1][1] == 1:
                groups.append((whole[0], whole[0]))  # the last run has another group: mark it
        else:
            undecided = last_open and n - groups[-1][1] == 1  # one separator: more may follow
        run: list[tuple[int, int]] = []
        for k, g in enumerate(groups):
            run.append(g)
            if k + 1 < len(groups) and groups[k + 1][0] - g[1] == 1:
                continue  # one separator: the same run
            _run_numbers(text, base, run, undecided and k + 1 == len(groups), stars, bare)
            run = []
    return stars, bare


def _run_numbers(
    text: bytes,
    base: int,
    run: list[tuple[int, int]],
    undecided: bool,
    stars: set[int],
    bare: list[tuple[int, bytes]],
) -> None:
    """The masks of one run of digit groups joined by single separators (an empty group at the
    end stands for one still being written). `undecided`: one separator ends the text."""
    if len(run) == 1:  # one group: a number written whole, the common case
        if undecided:
            return  # a separator and more groups may follow, or not: decided next time
        start, end = run[0]
        if not MIN_DIGITS <= end - start <= MAX_DIGITS or not luhn(text[start:end]):
            return
        level = _bare_level(text, start)
        if text[start - 1 : start] == b"-":  # a negative integer: its sign goes in the string
            start = start - 1 if start > base else -1
        if level is None or start < 0 or (end < len(text) and text[end] in b".eE"):  # text, a float
            stars.update(range(run[0][0], end - 4))
        else:
            quote = b'"' if level == 0 else b'\\"'
            stars_n = end - start - 4 - 2 * len(quote)
            bare.append((start, quote + b"*" * stars_n + text[end - 4 : end] + quote))
        return
    for i in range(len(run)):
        total = 0
        window: list[tuple[int, int]] = []
        for gs, ge in run[i:]:
            short = ge - gs < MIN_GROUP  # only as a number's last group ("4222 2222 2222 2")
            if short and not window:
                break
            total += ge - gs
            if total > MAX_DIGITS:
                break
            window.append((gs, ge))
            if total >= MIN_DIGITS and luhn(b"".join(text[s:e] for s, e in window)):
                stars.update([p for s, e in window for p in range(s, e)][:-4])
            if short:
                break


def _bare_level(text: bytes, start: int) -> int | None:
    """0 or 1 when the run at `start` is a JSON value after a key (`"k": ` or escaped `\\"k\\": `),
    maybe negative, None when it is anything else (in a string, in prose)."""
    i = start - 1
    if i >= 0 and text[i] == 45:  # "-"
        i -= 1
    while i >= 0 and start - i <= _WS and text[i] in b" \t\r\n":
        i -= 1
    if i < 1 or text[i] != 58 or text[i - 1] != 34:  # ':' after '"'
        return None
    j = i - 2
    while j >= 0 and text[j] == 92:  # backslashes before that quote
        j -= 1
    slashes = i - 2 - j
    if slashes % 2 == 0:
        return 0
    return 1 if slashes == 1 else None


def _digits_hold(text: bytes, base: int) -> int:
    """Where the tail that could still be (part of) a card number starts: a trailing run's last
    groups holding at most MAX_DIGITS digits (and a sign before them), or the last 20 digits of
    an over-long group."""
    n = len(text)
    k = n - 1
    if k < base:
        return n
    if text[k] in _SEP:
        if k - 1 < base or not 48 <= text[k - 1] <= 57:
            return k if text[k] == 45 else n  # a "-" alone: maybe a negative number's sign
        k -= 1
    elif not 48 <= text[k] <= 57:
        return n
    last_open = k == n - 1  # the last group may still grow
    hold, total = n, 0
    while True:
        j = k
        while j >= base and 48 <= text[j] <= 57 and k - j <= MAX_DIGITS:
            j -= 1
        total += k - j
        if total > MAX_DIGITS:
            if last_open and hold == n:  # an over-long group: keep enough to know it next time
                return n - (MAX_DIGITS + 1)
            return hold
        hold = j + 1
        if j - 1 >= base and text[j] in _SEP and 48 <= text[j - 1] <= 57:
            k = j - 1
            continue
        if j >= base and text[j] == 45:  # the run's sign: a bare JSON integer is quoted with it
            return j
        return hold


# -- CVV and expiry keys


def _blank_keys(text: bytes, base: int, final: bool) -> tuple[list[tuple[int, int, int, bytes]], int]:
    """The blanked values (key start, value start, value end, replacement) found in text[base:],
    and where a key whose value may still be arriving starts (len(text): none)."""
    n = len(text)
    edits: list[tuple[int, int, int, bytes]] = []
    pos = base
    low = text.lower()  # the same positions, any case
    spots = []
    for start in _KEY_STARTS:
        i = low.find(start, base)
        while i != -1:
            spots.append(i - 1 if i > base and low[i - 1] == 92 else i)  # escaped: from its "\"
            i = low.find(start, i + 1)
    spots.sort()
    for spot in spots:
        if spot < pos:
            continue
        m = _HEAD.match(low, spot)
        if m is None:
            continue
        level = 1 if m.group(1) else 0
        end = _value_end(text, m.end(), level, final)
        if end == _PARTIAL:
            return edits, m.start()
        if end is None:
            continue
        value = text[m.end() : end]
        if value[:1] in b'"\\':
            edits.append((m.start(), m.end(), end, _BLANK[level][0]))
        elif value not in (b"true", b"false", b"null"):
            edits.append((m.start(), m.end(), end, _BLANK[level][1]))
        pos = end
    if final:
        return edits, n
    lo = max(base, pos, n - _HEAD_TAIL)
    # a key cut by the end has its opening quote last, or the one before its closing quote
    last = text.rfind(b'"', lo)
    spots = [text.rfind(b'"', lo, last), last] if last != -1 else []
    if text.endswith(b"\\"):
        spots.append(n - 1)  # maybe the "\" of an escaped key's opening quote
    for spot in spots:
        if spot > lo and text[spot - 1] == 92 and text[spot] == 34:  # '\"': an escaped key
            spot -= 1
        if spot >= lo and text[spot - 1 : spot] != b"\\" and _is_head_start(text[spot:]):
            return edits, spot
    return edits, n


def _value_end(text: bytes, v: int, level: int, final: bool) -> int | None:
    """The end of the JSON value at `v`; None: not a value to blank; _PARTIAL: it may still end."""
    n = len(text)
    if v >= n:
        return None if final else _PARTIAL
    c = text[v]
    if c == 34 or c == 92:  # '"' or '\'
        m = _STR[level].match(text, v)
        if m is not None:
            return m.end()
        if not final and _STR_START[level].fullmatch(text, v) is not None:
            return _PARTIAL
        return None
    if c == 123 or c == 91:  # '{' or '['
        return _container_end(text, v, level, final)
    if c in b"tfn":
        for word in (b"true", b"false", b"null"):
            if text.startswith(word, v):
                return v + len(word)
            if not final and n - v < len(word) and word.startswith(text[v:]):
                return _PARTIAL
        return None
    m = _NUMBER.match(text, v)
    if m is not None and (final or m.end() < n):
        return m.end()
    if not final and n - v < 128 and _NUMBER_START.fullmatch(text, v) is not None:
        return _PARTIAL
    return None


def _container_end(text: bytes, v: int, level: int, final: bool) -> int | None:
    n = len(text)
    limit = min(n, v + MAX_CONTAINER)
    depth = 0
    unclosed = b'"' if level == 0 else b'\\"'
    for tok in _TOKENS[level].finditer(text, v, limit):
        t = tok.group()
        if t == b"{" or t == b"[":
            depth += 1
        elif t == b"}" or t == b"]":
            depth -= 1
            if depth == 0:
                return tok.end()
        elif t == unclosed:
            break  # a string that does not end before the limit
        elif t == b'"':
            return None  # escaped JSON: its outer string ended first (malformed)
    if not final and limit == n and n < v + MAX_CONTAINER:
        return _PARTIAL
    return None


def _is_head_start(tail: bytes) -> bool:
    """Whether `tail` (from a quote to the end) is the start of a blanked key and its colon."""
    esc = tail[:1] == b"\\"
    rest = tail[1:] if esc else tail
    if not rest:
        return esc
    rest = rest[1:]  # the quote
    word = _WORD.match(rest)
    assert word is not None
    key = word.group().lower()
    rest = rest[word.end() :]
    if not rest:
        return any(k.startswith(key) for k in _KEYS)
    if key not in _KEYS:
        return False
    close = b'\\"' if esc else b'"'
    if len(rest) < len(close):
        return close.startswith(rest)
    if not rest.startswith(close):
        return False
    return _HEAD_REST.fullmatch(rest, len(close)) is not None
