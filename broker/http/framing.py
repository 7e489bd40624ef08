"""HTTP/1.1 facts both sides of the broker share: agents' requests (server.py) and upstream
answers (client.py), whose framing llhttp parses.

Owns: the statuses that never carry a body, and reading comma-separated list fields
(Connection). Must never: parse framing itself: llhttp does, and the broker's stricter checks
sit next to its callbacks in server.py and client.py.
"""

from __future__ import annotations

from collections.abc import Iterable

NO_BODY_STATUS = frozenset({204, 304})


def tokens(values: Iterable[str]) -> list[str]:
    """The tokens of comma-separated list fields, lower case, empty ones left out."""
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]
