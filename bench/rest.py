"""REST forwarding benchmark: the broker against nginx doing the same job, and against no proxy at all.

    python bench/rest.py [--duration 4] [--rounds 3] [--connections 32] [--threads 2] [--json out.json]

What it starts, all on 127.0.0.1 and all inside one temporary directory removed on exit:

* nginx (own prefix, own nginx.conf, `daemon off;`) with two servers:
  - "direct": the fast upstream, `return 200 '{"ok":true}'`, plus `/big` (a 200 MiB sparse file)
    and `/_bench/auth` (200 only when the expected Bearer header arrived, else 401);
  - "nginx": a keepalive reverse proxy to "direct" that injects `Authorization: Bearer <fake key>`,
    i.e. the broker's job done by nginx, as the reference point.
* the broker (`agentcard-broker run`), one api_key route `/` -> "direct", keyring file backend in a
  temporary HOME, logging at warning level with the audit line off.

Then wrk measures req/s and p50/p99 for direct, broker and nginx on /api/v1/cards, in `--rounds`
rounds of one run per target (the order rotating), so a noisy minute of the machine lands in one
round instead of in one target's only run; each target's row is its median round, the ratios are
the median of the rounds' own ratios (each round's shown too; so the rows need not divide to
them). Then the broker's RSS is read from /proc/PID/status idle, after the wrk runs and after
streaming 200 MiB through it.

The key is an obviously fake sk_test_ key; nothing leaves 127.0.0.1. On a 2-core machine wrk and
the server under test share the CPU: the numbers are what they are, compare them with each other.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

TARGETS = ("direct", "broker", "nginx")

# ---------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    target: str
    url: str
    requests: int = 0
    seconds: float = 0.0
    rps: float = 0.0
    p50_ms: float = 0.0
    p75_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    avg_ms: float = 0.0
    max_ms: float = 0.0
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(target: str, url: str, out: str) -> WrkResult:
    r = WrkResult(target=target, url=url, raw=out)
    for pct, val in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.M):
        setattr(r, f"p{pct}_ms", round(_ms(val), 3))
    m = re.search(r"^\s+Latency\s+(\S+)\s+\S+\s+(\S+)", out, re.M)
    if m:
        r.avg_ms, r.max_ms = round(_ms(m.group(1)), 3), round(_ms(m.group(2)), 3)
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    if m:
        r.requests = int(m.group(1))
        r.seconds = _ms(m.group(2) + m.group(3)) / 1000
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk output has no Requests/sec line:\n{out}")
    r.rps = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    r.non_2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    return r


def run_wrk(target: str, url: str, args: argparse.Namespace, duration: float) -> WrkResult:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency", url]
    done = bl.capture(cmd, timeout=duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}) on {url}:\n{done.stdout}{done.stderr}")
    return parse_wrk(target, url, done.stdout)


# ---------------------------------------------------------------- main


def _epoch(stamp: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def summarize_problems(problems: list[dict[str, Any]], phases: list[tuple[str, float, float]]) -> list[str]:
    """Group problem lines by (level, event, last exception line) and say which bench phase they fell in."""
    groups: dict[tuple[str, str, str], list[float | None]] = {}
    for doc in problems:
        exc = str(doc.get("exception") or "").strip().splitlines()
        frames = re.findall(r'File "[^"]*/(broker/[^"]+)", line (\d+)', "\n".join(exc))
        at = f" (deepest broker frame {frames[-1][0]}:{frames[-1][1]})" if frames else ""
        key = (str(doc.get("level")), str(doc.get("event")), (exc[-1] + at) if exc else "")
        groups.setdefault(key, []).append(_epoch(doc.get("timestamp")))
    out = []
    for (level, event, what), stamps in groups.items():
        where: dict[str, int] = {}
        for t in stamps:
            name = "outside the timed phases"
            for phase, t0, t1 in phases:
                if t is not None and t0 <= t <= t1 + 1.0:
                    # wrk stops by closing its connections with requests still in flight
                    name = f"{phase}, last 0.5s or after" if t >= t1 - 0.5 else phase
                    break
            where[name] = where.get(name, 0) + 1
        known = [t for t in stamps if t is not None]
        span = f", within {max(known) - min(known):.3f}s" if len(known) > 1 else ""
        out.append(f"{len(stamps)} x {level}: {event}: {what or '-'}{span}; phases: {where}")
    return out


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run (default 4)")
    p.add_argument("--rounds", type=int, default=3, help="wrk runs per target, interleaved (default 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of unrecorded wrk before each run")
    p.add_argument("--nginx-workers", type=int, default=1, help="nginx worker_processes (default 1)")
    bl.add_output_args(p)
    a = p.parse_args()
    if a.rounds < 1 or a.duration <= 0:
        p.error("--rounds must be at least 1 and --duration positive")
    return a


def median_result(target: str, runs: list[WrkResult]) -> WrkResult:
    """The round with the median req/s stands for the target (its latencies come with it)."""
    ranked = sorted(runs, key=lambda r: r.rps)
    return ranked[(len(ranked) - 1) // 2]


def main() -> int:
    args = parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"{tool} is not installed", file=sys.stderr)
            return 2

    with bl.BenchRun("agentcard-bench-", args.keep) as run:
        tmp, broker_log = run.tmp, run.broker_log
        ports = bl.free_ports("direct", "nginx", "broker")
        run.stop_on_exit(
            bl.start_nginx(tmp, ports["direct"], ports["nginx"], args.nginx_workers, big_bytes=bl.BIG_BYTES),
            "nginx",
        )
        cfg, env = bl.prepare_broker(
            tmp, ports["broker"], [bl.api_route(f"http://{bl.HOST}:{ports['direct']}")]
        )
        broker = run.stop_on_exit(bl.start_broker(cfg, env, ports["broker"], broker_log), "broker")
        pid = broker.pid
        time.sleep(0.5)  # let start-up settle before the idle reading
        rss_idle = bl.rss_kib(pid)
        reported_pid = bl.broker_status(ports["broker"]).get("pid")
        if reported_pid != pid:
            print(f"note: broker reports pid {reported_pid}, spawned pid is {pid}", file=sys.stderr)

        bl.sanity(ports)
        rounds: list[dict[str, WrkResult]] = []
        broker_cpu_s, broker_requests = 0.0, 0  # the broker's CPU over its own wrk runs
        phases: list[tuple[str, float, float]] = []
        for n in range(args.rounds):
            rounds.append({})
            # the order rotates each round, so no target always runs right after the same one
            for target in TARGETS[n % 3 :] + TARGETS[: n % 3]:
                url = f"http://{bl.HOST}:{ports[target]}{bl.BENCH_PATH}"
                bl.sanity(ports)
                if args.warmup > 0 and n == 0:
                    t0 = time.time()
                    run_wrk(target, url, args, args.warmup)
                    phases.append((f"wrk {target} warmup", t0, time.time()))
                t0 = time.time()
                cpu0 = bl.cpu_seconds(pid)
                res = run_wrk(target, url, args, args.duration)
                cpu1 = bl.cpu_seconds(pid)
                phases.append((f"wrk {target} round {n + 1}", t0, time.time()))
                rounds[-1][target] = res
                if target == "broker" and cpu0 is not None and cpu1 is not None:
                    broker_cpu_s += cpu1 - cpu0
                    broker_requests += res.requests
                errs = sum(res.socket_errors.values())
                print(
                    f"  round {n + 1} {target:<7} {res.rps:>10.0f} req/s  p50 {res.p50_ms:.2f} ms  "
                    f"p99 {res.p99_ms:.2f} ms"
                    + (f"  non-2xx {res.non_2xx}" if res.non_2xx else "")
                    + (f"  socket errors {res.socket_errors}" if errs else ""),
                    file=sys.stderr,
                )
        results = [median_result(t, [r[t] for r in rounds]) for t in TARGETS]
        if broker.poll() is not None:
            raise RuntimeError(f"broker died during wrk (code {broker.returncode}):\n{bl.tail(broker_log)}")
        time.sleep(0.5)
        rss_after_wrk = bl.rss_kib(pid)

        t0 = time.time()
        big = bl.stream_big(ports["broker"], pid)
        phases.append(("200 MiB stream", t0, time.time()))
        time.sleep(0.5)
        rss_after_big = bl.rss_kib(pid)
        if broker.poll() is not None:
            raise RuntimeError(f"broker died during the 200 MiB stream:\n{bl.tail(broker_log)}")
        bl.sanity(ports)  # still serving afterwards

        # each round's ratio is of two runs a few seconds apart; the median round's is reported
        per_round = {  # a round whose reference served nothing has no ratio
            f"broker/{other}": [r["broker"].rps / r[other].rps for r in rounds if r[other].rps]
            for other in ("nginx", "direct")
        }
        ratios = {k: round(statistics.median(v), 3) if v else None for k, v in per_round.items()}
        # CPU time, unlike req/s, does not count the moments the broker waited for a CPU
        cpu_us = round(broker_cpu_s * 1e6 / broker_requests, 1) if broker_requests else None
        rss = {
            "idle_mib": bl.mib(rss_idle["VmRSS"]),
            "after_wrk_mib": bl.mib(rss_after_wrk["VmRSS"]),
            "during_200mib_peak_mib": bl.mib(big["peak_rss_during_kib"]),
            "after_200mib_mib": bl.mib(rss_after_big["VmRSS"]),
            "delta_200mib_mib": bl.mib(rss_after_big["VmRSS"] - rss_after_wrk["VmRSS"]),
            "delta_total_mib": bl.mib(rss_after_big["VmRSS"] - rss_idle["VmRSS"]),
            "hwm_mib": bl.mib(rss_after_big["VmHWM"]),
        }
        problems = bl.broker_log_problems(broker_log)

        print()
        print(
            f"agentcard-broker REST bench: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s "
            f"x {args.rounds} rounds (median round shown) "
            f"GET {bl.BENCH_PATH} ({os.cpu_count()} CPUs, nginx workers {args.nginx_workers})"
        )
        print()
        table = bl.Table(
            ("target", "<8"),
            ("req/s", ">10.0f"),
            ("p50 ms", ">8.2f"),
            ("p99 ms", ">8.2f"),
            ("errors", ""),
            ruled=True,
        )
        table.print_all(
            (r.target, r.rps, r.p50_ms, r.p99_ms, r.non_2xx + sum(r.socket_errors.values())) for r in results
        )
        print()
        print("direct = nginx fast upstream, no proxy; nginx = nginx proxy injecting the header")
        for k, v in ratios.items():
            each = ", ".join(f"{x:.3f}" for x in per_round[k])
            shown = "n/a" if v is None else f"{v:.3f}"
            print(f"req/s {k:<14} {shown}  (median of the rounds' own ratios: {each})")
        if cpu_us is not None:
            print(
                f"broker CPU per request under wrk: {cpu_us:.1f} µs (user + system, "
                f"{broker_cpu_s:.2f} s over {broker_requests} requests)"
            )
        print()
        print(f"broker RSS (pid {pid}, /proc VmRSS)")
        print(f"  idle after start        {rss['idle_mib']:>8.1f} MiB")
        print(f"  after wrk runs          {rss['after_wrk_mib']:>8.1f} MiB")
        print(f"  peak while streaming    {rss['during_200mib_peak_mib']:>8.1f} MiB")
        print(f"  after 200 MiB stream    {rss['after_200mib_mib']:>8.1f} MiB")
        print(f"  delta from the stream   {rss['delta_200mib_mib']:>+8.1f} MiB")
        print(f"  delta since idle        {rss['delta_total_mib']:>+8.1f} MiB")
        print(f"  high-water mark (VmHWM) {rss['hwm_mib']:>8.1f} MiB")
        print(
            f"200 MiB stream: {big['bytes']} bytes ok in {big['seconds']:.2f}s ({big['mib_per_s']} MiB/s), "
            f"{'chunked' if big['chunked'] else 'content-length ' + str(big['content_length'])}"
        )
        bl.print_log_problems(problems, summarize_problems(problems, phases))

        bl.write_json(
            args.json,
            {
                "config": {
                    "duration_s": args.duration,
                    "rounds": args.rounds,
                    "connections": args.connections,
                    "threads": args.threads,
                    "warmup_s": args.warmup,
                    "nginx_workers": args.nginx_workers,
                    "path": bl.BENCH_PATH,
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "results": [{k: v for k, v in asdict(r).items() if k != "raw"} for r in results],
                "rounds": [
                    {t: {k: v for k, v in asdict(r).items() if k != "raw"} for t, r in rnd.items()}
                    for rnd in rounds
                ],
                "ratios_rps": ratios,
                "ratios_rps_per_round": {k: [round(x, 3) for x in v] for k, v in per_round.items()},
                "broker_cpu_us_per_request": cpu_us,
                "rss": rss,
                "stream_200mib": big,
                "broker_log_problems": problems,
                "phases": [{"name": n, "start": t0, "end": t1} for n, t0, t1 in phases],
            },
        )
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
