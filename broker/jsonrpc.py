"""JSON-RPC messages in HTTP bodies, as MCP's Streamable HTTP carries them: a JSON document (one
message or a batch) or a `text/event-stream` whose events' `data:` lines hold one message each.

Owns: splitting an SSE body into events and their data, decoding each message, and writing an
event back with its data replaced. Must never: raise on any bytes it is given; what cannot be
read is kept as it came (or left out of `messages`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

SSE = "text/event-stream"


@dataclass(frozen=True, slots=True)
class Event:
    """One SSE event: its lines other than `data:`, and its data joined (None: it had none)."""

    others: tuple[bytes, ...]
    data: bytes | None
    raw: bytes


def sse_events(raw: bytes) -> Iterator[Event]:
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = block.split(b"\n")
        data = [ln[5:].removeprefix(b" ") for ln in lines if ln.startswith(b"data:")]
        others = tuple(ln for ln in lines if not ln.startswith(b"data:"))
        yield Event(others, b"\n".join(data) if data else None, block)


def _load(raw: bytes) -> Any:
    with contextlib.suppress(ValueError, RecursionError):
        return json.loads(raw)
    return None


def messages(raw: bytes, content_type: str) -> list[Any]:
    """Every JSON value the body carries: the document (a batch counts as its members), or each
    SSE event's data. Values that do not parse are left out."""
    if SSE in content_type:
        found = (_load(e.data) for e in sse_events(raw) if e.data is not None)
        return [m for m in found if m is not None]
    doc = _load(raw)
    if doc is None:
        return []
    return doc if isinstance(doc, list) else [doc]


def rewrite(raw: bytes, content_type: str, edit: Callable[[Any], Any]) -> bytes:
    """The body with `edit` applied to every message it carries; what does not parse is kept."""
    if SSE in content_type:
        out = []
        for event in sse_events(raw):
            doc = _load(event.data) if event.data is not None else None
            if doc is None:
                out.append(event.raw)
                continue
            out.append(b"\n".join([*event.others, b"data: " + json.dumps(edit(doc)).encode()]))
        return b"\n\n".join(out)
    doc = _load(raw)
    if doc is None:
        return raw
    return json.dumps([edit(m) for m in doc] if isinstance(doc, list) else edit(doc)).encode()


def request_id(raw: bytes | None) -> tuple[bool, Any]:
    """(is this a JSON-RPC request body, its id) for answering an error the way the agent reads
    it: a single message gives its id; a batch is JSON-RPC without one id."""
    if raw is None:
        return False, None
    doc = _load(raw)
    if isinstance(doc, dict) and doc.get("jsonrpc") == "2.0":
        return True, doc.get("id")
    if isinstance(doc, list) and doc and all(isinstance(d, dict) and "jsonrpc" in d for d in doc):
        return True, None
    return False, None
