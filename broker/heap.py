"""The daemon's garbage-collector settings: a settled heap at start, and pause figures.

Owns: freezing what start-up built (modules, config, credentials) out of the collector's reach,
and timing every collection for /_broker/metrics. Why: a full (generation 2) collection walks
every tracked object, and right after start-up that is every object the imports made: measured
on a 2-core VM it stopped the event loop for 28 ms, which every request waiting on the loop
paid. Frozen objects are skipped, so a full collection walks only what requests built since.
Must never: freeze while agents' connections are open (a frozen object that later becomes
cyclic garbage is never freed; start-up objects live as long as the process anyway).
"""

from __future__ import annotations

import gc
import time
from typing import Any

GENERATIONS = (0, 1, 2)


class PauseMeter:
    """Count, total and longest pause of each collector generation, from gc.callbacks."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]
        self._began = 0.0
        self.counting = True  # off while settle() collects on purpose, before anything is served

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.counting:
            return
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        g = info["generation"]
        self.count[g] += 1
        self.total_s[g] += took
        if took > self.max_s[g]:
            self.max_s[g] = took

    def render(self) -> list[str]:
        """Prometheus lines: collections, total and longest pause by generation; frozen objects."""
        lines = [
            "# HELP agentcard_broker_gc_collections_total Python garbage collections, by generation.",
            "# TYPE agentcard_broker_gc_collections_total counter",
        ]
        lines += [
            f'agentcard_broker_gc_collections_total{{generation="{g}"}} {self.count[g]}' for g in GENERATIONS
        ]
        lines += [
            "# HELP agentcard_broker_gc_pause_seconds_total Time the event loop stood still collecting.",
            "# TYPE agentcard_broker_gc_pause_seconds_total counter",
        ]
        lines += [
            f'agentcard_broker_gc_pause_seconds_total{{generation="{g}"}} {self.total_s[g]:.6f}'
            for g in GENERATIONS
        ]
        lines += [
            "# HELP agentcard_broker_gc_pause_seconds_max The longest single collection, by generation.",
            "# TYPE agentcard_broker_gc_pause_seconds_max gauge",
        ]
        lines += [
            f'agentcard_broker_gc_pause_seconds_max{{generation="{g}"}} {self.max_s[g]:.6f}'
            for g in GENERATIONS
        ]
        lines += [
            "# HELP agentcard_broker_gc_frozen_objects Objects start-up froze out of the collector's walks.",
            "# TYPE agentcard_broker_gc_frozen_objects gauge",
            f"agentcard_broker_gc_frozen_objects {gc.get_freeze_count()}",
        ]
        return lines


def install() -> PauseMeter:
    """Time every collection from now on (the daemon calls it once, as it starts)."""
    meter = PauseMeter()
    gc.callbacks.append(meter)
    return meter


def settled() -> bool:
    """Start-up's objects were frozen (by `settle`) in this process."""
    return gc.get_freeze_count() > 0


def settle(meter: PauseMeter | None, collect: bool = True) -> int:
    """Collect what start-up left behind, then freeze the rest. Returns the objects frozen.

    `collect=False` only freezes: right after the imports a full collection walks ~43k objects
    (20 ms measured, added to start-up) to find a few dozen unreachable ones.
    """
    if meter is not None:
        meter.counting = False
    try:
        if collect:
            gc.collect()
        gc.freeze()
    finally:
        if meter is not None:
            meter.counting = True
    return gc.get_freeze_count()
