"""A probe of the machine itself: a fixed piece of memory-bound work, timed every few ms.

    python bench/probe.py --seconds 20 --out probe.json [--period 0.01]

Why: on the bench VM a Python process's work now and then runs several times slower for tens
of ms at a time, with no steal time reported and nothing else running (seen with this probe on
an idle machine): the host's other tenants taking the memory bandwidth, caches or a shared core.
A request that lands in such a window takes its slowdown; a C proxy's few µs of work per request
hardly shows it, a Python proxy's several hundred µs do. latency.py runs this beside its load and
reports how many of each target's slow requests fell in such windows.

The work: a chase through a 1M-entry list that is one single cycle (Sattolo's shuffle: the
chase never comes back to where it began and so never settles in a cache; each step a likely
cache miss), about 0.15 ms on a quiet core; done every `--period` s, so it takes ~2% of one
CPU. Each sample keeps the work's wall time and the CPU time this thread spent on it: a sample
slow in both is work that ran slower; slow in wall time only is the probe waiting for a CPU.
Prints `ready` once the list is built. Written as JSON on exit (or SIGTERM):
{"period_s", "samples": [[time.monotonic(), wall ms, CPU ms], ...]}; time.monotonic() is the
clock asyncio's event loop keeps, so samples line up with a client's loop.time().
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import time
from pathlib import Path

STEPS = 200  # chase steps per sample
SIZE = 1 << 20  # list entries: far more than the CPU caches hold


def sattolo(n: int) -> list[int]:
    """A random permutation of range(n) that is one cycle through all n entries."""
    chain = list(range(n))
    rnd = random.Random(1)
    for i in range(n - 1, 0, -1):
        j = rnd.randrange(i)  # j < i, never i itself: what makes it a single cycle
        chain[i], chain[j] = chain[j], chain[i]
    return chain


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, required=True, help="how long to probe")
    p.add_argument("--out", type=Path, required=True, help="where to write the samples (JSON)")
    p.add_argument("--period", type=float, default=0.01, help="seconds between samples (default 0.01)")
    args = p.parse_args()
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    chain = sattolo(SIZE)
    print("ready", flush=True)
    samples: list[list[float]] = []
    end = time.monotonic() + args.seconds
    at = 0
    while not stop:
        began, cpu_began = time.monotonic(), time.thread_time()
        if began >= end:
            break
        for _ in range(STEPS):
            at = chain[at]
        wall, cpu = time.monotonic() - began, time.thread_time() - cpu_began
        samples.append([round(began, 6), round(wall * 1000, 4), round(cpu * 1000, 4)])
        time.sleep(max(0.0, args.period - (time.monotonic() - began)))
    args.out.write_text(json.dumps({"period_s": args.period, "samples": samples}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
