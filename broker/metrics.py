"""Counters and a latency histogram, rendered as Prometheus text for /_broker/metrics.

Owns: in-memory request counts by route and status, latency buckets by route, upstream
error counts, refresh counts. Must never: label anything with a path, query or header value
(unbounded cardinality, and a place secrets could hide).
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.hooks import Outcome

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()
        self.by_route: Counter[str] = Counter()
        self.upstream_errors: Counter[tuple[str, str]] = Counter()
        self.refreshes: Counter[str] = Counter()
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}

    def done(self, outcome: Outcome) -> None:
        """The metrics as a done hook: every answered request counted under its route ("-": none)."""
        _, route, _, _, status, seconds, _, _, error, _, _, _, _, _ = outcome  # faster than four reads
        route = route or "-"
        self.requests[(route, status)] += 1
        self.by_route[route] += 1
        counts = self._buckets.get(route)
        if counts is None:
            counts = self._buckets[route] = [0] * (len(BUCKETS) + 1)
        counts[bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bucket with seconds <= bound
        self._sums[route] = self._sums.get(route, 0.0) + seconds
        if error is not None and error.startswith(("upstream_", "stream_")):
            self.upstream_errors[(route, error)] += 1

    def render(self, auth_states: Iterable[tuple[str, str]], all_states: Iterable[str]) -> str:
        lines = [
            "# HELP agentcard_broker_requests_total Requests answered, by route and HTTP status.",
            "# TYPE agentcard_broker_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'agentcard_broker_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += [
            "# HELP agentcard_broker_request_duration_seconds Time from request to last byte.",
            "# TYPE agentcard_broker_request_duration_seconds histogram",
        ]
        for route, counts in sorted(self._buckets.items()):
            cumulative = 0
            for bound, c in zip((*BUCKETS, float("inf")), counts, strict=True):
                cumulative += c
                le = "+Inf" if bound == float("inf") else repr(bound)
                labels = f'route="{route}",le="{le}"'
                lines.append(f"agentcard_broker_request_duration_seconds_bucket{{{labels}}} {cumulative}")
            lines.append(
                f'agentcard_broker_request_duration_seconds_sum{{route="{route}"}} {self._sums[route]:.6f}'
            )
            lines.append(f'agentcard_broker_request_duration_seconds_count{{route="{route}"}} {cumulative}')
        lines += [
            "# HELP agentcard_broker_upstream_errors_total Upstream failures, by route and kind.",
            "# TYPE agentcard_broker_upstream_errors_total counter",
        ]
        for (route, kind), n in sorted(self.upstream_errors.items()):
            lines.append(f'agentcard_broker_upstream_errors_total{{route="{route}",kind="{kind}"}} {n}')
        lines += [
            "# HELP agentcard_broker_token_refreshes_total Credential refreshes, by route.",
            "# TYPE agentcard_broker_token_refreshes_total counter",
        ]
        for route, n in sorted(self.refreshes.items()):
            lines.append(f'agentcard_broker_token_refreshes_total{{route="{route}"}} {n}')
        lines += [
            "# HELP agentcard_broker_auth_state 1 for the auth state each route is in.",
            "# TYPE agentcard_broker_auth_state gauge",
        ]
        states = list(all_states)
        for route, current in auth_states:
            for s in states:
                lines.append(
                    f'agentcard_broker_auth_state{{route="{route}",state="{s}"}} {int(s == current)}'
                )
        return "\n".join(lines) + "\n"
