"""Redaction of secret values: in text (logs, headers, errors) and in streamed bodies.

Owns: the set of secret values the broker currently holds (`SecretSet`) and the streaming
scrubber that masks them in response bodies even when one is split across chunks. A body
mask has the secret's exact length, so a Content-Length stays true. Must never: log, store
or return the values it holds; hold back body bytes that cannot start a secret (SSE events
must pass as they arrive).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable

# Anything shaped like an AgentCard secret, whether or not we hold it: belt and braces for logs.
SECRET_SHAPE = re.compile(r"(?<![A-Za-z0-9])(sk_(?:test|live)_|acs_)[A-Za-z0-9_\-]{4,}")


def redact_shapes(text: str) -> str:
    """Mask anything shaped like an AgentCard secret, whether or not the broker holds it."""
    if "sk_" not in text and "acs_" not in text:  # the common case, without the regex
        return text
    return SECRET_SHAPE.sub(lambda m: m.group(1) + "[REDACTED]", text)


MIN_SECRET_LEN = 8  # shorter values would corrupt ordinary text and are not real credentials


def mask_for(value: bytes) -> bytes:
    """A same-length stand-in for a secret: `[REDACTED*****]`, or stars when short."""
    n = len(value)
    if n < 10:
        return b"*" * n
    return b"[REDACTED" + b"*" * (n - 10) + b"]"


class SecretSet:
    """The secret values the broker holds. Append-only: a replaced key is still never shown."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()
        self._pairs: tuple[tuple[bytes, bytes], ...] = ()

    def add(self, *values: str | None) -> None:
        new = [v for v in values if v and len(v) >= MIN_SECRET_LEN and v not in self._values]
        if not new:
            return
        with self._lock:
            merged = sorted(set(self._values).union(new), key=len, reverse=True)
            self._values = tuple(merged)
            self._pairs = tuple((v.encode(), mask_for(v.encode())) for v in merged)

    def __len__(self) -> int:
        return len(self._values)

    def redact(self, text: str) -> str:
        """Text with every held secret and anything secret-shaped masked."""
        for v in self._values:
            if v in text:
                text = text.replace(v, "[REDACTED]")
        return redact_shapes(text)

    def may_hold(self, text: str) -> bool:
        """False only when redact(text) would return it unchanged: no held secret, no shape."""
        return "sk_" in text or "acs_" in text or any(v in text for v in self._values)

    def scrubber(self) -> StreamScrubber:
        return StreamScrubber(self._pairs)

    def scrub_whole(self, body: bytes) -> bytes:
        """A whole body with every held secret masked, same length: what a scrubber fed the
        body in one chunk and then flushed returns, without looking for a split secret."""
        return _masked(body, self._pairs)


def _masked(buf: bytes, pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """`buf` with every whole secret replaced by its same-length mask (longest secrets first)."""
    for secret, mask in pairs:
        if secret in buf:
            buf = buf.replace(secret, mask)
    return buf


class StreamScrubber:
    """Masks secrets in a byte stream fed chunk by chunk; holds back only a possible secret start."""

    __slots__ = ("_held", "_pairs")

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        self._pairs = tuple(pairs)
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._pairs:
            return chunk
        buf = _masked(self._held + chunk if self._held else chunk, self._pairs)
        hold = self._partial_tail(buf)
        if hold:
            self._held = buf[-hold:]
            return buf[:-hold]
        self._held = b""
        return buf

    def flush(self) -> bytes:
        out, self._held = self._held, b""
        return out

    def _partial_tail(self, buf: bytes) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of some secret."""
        best = 0
        n = len(buf)
        for secret, _ in self._pairs:
            first = secret[:1]
            i = buf.find(first, max(0, n - len(secret) + 1))
            while i != -1:
                if n - i <= best:
                    break
                if secret.startswith(buf[i:]):
                    best = n - i
                    break
                i = buf.find(first, i + 1)
        return best
