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
import contextlib
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from benchlib import (  # noqa: E402
    check,
    install_signal_handlers,
    print_checks,
    restore_signal_handlers,
    write_json,
)
from rest import (  # noqa: E402
    _pdeathsig,
    broker_cmd,
    broker_config,
    broker_env,
    free_port,
    get,
    stop_process,
    store_key,
    tail,
)

POLL_S = 0.005
READY_TARGET_S = 0.6
HELP_TARGET_S = 0.25


def real_exe() -> str:
    """The console script of this interpreter's installation; the PATH one when there is none."""
    exe = Path(sys.executable).parent / "agentcard-broker"
    return str(exe) if exe.is_file() and os.access(exe, os.X_OK) else broker_cmd()


def time_ready(exe: str, cfg: Path, env: dict[str, str], port: int, log: Path) -> float:
    """Seconds from spawning the daemon until /_broker/health answers 200. Stops the daemon afterwards."""
    proc: subprocess.Popen[bytes] | None = None
    try:
        with log.open("ab") as err:
            started = time.perf_counter()
            proc = subprocess.Popen(
                [exe, "run", "--config", str(cfg)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                preexec_fn=_pdeathsig,
            )
        deadline = started + 30
        while time.perf_counter() < deadline:
            with contextlib.suppress(OSError):
                status, _ = get(port, "/_broker/health", timeout=2)
                if status == 200:
                    return time.perf_counter() - started
            if proc.poll() is not None:
                raise RuntimeError(f"broker exited with code {proc.returncode}; its log:\n{tail(log)}")
            time.sleep(POLL_S)
        raise RuntimeError(f"broker did not answer /_broker/health within 30s; its log:\n{tail(log)}")
    finally:
        stop_process(proc, "broker", signal.SIGTERM)


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
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="timed runs of each (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs of each first (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, config)")
    a = p.parse_args()
    if a.runs < 1 or a.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    return a


def main() -> int:
    args = parse_args()
    install_signal_handlers()
    tmp = Path(tempfile.mkdtemp(prefix="agentcard-bench-startup-"))
    log = tmp / "broker.log"
    try:
        exe = real_exe()
        shim = shutil.which("agentcard-broker")
        env = broker_env(tmp)
        port = free_port()
        cfg = broker_config(tmp, port, free_port())  # the upstream is never contacted
        store_key(cfg, env)

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
        print(f"{'measure':<44} | {'median s':>8} | {'min s':>8} | {'max s':>8}")
        print(f"{'-' * 44}-+-{'-' * 8}-+-{'-' * 8}-+-{'-' * 8}")
        rows = [
            ("spawn `run` -> /_broker/health 200", r),
            ("`agentcard-broker --help`", h),
            ("(floor: `python -c pass`)", f),
        ]
        if s:
            rows.append(("(`--help` via the PATH shim)", s))
        for name, st in rows:
            print(f"{name:<44} | {st['median_s']:>8.3f} | {st['min_s']:>8.3f} | {st['max_s']:>8.3f}")
        print(f"ready runs (s): {' '.join(f'{v:.3f}' for v in r['runs_s'])}")
        print(f"--help runs (s): {' '.join(f'{v:.3f}' for v in h['runs_s'])}")

        checks = [
            check("startup: ready median", r["median_s"], "s", "<", READY_TARGET_S),
            check("startup: --help median", h["median_s"], "s", "<", HELP_TARGET_S),
        ]
        print_checks(checks)
        write_json(
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
                "checks": checks,
            },
        )
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    finally:
        restore_signal_handlers()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
