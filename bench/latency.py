"""Added-latency benchmark: the broker at a fixed, moderate request rate, against no proxy at all
and against nginx doing the same hop.

    python bench/latency.py [--rate 200] [--duration 20] [--block 0] [--json out.json]

What it starts, all on 127.0.0.1 and inside one temporary directory removed on exit: the nginx of
rest.py ("direct", the fast upstream answering `{"ok":true}`, and "nginx", a keep-alive proxy to it
injecting the same header: the reference), and the broker (one api_key route `/` -> direct, keyring
file backend in a temporary HOME, a fake sk_test_ key, warning-level log).

The load is open-loop: request i is started at t0 + i/rate whether or not earlier ones are done
(no coordinated omission from waiting on slow answers), at a rate far below what any target
saturates at. The targets take turns request by request (each at `--rate`, so 3 x rate in all;
the order rotating each round, so none always follows the same other),
so a stall of the machine (this VM's neighbours take the CPU for tens of ms at a time) delays the
requests of all alike: with 1-second blocks, as this script had, one 40 ms stall in a broker block
made ~8 slow broker requests and moved the broker's p99 alone. `--block S` brings the blocks back
(S seconds of each target in turn, for comparison). Each target has its own keep-alive client:
benchlib.LeanClient, a prepared GET and a Content-Length read, about half the client CPU per
request of the aiohttp ClientSession this bench used before (`--client aiohttp` brings it back). The
client is an instrument on the same 2 CPUs: with aiohttp it was the busiest process of the run,
and its own stalls (its garbage collector's full walks, 20-50 ms, were the longest) landed in
every target's tail alike; its collector is now paused while measuring. Latency is from just
before the request is sent until its whole body is read; how late each request started against
its schedule is reported too (the client's own lag, the same for all targets), and so are the
client's CPU per request and the machine's steal time while measuring: the CPU time the
hypervisor gave to other guests.

Added = target - direct at p50 and p99. Targets: the broker's added p50 < 0.5 ms, added p99 < 2 ms.
nginx's added latency is printed beside it: a proxy hop's share of the machine's noise, in C.
On a small machine the client, nginx and the broker share the CPUs: compare the columns.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import aiohttp  # noqa: E402
import benchlib as bl  # noqa: E402

TARGETS = ("direct", "broker", "nginx")  # nginx: the same hop done in C, for reference
PROXIES = TARGETS[1:]
ADDED_P50_TARGET_MS = 0.5
ADDED_P99_TARGET_MS = 2.0
PROBE_SLOW = 2.5  # a probe sample this many times its median marks a slow window of the machine
NEAR_S = 0.02  # a request this close to a slow probe sample is counted as in the window
SLOW_MS = 2.0  # the requests looked at: those taking longer than this


class Run:
    """Samples of one target: latency (ms), start lag against the schedule (ms), failures."""

    def __init__(self) -> None:
        self.latency_ms: list[float] = []
        self.lag_ms: list[float] = []
        self.failures: dict[str, int] = {}
        self.block_medians: list[float] = []
        self.at_s: list[float] = []  # scheduled time of each sample, seconds since the measured run began
        self.t0 = 0.0  # when the measured run began: the loop's clock, time.monotonic()
        self.new_connections = 0


class AiohttpClient:
    """GETs through an aiohttp ClientSession (keep-alive, no connection limit): the client this
    bench used before LeanClient, kept to compare the two instruments (`--client aiohttp`)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://{bl.HOST}:{port}{bl.BENCH_PATH}"
        self.opened = 0
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        async def on_create(*_: Any) -> None:
            self.opened += 1

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(on_create)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10),
            connector=aiohttp.TCPConnector(limit=0),
            trace_configs=[trace],
        )

    async def get(self) -> int:
        assert self.session is not None
        async with self.session.get(self.url) as resp:
            await resp.read()
            return resp.status

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


Client = bl.LeanClient | AiohttpClient


async def one_request(client: Client, scheduled: float, run: Run | None) -> None:
    loop = asyncio.get_running_loop()
    lag = loop.time() - scheduled
    started = time.perf_counter()
    try:
        status = await client.get()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if run is not None:
            key = type(exc).__name__
            run.failures[key] = run.failures.get(key, 0) + 1
        return
    elapsed_ms = (time.perf_counter() - started) * 1000
    if run is None:
        return
    if status != 200:
        run.failures[f"HTTP {status}"] = run.failures.get(f"HTTP {status}", 0) + 1
        return
    run.latency_ms.append(elapsed_ms)
    run.lag_ms.append(lag * 1000)
    run.at_s.append(scheduled)


Starter = Callable[[str, int, float], Coroutine[Any, Any, None]]  # (target, block, scheduled time)


async def open_loop(schedule: list[tuple[str, int]], rate: float, start: Starter) -> None:
    """Start request i at t0 + i/rate (start(target, block, scheduled time)); then wait for stragglers."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    tasks: set[asyncio.Task[None]] = set()
    for i, (target, blk) in enumerate(schedule):
        at = t0 + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(start(target, blk, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


def make_schedule(rate: float, duration: float, block: float) -> list[tuple[str, int]]:
    """(target, block number) per request, `rate` requests/s per target for `duration` seconds.

    block 0: the targets take turns request by request (a block is one request); else blocks of
    `block` seconds take turns. Block b is block_target(b)'s: each round of len(TARGETS) blocks
    starts one target further on, so none always runs right after the same other one."""
    n = len(TARGETS)
    if block == 0:
        return [(block_target(i), i) for i in range(n * max(1, round(rate * duration)))]
    per_block = max(1, round(rate * block))
    total = max(n * per_block, round(rate * duration))
    return [(block_target(i // per_block), i // per_block) for i in range(total)]


def block_target(b: int) -> str:
    n = len(TARGETS)
    return TARGETS[(b % n + b // n) % n]


def schedule_rate(rate: float, block: float) -> float:
    """Requests/s of the whole schedule: every target at once when they take turns per request."""
    return len(TARGETS) * rate if block == 0 else rate


async def measure(
    args: argparse.Namespace, ports: dict[str, int], broker_pid: int
) -> tuple[dict[str, Run], dict[str, list[float]], dict[str, float | None], float | None]:
    """Samples per target, each proxy's (proxy - direct) differences of neighbouring block
    medians, the broker's and this client's CPU seconds while measuring, and the machine's steal
    fraction."""
    runs = {t: Run() for t in TARGETS}
    clients: dict[str, Client] = {
        t: AiohttpClient(ports[t]) if args.client == "aiohttp" else bl.LeanClient(ports[t]) for t in TARGETS
    }
    try:
        for c in clients.values():
            if isinstance(c, AiohttpClient):
                await c.start()

        # warm-up, not recorded: open the keep-alive connections (client -> broker -> nginx) at the rate
        async def untracked(target: str, _blk: int, scheduled: float) -> None:
            await one_request(clients[target], scheduled, None)

        await open_loop(
            make_schedule(args.rate, args.warmup, args.block), schedule_rate(args.rate, args.block), untracked
        )

        # measured: samples kept per block (one request when alternating per request), for a
        # paired comparison that ignores slow drifts
        per_block: dict[int, Run] = {}

        async def tracked(target: str, blk: int, scheduled: float) -> None:
            await one_request(clients[target], scheduled, per_block.setdefault(blk, Run()))

        opened_before = {t: c.opened for t, c in clients.items()}
        cpu_before, machine_before = bl.cpu_seconds(broker_pid), bl.machine_cpu_ticks()
        with bl.client_collector_paused():
            client_before = bl.cpu_seconds(os.getpid())
            t_begin = asyncio.get_running_loop().time()
            await open_loop(
                make_schedule(args.rate, args.duration, args.block),
                schedule_rate(args.rate, args.block),
                tracked,
            )
            client_after = bl.cpu_seconds(os.getpid())
        cpu_after, machine_after = bl.cpu_seconds(broker_pid), bl.machine_cpu_ticks()
    finally:
        for c in clients.values():
            await c.close() if isinstance(c, AiohttpClient) else c.close()
    cpu = {
        "broker": cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None,
        "client": client_after - client_before
        if client_before is not None and client_after is not None
        else None,
    }
    steal = bl.steal_fraction(machine_before, machine_after)
    for t, c in clients.items():
        runs[t].new_connections = c.opened - opened_before[t]
    for blk, r in sorted(per_block.items()):
        target = block_target(blk)
        runs[target].latency_ms += r.latency_ms
        runs[target].lag_ms += r.lag_ms
        runs[target].at_s += [round(t - t_begin, 3) for t in r.at_s]
        runs[target].t0 = t_begin
        for k, v in r.failures.items():
            runs[target].failures[k] = runs[target].failures.get(k, 0) + v
        if r.latency_ms:
            runs[target].block_medians.append(bl.summarize_ms(r.latency_ms)["p50"])
    # blocks 3k, 3k+1 and 3k+2 (one per target) ran next to each other: a round
    rounds: dict[int, dict[str, float]] = {}
    for b, r in per_block.items():
        if r.latency_ms:
            median = bl.summarize_ms(r.latency_ms)["p50"]
            rounds.setdefault(b // len(TARGETS), {})[block_target(b)] = median
    paired = {t: [m[t] - m["direct"] for m in rounds.values() if t in m and "direct" in m] for t in PROXIES}
    return runs, paired, cpu, steal


def probe_report(path: Path, runs: dict[str, Run]) -> dict[str, Any] | None:
    """How often the machine was in a slow window while measuring, and how many of each target's
    slow requests started in one (bench/probe.py's samples against the requests' start times)."""
    try:
        samples = json.loads(path.read_text())["samples"]
    except (OSError, ValueError, KeyError):
        return None
    # when each request really started: its schedule plus the client's lag, which is largest in
    # exactly these windows
    starts = {
        t: [runs[t].t0 + a + lag / 1000 for a, lag in zip(runs[t].at_s, runs[t].lag_ms, strict=True)]
        for t in TARGETS
    }
    first = min((min(v) for v in starts.values() if v), default=None)
    last = max((max(v) for v in starts.values() if v), default=None)
    if first is None or last is None:
        return None
    measured = [(t, wall, cpu) for t, wall, cpu in samples if first <= t <= last]
    if len(measured) < 10:
        return None
    median = statistics.median(wall for _, wall, _ in measured)
    median_cpu = statistics.median(cpu for _, _, cpu in measured)
    slow = [(t, cpu) for t, wall, cpu in measured if wall > PROBE_SLOW * median]
    slow_at = [t for t, _ in slow]

    def near(t: float) -> bool:
        i = bisect.bisect_left(slow_at, t - NEAR_S)
        return i < len(slow_at) and slow_at[i] <= t + NEAR_S

    report: dict[str, Any] = {
        "median_ms": round(median, 4),
        "slow_fraction": len(slow_at) / len(measured),
        # of the slow samples, those whose CPU time was slow too: the work itself ran slower (the
        # rest: the probe waited for a CPU, which the bench's own processes can cause)
        "slow_in_cpu_fraction": (
            sum(cpu > PROBE_SLOW * median_cpu for _, cpu in slow) / len(slow) if slow else None
        ),
        "slow_ms": SLOW_MS,
        "near_s": NEAR_S,
        "targets": {},
    }
    n_all = n_near = 0
    for t in TARGETS:
        flags = [near(at) for at in starts[t]]
        over = [f for f, ms in zip(flags, runs[t].latency_ms, strict=True) if ms > SLOW_MS]
        outside = [ms for f, ms in zip(flags, runs[t].latency_ms, strict=True) if not f]
        report["targets"][t] = {
            "slow": len(over),
            "slow_near": sum(over),
            "n_outside": len(outside),
            "p99_outside_ms": bl.summarize_ms(outside).get("p99"),
        }
        n_all += len(flags)
        n_near += sum(flags)
    report["near_fraction"] = n_near / n_all if n_all else 0.0
    p99_out = {t: report["targets"][t]["p99_outside_ms"] for t in TARGETS}
    report["added_p99_outside_ms"] = {
        t: round(p99_out[t] - p99_out["direct"], 4)
        for t in PROXIES
        if p99_out[t] is not None and p99_out["direct"] is not None
    }
    return report


def span(args: argparse.Namespace) -> str:
    """How long each target is measured: all of it when they take turns per request."""
    return f"{args.duration:g}s" + (" per target" if not args.block else " in all")


def alternation(args: argparse.Namespace) -> str:
    return f"alternating {args.block:g}s blocks" if args.block else "alternating request by request"


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--rate", type=float, default=200.0, help="requests per second, open loop (default 200)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of measured load (default 20)")
    p.add_argument(
        "--block",
        type=float,
        default=0.0,
        help="seconds per alternating block; 0 (default) alternates request by request",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds per target (default 1)")
    p.add_argument(
        "--client",
        choices=("lean", "aiohttp"),
        default="lean",
        help="the measuring client: lean (default; benchlib.LeanClient, a prepared GET on keep-alive "
        "connections) or aiohttp (what this bench used before, about twice the client CPU per request)",
    )
    bl.add_output_args(p)
    a = p.parse_args()
    if a.rate <= 0 or a.duration <= 0 or a.block < 0 or a.warmup < 0:
        p.error("--rate and --duration must be positive, --block and --warmup not negative")
    return a


def main() -> int:
    args = parse_args()
    with bl.BenchRun("agentcard-bench-latency-", args.keep) as run:
        broker_log = run.broker_log
        ports = bl.free_ports("direct", "nginx", "broker")
        run.stop_on_exit(bl.start_nginx(run.tmp, ports["direct"], ports["nginx"]), "nginx")
        cfg, env = bl.prepare_broker(
            run.tmp, ports["broker"], [bl.api_route(f"http://{bl.HOST}:{ports['direct']}")]
        )
        broker = run.stop_on_exit(bl.start_broker(cfg, env, ports["broker"], broker_log), "broker")
        bl.sanity(ports)

        print(
            f"open loop at {args.rate:g} req/s per target for {span(args)}, {alternation(args)} ...",
            file=sys.stderr,
        )
        probe_out = run.tmp / "probe.json"
        rate = schedule_rate(args.rate, args.block)
        n_requests = len(make_schedule(args.rate, args.warmup, args.block)) + len(
            make_schedule(args.rate, args.duration, args.block)
        )
        probe = subprocess.Popen(
            [
                *(sys.executable, str(HERE / "probe.py")),
                *("--seconds", str(round(n_requests / rate + 60)), "--out", str(probe_out)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            preexec_fn=bl.pdeathsig,
        )
        assert probe.stdout is not None
        if probe.stdout.readline().strip() != b"ready":  # its list built: it samples from now on
            bl.stop_process(probe, "probe")
            raise RuntimeError("bench/probe.py did not start")
        try:
            runs, pair_diffs, cpu_s, steal = asyncio.run(measure(args, ports, broker.pid))
        finally:
            bl.stop_process(probe, "probe")
        machine = probe_report(probe_out, runs)
        n_broker = len(runs["broker"].latency_ms) + sum(runs["broker"].failures.values())
        n_all = sum(len(r.latency_ms) + sum(r.failures.values()) for r in runs.values())
        broker_cpu_s, client_cpu_s = cpu_s["broker"], cpu_s["client"]
        cpu_us = round(broker_cpu_s * 1e6 / n_broker, 1) if broker_cpu_s is not None and n_broker else None
        client_us = round(client_cpu_s * 1e6 / n_all, 1) if client_cpu_s is not None and n_all else None
        if broker.poll() is not None:
            raise RuntimeError(
                f"broker died during the run (code {broker.returncode}):\n{bl.tail(broker_log)}"
            )
        bl.sanity(ports)
        problems = bl.broker_log_problems(broker_log)
        gc_pauses = bl.gc_pauses(ports["broker"])

        res: dict[str, Any] = {t: bl.summarize_ms(runs[t].latency_ms) for t in TARGETS}
        lag = {t: bl.summarize_ms(runs[t].lag_ms) for t in TARGETS}
        fails = {t: runs[t].failures for t in TARGETS}
        table = bl.tcp_table()
        slow = {
            t: sorted(zip(runs[t].at_s, runs[t].latency_ms, strict=True), key=lambda x: -x[1])[:5]
            for t in TARGETS
        }
        if any(res[t].get("n", 0) == 0 for t in TARGETS):
            raise RuntimeError(f"no successful requests for a target; failures: {fails}")
        quantiles = ("p50", "p90", "p99", "mean")
        added_by = {t: {q: round(res[t][q] - res["direct"][q], 4) for q in quantiles} for t in PROXIES}
        for t in PROXIES:
            added_by[t]["median_of_block_median_diffs"] = (
                round(statistics.median(pair_diffs[t]), 4) if pair_diffs[t] else None
            )
        added = added_by["broker"]

        print()
        print(
            f"agentcard-broker latency bench: open loop GET {bl.BENCH_PATH} at {args.rate:g} req/s for "
            f"{span(args)}, {alternation(args)}, keep-alive "
            f"({os.cpu_count()} CPUs, python {platform.python_version()}, client {args.client})"
        )
        print()
        ms = ">7.3f"
        bl.Table(
            ("target", "<7"),
            ("n", ">5"),
            ("p50 ms", ms),
            ("p90 ms", ms),
            ("p99 ms", ms),
            ("mean ms", ms),
            ("max ms", ms),
            ("lag p99 ms", ">10.3f"),
            ("failures", ""),
        ).print_all(
            (t, s["n"], s["p50"], s["p90"], s["p99"], s["mean"], s["max"], lag[t]["p99"], fails[t] or 0)
            for t, s in res.items()
        )
        print()
        for t in PROXIES:
            a = added_by[t]
            print(
                f"added by {'the broker' if t == 'broker' else t + ' (reference)'}: p50 {a['p50']:+.3f} ms, "
                f"p90 {a['p90']:+.3f} ms, p99 {a['p99']:+.3f} ms, mean {a['mean']:+.3f} ms"
            )
            if a["median_of_block_median_diffs"] is not None:
                print(
                    f"  paired: median over {len(pair_diffs[t])} neighbouring pairs of ({t} - direct) "
                    f"{'request latencies' if not args.block else 'block medians'} "
                    f"{a['median_of_block_median_diffs']:+.3f} ms"
                )
        if steal is not None:
            print(
                f"CPU time the hypervisor took from this VM while measuring (steal): {steal * 100:.1f}% "
                "(each wait for a CPU lands in a request's latency; the broker's path has two more "
                "process wake-ups than direct's, nginx's too)"
            )
        if cpu_us is not None:
            print(f"broker CPU per request at this rate: {cpu_us:.1f} µs (user + system over the run)")
        if client_us is not None:
            print(
                f"client ({args.client}) CPU per request: {client_us:.1f} µs; its collector was paused while "
                "measuring"
            )
        print("lag = how late a request started against its schedule (the client's own delay)")
        for t in TARGETS:
            print(
                f"  {t}: slowest at (s into the run: ms) {', '.join(f'{a:.2f}: {v:.1f}' for a, v in slow[t])}"
            )
        print(
            "new connections opened while measuring: "
            + ", ".join(f"{t} {runs[t].new_connections}" for t in TARGETS)
            + f"; TCP sockets on this machine: {table['entries']}, reading /proc/net/tcp takes "
            f"{table['read_ms']} ms"
        )
        print(
            "broker garbage collections since start (count, longest pause): "
            + ", ".join(f"gen{g} {v['count']:g}, {v['max_ms']:.2f} ms" for g, v in sorted(gc_pauses.items()))
        )
        if machine is not None:
            in_cpu = machine["slow_in_cpu_fraction"]
            print(
                f"machine probe (bench/probe.py, the same memory-bound work every 10 ms): median "
                f"{machine['median_ms']:.3f} ms; {machine['slow_fraction'] * 100:.1f}% of samples over "
                f"{PROBE_SLOW:g}x that (slow windows)"
                + (f", {in_cpu * 100:.0f}% of those slow in CPU time too" if in_cpu is not None else "")
            )
            print(
                f"  requests over {SLOW_MS:g} ms, and how many started within {NEAR_S * 1000:g} ms of a slow "
                "probe sample: "
                + ", ".join(f"{t} {v['slow']} ({v['slow_near']})" for t, v in machine["targets"].items())
                + f"; of all requests, {machine['near_fraction'] * 100:.1f}% started that close to one "
                "(the share by chance)"
            )
            outside = machine["added_p99_outside_ms"]
            if outside:
                print(
                    "  added p99 among the requests outside those windows: "
                    + ", ".join(f"{t} {v:+.3f} ms" for t, v in outside.items())
                    + " ("
                    + ", ".join(f"{t} {v['n_outside']}" for t, v in machine["targets"].items())
                    + " requests)"
                )
        bl.print_log_problems(problems)

        checks = [
            bl.check("latency: added p50", added["p50"], "ms", "<", ADDED_P50_TARGET_MS),
            bl.check("latency: added p99", added["p99"], "ms", "<", ADDED_P99_TARGET_MS),
        ]
        bl.report_checks(
            checks,
            args.json,
            {
                "config": {
                    "rate": args.rate,
                    "duration_s": args.duration,
                    "block_s": args.block,
                    "warmup_s": args.warmup,
                    "path": bl.BENCH_PATH,
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "aiohttp": aiohttp.__version__,
                    "client": args.client,
                },
                "latency_ms": res,
                "lag_ms": lag,
                "failures": fails,
                "added_ms": added,
                "added_by_nginx_ms": added_by["nginx"],
                "steal_fraction": steal,
                "broker_cpu_us_per_request": cpu_us,
                "client_cpu_us_per_request": client_us,
                "block_medians_ms": {t: runs[t].block_medians for t in TARGETS},
                "slowest": {t: [{"at_s": a, "ms": round(v, 3)} for a, v in slow[t]] for t in TARGETS},
                # every sample as [scheduled s into the run, ms], to see what the tails line up with
                "samples": {
                    t: [[a, round(v, 3)] for a, v in zip(runs[t].at_s, runs[t].latency_ms, strict=True)]
                    for t in TARGETS
                },
                "new_connections": {t: runs[t].new_connections for t in TARGETS},
                "tcp_table_after": table,
                "broker_log_problems": problems,
                "broker_gc": gc_pauses,
                "machine_probe": machine,
            },
        )
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
