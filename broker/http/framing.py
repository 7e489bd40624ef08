"""What the broker refuses on top of llhttp, on both sides: agents' requests (read in server.py)
and upstream answers (read in connection.py). docs/framing.md is the table of it.

Owns: the size limits of heads, chunk lines and Content-Length; the one transfer coding taken
(`chunked`, alone) and the content codings an answer may carry; the methods and request targets
the broker reads at all; `BadRequest`, the answer to a request that cannot be read, and turning
what llhttp refused into one; the statuses that never carry a body; reading comma-separated list
fields (Connection). Must never: parse framing itself (llhttp does, driven by the Protocols in
server.py and connection.py), keep state, or know about routes, credentials or policies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import httptools

NO_BODY_STATUS = frozenset({204, 304})

REQUEST_LINE_MAX = 8 * 1024  # allowed on top of limits.max_header_bytes for the request line
ANSWER_HEAD_MAX = 128 * 1024  # status line and fields of one upstream answer
CHUNK_LINE_MAX = 4096  # a chunk-size line with its extensions, either side
CONTENT_LENGTH_DIGITS_MAX = 15  # an answer's; llhttp takes any length that fits 64 bits

# RFC 9110 §9 plus PATCH (RFC 5789): the methods the broker reads at all. Of those, CONNECT (a
# tunnel) and TRACE (an echo of the request, credential included) are never forwarded.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
REFUSED_METHODS = frozenset({"CONNECT", "TRACE"})
# what an upstream answer may be encoded in: bytes the broker cannot decode cannot be scrubbed
CONTENT_CODINGS = frozenset({"gzip", "deflate", "identity"})

# origin-form of VCHARs only (RFC 9112 §3.2.1): no fragment, no raw non-ASCII, no controls
_ORIGIN_FORM = re.compile(r"/[!\"$-~]*")
_METHOD_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")
_METHODS_FORWARDED = "the broker forwards GET, HEAD, POST, PUT, DELETE, OPTIONS and PATCH"


class BadRequest(Exception):
    """A request the broker cannot read: answered with `status` and the connection closed."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def check_method(method: str) -> None:
    if method not in FORWARDED_METHODS:
        if method in REFUSED_METHODS:
            raise BadRequest(f"{method} is not forwarded by the broker", 405, "method_not_allowed")
        raise BadRequest(_METHODS_FORWARDED, 501, "method_not_allowed")


def check_target(target: str) -> None:
    """Refuse a request target the broker will not reason about (SPEC: origin-form VCHARs)."""
    if _ORIGIN_FORM.fullmatch(target) is None:
        if not target.startswith("/"):
            raise BadRequest(
                "absolute-form and asterisk-form request targets are refused; the destination comes "
                "from the broker's config, send a plain path"
            )
        raise BadRequest("the request target must be a path of visible ASCII characters, without a #fragment")
    if "%00" in target:
        raise BadRequest("an encoded NUL (%00) is not allowed in the request target")


def only_chunked(transfer_encodings: list[str]) -> bool:
    """The Transfer-Encoding fields are one saying exactly `chunked`: any other coding, or a
    list, would leave the body's end to a reading the other side may not share."""
    return len(transfer_encodings) == 1 and transfer_encodings[0].lower() == "chunked"


def decodable_coding(content_encodings: list[str]) -> bool:
    """The Content-Encoding fields are one coding the broker decodes (or identity)."""
    return len(content_encodings) == 1 and content_encodings[0].lower() in CONTENT_CODINGS


def is_http09_request(data: bytes) -> bool:
    """`data` begins with a whole request line that names no HTTP version (HTTP/0.9)."""
    line, crlf, _ = data.lstrip(b"\r\n").partition(b"\r\n")
    return bool(crlf) and not line.endswith((b" HTTP/1.1", b" HTTP/1.0"))


def refused_request(exc: httptools.HttpParserError, start: bytes) -> BadRequest:
    """What llhttp refused, as the answer to give: a check of ours raised inside a callback
    comes back as the error's context. `start`: the bytes the message began with, if known."""
    cause = exc.__context__
    if isinstance(cause, BadRequest):
        return cause
    if isinstance(exc, httptools.HttpParserInvalidMethodError) and _METHOD_TOKEN.match(start.lstrip(b"\r\n")):
        # a well-formed token that is no method llhttp knows (or not in upper case): 501
        return BadRequest(_METHODS_FORWARDED, 501, "method_not_allowed")
    if isinstance(exc, httptools.HttpParserCallbackError):
        return BadRequest("the request cannot be read")
    return BadRequest(f"the request is malformed: {exc}")


def tokens(values: Iterable[str]) -> list[str]:
    """The tokens of comma-separated list fields, lower case, empty ones left out."""
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]
