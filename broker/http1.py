"""HTTP/1.1 syntax read on both sides of the broker: agents' requests (agents.py) and upstream
answers (upstream.py).

Owns: splitting a head's field lines strictly (RFC 9112 §5), comma-separated list tokens
(Connection, Transfer-Encoding), and Content-Length values. Must never: accept a line it did
not parse whole, or a Content-Length whose copies disagree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# one whole field line: a token, a colon, the value after its leading blanks (RFC 9112 §5)
FIELD = re.compile(r"\r\n([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r\n]*)")
HEX = frozenset(b"0123456789abcdefABCDEF")
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, or a trailer line


def field_lines(fields: str, forbidden: re.Pattern[str]) -> list[tuple[str, str]] | None:
    """The (name, value) pairs of `fields` (a head after its first line, each line CRLF-led);
    None when a line is not one whole field line (obs-fold, a space before the colon, a bare CR
    or LF) or holds a character `forbidden` matches."""
    pairs = FIELD.findall(fields)
    lines = fields.count("\r\n")
    if (
        len(pairs) != lines
        or fields.count("\r") != lines
        or fields.count("\n") != lines
        or forbidden.search(fields)
    ):
        return None
    if " \r\n" in fields or "\t\r\n" in fields or fields.endswith((" ", "\t")):
        pairs = [(name, value.rstrip(" \t")) for name, value in pairs]  # rare: trailing blanks
    return pairs


def tokens(values: Iterable[str]) -> list[str]:
    """The tokens of comma-separated list fields, lower case, empty ones left out."""
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def has_token(values: Iterable[str], token: str) -> bool:
    return token in tokens(values)


def content_length(values: list[str]) -> int | None:
    """The length the Content-Length fields say; None when invalid or when copies disagree."""
    if len(values) == 1 and "," not in values[0]:
        length = values[0]
    else:  # repeated: acceptable only when every copy says the same
        distinct = {v.strip() for v in ",".join(values).split(",")}
        length = distinct.pop() if len(distinct) == 1 else ""
    if not (length.isascii() and length.isdigit()) or len(length) > 18:
        return None
    return int(length)
