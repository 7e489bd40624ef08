"""All the benchmarks in sequence, then one summary table of each measure, its target and pass/fail.

    python bench/all.py [--only rest,latency] [--skip mcp] [--json summary.json]

Runs rest.py, latency.py, tls.py, memory.py, startup.py and mcp.py one after the other, each as a
subprocess of this interpreter with `--json` to a temporary file (their own output is shown as they
run), then reads those files. Measures without a target are listed with "-". Exit 0 when every
script ran and every target was met (the throughput stretch goal is shown, not counted), 1
otherwise. Run from the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

SCRIPTS = ("rest", "latency", "tls", "memory", "startup", "mcp")
THROUGHPUT_STRETCH = 0.25  # broker req/s over nginx's on rest.py

Row = dict[str, Any]  # script, measure, value, unit, goal ("-" when none), ok (None when no target)


def row(
    script: str, measure: str, value: Any, unit: str = "", goal: str = "-", ok: bool | None = None
) -> Row:
    return {"script": script, "measure": measure, "value": value, "unit": unit, "goal": goal, "ok": ok}


def from_checks(script: str, doc: dict[str, Any]) -> list[Row]:
    """The `checks` list that latency.py, tls.py, memory.py and startup.py write."""
    out = []
    for c in doc.get("checks", []):
        name = str(c["name"]).split(": ", 1)[-1]
        unit = c.get("unit", "")
        goal = f"{c['op']} {c['target']:g} {unit}".strip()
        if c.get("note"):
            goal += f" ({c['note']})"
        out.append(row(script, name, c.get("value"), unit, goal, bool(c.get("ok"))))
    return out


def rest_rows(doc: dict[str, Any]) -> list[Row]:
    out = []
    for r in doc.get("results", []):
        out.append(row("rest", f"wrk req/s {r['target']}", round(r["rps"]), "req/s"))
        out.append(
            row("rest", f"wrk p50 / p99 {r['target']}", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}", "ms")
        )
    rounds = (doc.get("config") or {}).get("rounds", 1)
    for k, v in (doc.get("ratios_rps") or {}).items():
        if k == "broker/nginx" and v is not None:
            # the stretch goal (Python against C): judged, and labelled a stretch
            name = f"req/s broker/nginx (median of {rounds} rounds)"
            goal = f">= {THROUGHPUT_STRETCH:g} x (stretch)"
            out.append(row("rest", name, v, "x", goal, v >= THROUGHPUT_STRETCH))
        else:
            out.append(row("rest", f"req/s {k}", v, "x"))
    if doc.get("broker_cpu_us_per_request") is not None:
        out.append(row("rest", "broker CPU per request under wrk", doc["broker_cpu_us_per_request"], "µs"))
    rss = doc.get("rss") or {}
    if rss:
        out.append(row("rest", "RSS idle", rss.get("idle_mib"), "MiB"))
        out.append(row("rest", "RSS delta from the 200 MiB stream", rss.get("delta_200mib_mib"), "MiB"))
    return out


def latency_rows(doc: dict[str, Any]) -> list[Row]:
    lat = doc.get("latency_ms") or {}
    out = [
        row("latency", f"{t} p50 / p99", f"{lat[t]['p50']:.3f} / {lat[t]['p99']:.3f}", "ms")
        for t in ("direct", "broker", "nginx")
        if t in lat
    ]
    by_nginx = doc.get("added_by_nginx_ms") or {}
    if "p99" in by_nginx:
        value = f"{by_nginx['p50']:+.3f} / {by_nginx['p99']:+.3f}"
        out.append(row("latency", "added by nginx (reference) p50 / p99", value, "ms"))
    if doc.get("steal_fraction") is not None:
        out.append(row("latency", "steal time while measuring", round(doc["steal_fraction"] * 100, 1), "%"))
    if doc.get("broker_cpu_us_per_request") is not None:
        out.append(row("latency", "broker CPU per request", doc["broker_cpu_us_per_request"], "µs"))
    probe = doc.get("machine_probe") or {}
    for t, v in (probe.get("targets") or {}).items():
        value = f"{v['slow']} ({v['slow_near']})"
        name = f"{t} requests over {probe.get('slow_ms', 2):g} ms (in the machine's slow windows)"
        out.append(row("latency", name, value, ""))
    if probe:
        share = round(probe["near_fraction"] * 100, 1)
        out.append(row("latency", "all requests in the machine's slow windows", share, "%"))
    for t, v in (probe.get("added_p99_outside_ms") or {}).items():
        out.append(row("latency", f"added p99 by {t}, outside the slow windows", f"{v:+.3f}", "ms"))
    return out + from_checks("latency", doc)


def tls_rows(doc: dict[str, Any]) -> list[Row]:
    res = doc.get("results") or {}
    out = [
        row("tls", f"{t} req/s (p50 {res[t]['p50']:.2f} ms)", res[t]["rps"], "req/s")
        for t in ("direct", "broker")
        if t in res
    ]
    return out + from_checks("tls", doc)


def memory_rows(doc: dict[str, Any]) -> list[Row]:
    samples = doc.get("samples") or []
    out = []
    if samples:
        idle = samples[0]
        for s in samples:
            delta = (s["rss_kib"] - idle["rss_kib"]) / 1024
            out.append(
                row(
                    "memory",
                    f"{s['phase']}: RSS (Δ idle) tasks fds",
                    f"{s['rss_kib'] / 1024:.1f} ({delta:+.1f}) {s['tasks']} {s['open_fds']}",
                    "",
                )
            )
    return out + from_checks("memory", doc)


def startup_rows(doc: dict[str, Any]) -> list[Row]:
    out = []
    for key, name in (("ready", "ready min"), ("help", "--help min")):
        if doc.get(key):
            out.append(row("startup", name, doc[key]["min_s"], "s"))
    return out + from_checks("startup", doc)


def mcp_rows(doc: dict[str, Any]) -> list[Row]:
    """mcp.py's schema (it is edited elsewhere): read defensively, skip what is not there."""
    out = []
    for r in doc.get("results", []):
        mode = r.get("mode", "?")
        for t in r.get("targets") or ("direct", "broker"):
            if isinstance(r.get(t), dict) and "p50" in r[t]:
                out.append(row("mcp", f"{mode}: {t} p50 per call", r[t]["p50"], "ms"))
        added = (r.get("overhead_ms") or {}).get("broker") or r.get("added_ms") or {}
        below = r.get("broker_below_mcp_remote")
        if "p50" in added:
            if isinstance(below, dict) and "all" in below:
                remote = (r.get("overhead_ms") or {}).get("mcp-remote") or {}
                # judged as labelled, p50 against p50; bench/mcp.py's own report also says
                # whether p90, p99, mean and the paired block medians are below
                goal = f"< mcp-remote's ({remote.get('p50', float('nan')):+.2f} ms)"
                out.append(
                    row(
                        "mcp",
                        f"{mode}: broker overhead p50",
                        f"{added['p50']:+.2f}",
                        "ms",
                        goal,
                        below["p50"],
                    )
                )
            else:
                out.append(row("mcp", f"{mode}: broker overhead p50", f"{added['p50']:+.2f}", "ms"))
    return out


ADAPTERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "rest": rest_rows,
    "latency": latency_rows,
    "tls": tls_rows,
    "memory": memory_rows,
    "startup": startup_rows,
    "mcp": mcp_rows,
}


def fmt(value: Any, unit: str) -> str:
    """fmt_value, with NaN as "n/a" too."""
    return "n/a" if isinstance(value, float) and math.isnan(value) else bl.fmt_value(value, unit)


def run_script(name: str, json_path: Path, extra: list[str]) -> tuple[int, float]:
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(json_path), *extra]
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"\n=== {name}: {' '.join(cmd[1:])}  (load average {load})", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=HERE.parent)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # each script stops what it started on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    return rc, time.monotonic() - started


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--only", help=f"comma-separated subset of {','.join(SCRIPTS)}")
    p.add_argument("--skip", help="comma-separated scripts to leave out")
    p.add_argument("--json", metavar="PATH", help="also write the summary (and each script's JSON) here")
    a = p.parse_args()
    chosen = [s.strip() for s in a.only.split(",")] if a.only else list(SCRIPTS)
    skipped = {s.strip() for s in a.skip.split(",")} if a.skip else set()
    unknown = [s for s in [*chosen, *skipped] if s not in SCRIPTS]
    if unknown:
        p.error(f"unknown script(s) {unknown}; known: {', '.join(SCRIPTS)}")
    a.scripts = [s for s in chosen if s not in skipped]
    return a


def main() -> int:
    args = parse_args()
    rows: list[Row] = []
    docs: dict[str, Any] = {}
    runs: dict[str, dict[str, Any]] = {}
    with bl.BenchRun("agentcard-bench-all-", keep=False, errors=()) as run:
        for name in args.scripts:
            out = run.tmp / f"{name}.json"
            rc, took = run_script(name, out, [])
            runs[name] = {"exit": rc, "seconds": round(took, 1)}
            doc: dict[str, Any] | None = None
            if rc == 0:
                try:
                    doc = json.loads(out.read_text())
                except (OSError, ValueError) as exc:
                    runs[name]["error"] = f"no JSON: {exc}"
            if doc is None:
                rows.append(row(name, "(script)", f"exit {rc}", "", "exit 0 with JSON", False))
                continue
            docs[name] = doc
            try:
                rows += ADAPTERS[name](doc)
            except (KeyError, TypeError, ValueError) as exc:
                rows.append(row(name, "(summary)", f"unreadable JSON: {exc!r}", "", "-", False))
    if run.exit_code:
        return run.exit_code

    print()
    print("=" * 100)
    print(f"agentcard-broker benchmarks: summary (broker code: {bl.broker_code()})")
    print("run time: " + ", ".join(f"{n} {r['seconds']:g}s (exit {r['exit']})" for n, r in runs.items()))
    print()
    cells = [
        (
            r["script"],
            r["measure"],
            fmt(r["value"], r["unit"]),
            r["goal"],
            {True: "PASS", False: "FAIL"}.get(r["ok"], "-"),
        )
        for r in rows
    ]
    heads = ("script", "measure", "figure", "target", "result")
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    table = bl.Table(
        *(
            (h, f">{w}" if i == 2 else f"<{w}", f"<{w}")
            for i, (h, w) in enumerate(zip(heads, widths, strict=True))
        ),
        ruled=True,
    )
    table.print_all(cells)
    stretch = [r for r in rows if r["ok"] is not None and "(stretch)" in r["goal"]]
    targets = [r for r in rows if r["ok"] is not None and r not in stretch]
    failed = [r for r in targets if not r["ok"]]
    print()
    print(
        f"targets: {len(targets) - len(failed)} met, {len(failed)} missed"
        + "".join(f"; stretch goal {'met' if r['ok'] else 'missed'}" for r in stretch)
        + " (a stretch goal does not set the exit code)"
    )
    for r in failed + [r for r in stretch if not r["ok"]]:
        print(f"  MISSED {r['script']}: {r['measure']} = {fmt(r['value'], r['unit'])} (target {r['goal']})")
    bl.write_json(args.json, {"runs": runs, "summary": rows, "results": docs})
    return 1 if failed or any(r["exit"] != 0 for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
