"""Start-up benchmark: how soon a freshly spawned broker serves, and how long `--help` takes.

    python bench/startup.py [--runs 10] [--warmup 1] [--json out.json]

(a) ready: spawn `agentcard-broker run --config CFG` (keyring file backend in a temporary HOME, a fake
    sk_test_ key stored once with `set-key api --stdin`), then poll GET /_broker/health every 5 ms on a
    fresh connection until it answers 200; the time from spawn to that 200. SIGTERM, wait, repeat.
(b) `agentcard-broker --help`: wall time of the whole process (subprocess.run, time.perf_counter).

Both run the installed console script next to this interpreter (`<sys.prefix>/bin/agentcard-broker`,
what a pip install gives), not a version-manager shim found first on PATH (a pyenv shim adds a shell
and a second interpreter start, ~0.1 s; it is measured too, for reference). `--warmup` runs of each
are done first and not counted (page cache). Median and min of `--runs`. Targets: ready < 0.6 s,
--help < 0.25 s. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

POLL_S = 0.005
READY_TARGET_S = 0.6
HELP_TARGET_S = 0.25


def real_exe() -> str:
    """The console script of this interpreter's installation; the PATH one when there is none."""
    exe = Path(sys.executable).parent / "agentcard-broker"
    return str(exe) if exe.is_file() and os.access(exe, os.X_OK) else bl.broker_cmd()


def time_ready(exe: str, cfg: Path, env: dict[str, str], port: int, log: Path) -> float:
    """Seconds from spawning the daemon until /_broker/health answers 200. Stops the daemon afterwards."""
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("ab") as err:
            started = time.perf_counter()
            proc = bl.spawn_broker(exe, cfg, env, err)
        return bl.wait_health(port, proc.poll, log, started=started, poll_s=POLL_S, get_timeout=2)
    finally:
        bl.stop_process(proc, "broker", signal.SIGTERM)


def time_cmd(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, check=False, timeout=60)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}: {err}")
    return elapsed


def stats_s(values: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(values), 4),
        "min_s": round(min(values), 4),
        "max_s": round(max(values), 4),
        "runs_s": [round(v, 4) for v in values],
    }


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--runs", type=int, default=10, help="timed runs of each (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs of each first (default 1)")
    bl.add_output_args(p, "logs, config")
    a = p.parse_args()
    if a.runs < 1 or a.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    return a


def main() -> int:
    args = parse_args()
    with bl.BenchRun("agentcard-bench-startup-", args.keep, log_lines=0) as run:
        exe = real_exe()
        shim = shutil.which("agentcard-broker")
        ports = bl.free_ports("broker", "upstream")  # the upstream is never contacted
        cfg, env = bl.prepare_broker(
            run.tmp, ports["broker"], [bl.api_route(f"http://{bl.HOST}:{ports['upstream']}")]
        )
        port, log = ports["broker"], run.broker_log

        ready: list[float] = []
        for i in range(args.warmup + args.runs):
            t = time_ready(exe, cfg, env, port, log)
            if i >= args.warmup:
                ready.append(t)
            note = " (warm-up)" if i < args.warmup else ""
            print(f"  ready run {i + 1}: {t * 1000:.0f} ms{note}", file=sys.stderr)

        def timed(cmd: list[str]) -> list[float]:
            out = []
            for i in range(args.warmup + args.runs):
                t = time_cmd(cmd, env)
                if i >= args.warmup:
                    out.append(t)
            return out

        help_times = timed([exe, "--help"])
        python_floor = timed([sys.executable, "-c", "pass"])
        shim_help = timed([shim, "--help"]) if shim and Path(shim).resolve() != Path(exe).resolve() else None

        r, h, f = stats_s(ready), stats_s(help_times), stats_s(python_floor)
        s = stats_s(shim_help) if shim_help else None
        print()
        print(
            f"agentcard-broker start-up bench: {args.runs} runs each after {args.warmup} warm-up "
            f"({os.cpu_count()} CPUs, python {platform.python_version()})"
        )
        print(f"executable: {exe}")
        print()
        rows = [
            ("spawn `run` -> /_broker/health 200", r),
            ("`agentcard-broker --help`", h),
            ("(floor: `python -c pass`)", f),
        ]
        if s:
            rows.append(("(`--help` via the PATH shim)", s))
        bl.Table(
            ("measure", "<44"), ("median s", ">8.3f"), ("min s", ">8.3f"), ("max s", ">8.3f"), ruled=True
        ).print_all((name, st["median_s"], st["min_s"], st["max_s"]) for name, st in rows)
        print(f"ready runs (s): {' '.join(f'{v:.3f}' for v in r['runs_s'])}")
        print(f"--help runs (s): {' '.join(f'{v:.3f}' for v in h['runs_s'])}")

        checks = [
            bl.check("startup: ready median", r["median_s"], "s", "<", READY_TARGET_S),
            bl.check("startup: --help median", h["median_s"], "s", "<", HELP_TARGET_S),
        ]
        bl.report_checks(
            checks,
            args.json,
            {
                "config": {
                    "runs": args.runs,
                    "warmup": args.warmup,
                    "poll_s": POLL_S,
                    "executable": exe,
                    "path_shim": shim,
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "ready": r,
                "help": h,
                "python_floor": f,
                "help_via_shim": s,
            },
        )
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
