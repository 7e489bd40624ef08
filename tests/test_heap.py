"""The collector settings the daemon uses: pauses timed per generation, start-up frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from broker import heap


@pytest.fixture
def meter() -> Iterator[heap.PauseMeter]:
    """A meter on gc.callbacks for one test (the module's own stays as it was)."""
    m = heap.PauseMeter()
    gc.callbacks.append(m)
    yield m
    gc.callbacks.remove(m)


def test_meter_times_each_generation(meter: heap.PauseMeter) -> None:
    before = list(meter.count)
    gc.collect(2)
    gc.collect(1)
    assert meter.count[2] == before[2] + 1
    assert meter.count[1] == before[1] + 1
    assert meter.max_s[2] > 0 and meter.total_s[2] >= meter.max_s[2]
    lines = meter.render()
    assert f'agentcard_broker_gc_collections_total{{generation="2"}} {meter.count[2]}' in lines
    assert any(line.startswith('agentcard_broker_gc_pause_seconds_max{generation="2"} 0.') for line in lines)
    assert f"agentcard_broker_gc_frozen_objects {gc.get_freeze_count()}" in lines


def test_settle_freezes_and_is_not_counted_as_a_pause() -> None:
    m = heap.PauseMeter()
    gc.callbacks.append(m)
    try:
        assert not heap.settled()
        frozen = heap.settle(m)
        assert frozen > 1000 and frozen == gc.get_freeze_count()
        assert heap.settled()
        assert m.count == [0, 0, 0]  # the deliberate collection before serving is no pause
        assert m.counting
        gc.collect(2)
        assert m.count[2] == 1
    finally:
        gc.callbacks.remove(m)
        gc.unfreeze()  # the test process keeps collecting everything, as before
