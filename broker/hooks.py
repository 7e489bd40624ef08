"""What a hook sees and returns: the small immutable values of one request's walk.

A feature (a route's policy, the audit line, the metrics) is an object with `request` and/or
`done` methods, registered in one place (`pipeline.register_hooks`). The forwarding core knows
nothing about them: it is handed the body a hook read and the rewrites and answer transforms
hooks asked for.

Owns: `Call` (a request on its way: its id, the engine's request, where it goes, the credential
that answers for it), `Verdict` (what one request hook decided), `Outcome` (what happened, for
`done` hooks), the hook protocols, and `AnswerTransform` (with `Chain`, several as one).
Must never: hold state of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from broker.auth.base import Credential
    from broker.body import RequestBody
    from broker.http.server import Request
    from broker.routing import Target

Rewrite = Callable[[bytes, str], bytes]  # a whole 200 answer's body and Content-Type -> new body


class AnswerTransform(Protocol):
    """One answer's body on its way to the agent, chunk by chunk (a card masker). May hold back
    a bounded tail at a chunk's end, and may change lengths: the proxy frames the result."""

    def feed(self, chunk: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


AnswerFactory = Callable[[], AnswerTransform]  # a fresh transform for each answer


class Chain:
    """Transforms one after the other, as one: what a stage holds back, the next sees later."""

    __slots__ = ("first", "rest")

    def __init__(self, first: AnswerTransform, rest: tuple[AnswerTransform, ...]) -> None:
        self.first = first
        self.rest = rest

    def feed(self, chunk: bytes) -> bytes:
        chunk = self.first.feed(chunk)
        for stage in self.rest:
            chunk = stage.feed(chunk)
        return chunk

    def flush(self) -> bytes:
        tail = self.first.flush()
        for stage in self.rest:
            tail = stage.feed(tail) + stage.flush()
        return tail


UserKey = tuple[str, str]  # (platform client, end user id): one end user of a per-user route

# The values are named tuples: immutable, and built in a fifth of the time of a frozen
# dataclass (measured: 0.4 µs against 2.5 µs for an Outcome), which counts on every request.


class Call(NamedTuple):
    """A request past the guard and the route table."""

    id: str
    route: str  # the route's name
    request: Request
    target: Target
    credential: Credential  # the route's, or on a per-user route the end user's
    user: UserKey | None = None  # on a per-user route: (platform client, user id)


class Verdict(NamedTuple):
    """A request hook's yes, with what it needs later.

    `rewrite`: applied to a successful answer read whole (a filtered tools/list).
    `settle`: called with the outcome once the answer is done (a budget reservation's refund).
    `answer`: makes a transform every answer body passes through, streamed or whole, whatever
    its status, after the secret scrubber (card data masked).
    """

    rewrite: Rewrite | None = None
    settle: Callable[[Outcome], None] | None = None
    answer: AnswerFactory | None = None


class Outcome(NamedTuple):
    """One answered request, for the audit line, the metrics and settling hooks."""

    id: str
    route: str | None  # None: no route matched (or refused before routing)
    method: str
    raw_path: str
    status: int
    elapsed: float  # seconds, request to last byte
    upstream_status: int | None = None
    maybe_sent: bool = False  # the upstream may have seen the request (and acted on it)
    error: str | None = None  # the broker error code, or what broke mid-answer
    detail: str | None = None  # which rule refused it
    bytes_in: int = 0
    bytes_out: int = 0
    client: str | None = None  # per-user routes: the platform client and the end user
    user: str | None = None


class RequestHook(Protocol):
    async def request(self, call: Call, body: RequestBody) -> Verdict | None:
        """Let the call through (None, or a Verdict) or raise BrokerError to refuse it. Read the
        body only when a rule needs it: `await body.read()` (once, bounded; it is then forwarded
        byte for byte)."""
        ...


class DoneHook(Protocol):
    def done(self, outcome: Outcome) -> None:
        """After the answer: never raises, never blocks."""
        ...
