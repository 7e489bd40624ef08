"""Helpers shared by latency.py, memory.py, startup.py and tls.py (the process plumbing is in rest.py).

Not a benchmark itself. Each script puts bench/ on sys.path and imports from here and from rest.py.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rest import get


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children started later inherit it). Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            print(f"note: could not raise RLIMIT_NOFILE to {target}: {exc}", file=sys.stderr)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP become KeyboardInterrupt, so `finally` blocks stop what the bench started."""

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)


def restore_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def broker_status(port: int) -> dict[str, Any]:
    """GET /_broker/status on a fresh connection, closed afterwards (it counts as one fd and task)."""
    status, body = get(port, "/_broker/status")
    if status != 200:
        raise RuntimeError(f"/_broker/status answered {status}: {body[:200]!r}")
    doc: dict[str, Any] = json.loads(body)
    return doc


def tcp_table_size() -> int | None:
    """Entries in /proc/net/tcp and tcp6 (TIME_WAIT included): what a per-connection lookup there reads."""
    try:
        return sum(len(Path(t).read_text().splitlines()) - 1 for t in ("/proc/net/tcp", "/proc/net/tcp6"))
    except OSError:
        return None


def tcp_table_read_ms(repeat: int = 5) -> float | None:
    """Median ms to read /proc/net/tcp once, here and now (the broker's loopback peer-uid check reads it)."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        try:
            Path("/proc/net/tcp").read_bytes()
        except OSError:
            return None
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(samples_ms: list[float]) -> dict[str, float]:
    s = sorted(samples_ms)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "p50": round(percentile(s, 50), 4),
        "p90": round(percentile(s, 90), 4),
        "p99": round(percentile(s, 99), 4),
        "mean": round(statistics.fmean(s), 4),
        "min": round(s[0], 4),
        "max": round(s[-1], 4),
    }


def check(
    name: str, value: float | None, unit: str, op: str, target: float, invalid: str | None = None
) -> dict[str, Any]:
    """One measure against its target; op is "<", ">=" or "==". `invalid`: why the figure does not count
    (then it fails, with that note)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        ok = False
    elif op == "<":
        ok = value < target
    elif op == ">=":
        ok = value >= target
    elif op == "==":
        ok = value == target
    else:
        raise ValueError(f"unknown op {op!r}")
    out = {"name": name, "value": value, "unit": unit, "op": op, "target": target, "ok": ok and not invalid}
    if invalid:
        out["note"] = invalid
    return out


def fmt_value(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, float):
        return f"{value} {unit}".strip()
    text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{text} {unit}".strip()


def print_checks(checks: list[dict[str, Any]]) -> None:
    if not checks:
        return
    width = max(len(c["name"]) for c in checks)
    print()
    print(f"{'target':<{width}} | {'measured':>14} | {'goal':>14} | result")
    print(f"{'-' * width}-+-{'-' * 14}-+-{'-' * 14}-+-------")
    for c in checks:
        goal = f"{c['op']} {fmt_value(c['target'], c['unit'])}"
        print(
            f"{c['name']:<{width}} | {fmt_value(c['value'], c['unit']):>14} | {goal:>14} | "
            f"{'PASS' if c['ok'] else 'FAIL'}{' (' + c['note'] + ')' if c.get('note') else ''}"
        )


def write_json(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"wrote {path}")
