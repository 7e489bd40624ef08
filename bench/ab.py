"""A/B: the broker's CPU per request and req/s, this checkout against another commit, interleaved.

    python bench/ab.py [--base HEAD] [--rounds 6] [--duration 3] [--rate R] [--json out.json]

For a change to the forwarding path: is it cheaper? On a noisy machine two bench/all.py runs an
hour apart cannot tell a 5% change from the machine's mood, so this runs both versions at once.
What it starts, all on 127.0.0.1 inside one temporary directory removed on exit: `git worktree`
of `--base` (removed on exit too), rest.py's nginx ("direct", the fast upstream), and two brokers
on the same config shape (one api_key route `/` -> direct, the fake sk_test_ key, keyring file
backend, warning-level log): "base" runs the worktree's broker/ (PYTHONPATH), "this" runs this
checkout's. wrk then alternates between them, `--rounds` runs each, A/B then B/A, and each run
reads the broker's CPU time (user + system, /proc) over the requests it served. With `--rate R`
a paced client at R requests/s per version replaces wrk, the two versions taking turns request
by request on one connection each (a request waits for the previous answer, so a slow answer
delays the next few: fine for CPU per request, which is what this is for, not for latency): the
cold-cache cost that tail latency pays for.

Reported: per version, the median over rounds of CPU µs per request and of req/s, and the median
of the per-round ratios (this / base). CPU time is the steadier figure: it does not count time
spent waiting for a CPU, which is what the machine's noise mostly is. Exit 0 unless something
failed; no target is judged here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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
from rest import run_wrk  # noqa: E402

VERSIONS = ("base", "this")


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


async def paced(ports: dict[str, int], rate: float, seconds: float) -> dict[str, list[float]]:
    """Paced at `rate` requests/s per version, the two taking turns request by request, one
    keep-alive connection each, each request after the previous answer; every latency (ms)."""
    clients = {v: bl.LeanClient(ports[v]) for v in VERSIONS}
    latency: dict[str, list[float]] = {v: [] for v in VERSIONS}
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        for i in range(round(2 * rate * seconds)):
            delay = t0 + i / (2 * rate) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            v = VERSIONS[i % 2]
            started = time.perf_counter()
            status = await clients[v].get()
            if status != 200:
                raise RuntimeError(f"{v} answered {status}")
            latency[v].append((time.perf_counter() - started) * 1000)
    finally:
        for c in clients.values():
            c.close()
    return latency


def paced_round(
    n: int,
    args: argparse.Namespace,
    ports: dict[str, int],
    brokers: dict[str, Any],
    samples: dict[str, list[dict[str, float]]],
) -> None:
    cpu0 = {v: bl.cpu_seconds(brokers[v].pid) for v in VERSIONS}
    with bl.client_collector_paused():
        latency = asyncio.run(paced(ports, args.rate, args.duration if n else 1.0))
    cpu1 = {v: bl.cpu_seconds(brokers[v].pid) for v in VERSIONS}
    if not n:
        return
    for v in VERSIONS:
        c0, c1 = cpu0[v], cpu1[v]
        if c0 is None or c1 is None:
            continue
        us = (c1 - c0) * 1e6 / len(latency[v])
        p50 = statistics.median(latency[v])
        samples[v].append({"cpu_us": us, "p50_ms": p50})
        print(f"  round {n} {v:<4} p50 {p50:6.3f} ms  {us:6.1f} µs CPU/request", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--base", default="HEAD", help="the commit to compare against (default HEAD)")
    p.add_argument("--rounds", type=int, default=6, help="wrk runs per version (default 6)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per wrk run (default 3)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="instead of wrk, a paced client at this many requests/s per version, taking turns "
        "(at 200 every request meets cold caches: CPU per request is several times wrk's)",
    )
    bl.add_output_args(p)
    a = p.parse_args()
    if a.rounds < 1 or a.duration <= 0:
        p.error("--rounds must be at least 1 and --duration positive")
    return a


def main() -> int:
    args = parse_args()
    base_commit = git("rev-parse", "--short", args.base)
    with bl.BenchRun("agentcard-bench-ab-", args.keep) as run:
        tree = run.tmp / "base"
        git("worktree", "add", "--detach", str(tree), base_commit)
        try:
            ports = bl.free_ports("direct", "nginx", "base", "this")
            run.stop_on_exit(bl.start_nginx(run.tmp, ports["direct"], ports["nginx"]), "nginx")
            brokers: dict[str, Any] = {}
            for v in VERSIONS:
                vdir = run.tmp / v
                vdir.mkdir(exist_ok=True)
                cfg, env = bl.prepare_broker(
                    vdir, ports[v], [bl.api_route(f"http://{bl.HOST}:{ports['direct']}")]
                )
                if v == "base":
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
                    # -P: without the current directory (this checkout) first on the path
                    probe = [sys.executable, "-P", "-c", "import broker; print(broker.__file__)"]
                    where = bl.capture(probe, env=env)
                    if not where.stdout.strip().startswith(str(tree)):
                        raise RuntimeError(
                            f"base would not run the worktree's code: {where.stdout}{where.stderr}"
                        )
                brokers[v] = run.stop_on_exit(bl.start_broker(cfg, env, ports[v], vdir / "broker.log"), v)
            samples: dict[str, list[dict[str, float]]] = {v: [] for v in VERSIONS}
            for n in range(args.rounds + 1):  # round 0 warms both up, unrecorded
                if args.rate:
                    paced_round(n, args, ports, brokers, samples)
                    continue
                for v in VERSIONS if n % 2 else VERSIONS[::-1]:
                    url = f"http://{bl.HOST}:{ports[v]}{bl.BENCH_PATH}"
                    pid = brokers[v].pid
                    cpu0 = bl.cpu_seconds(pid)
                    res = run_wrk(v, url, args, args.duration if n else 1.0)
                    cpu1 = bl.cpu_seconds(pid)
                    if res.non_2xx or sum(res.socket_errors.values()):
                        raise RuntimeError(f"{v}: non-2xx {res.non_2xx}, socket errors {res.socket_errors}")
                    if n and cpu0 is not None and cpu1 is not None and res.requests:
                        us = (cpu1 - cpu0) * 1e6 / res.requests
                        samples[v].append({"cpu_us": us, "rps": res.rps})
                        print(
                            f"  round {n} {v:<4} {res.rps:>9.0f} req/s  {us:6.1f} µs CPU/request",
                            file=sys.stderr,
                        )
            for v in VERSIONS:
                if brokers[v].poll() is not None:
                    raise RuntimeError(f"the {v} broker died:\n{bl.tail(run.tmp / v / 'broker.log')}")
        finally:
            git("worktree", "remove", "--force", str(tree))

        def med(v: str, k: str) -> float:
            return statistics.median(s[k] for s in samples[v])

        second = "p50_ms" if args.rate else "rps"  # the latency at a fixed rate, else req/s
        ratios = {
            k: statistics.median(t[k] / b[k] for b, t in zip(samples["base"], samples["this"], strict=True))
            for k in ("cpu_us", second)
        }
        this = bl.broker_code()
        load = (
            f"paced {args.rate:g} req/s each, taking turns"
            if args.rate
            else f"wrk -t{args.threads} -c{args.connections}"
        )
        print()
        print(
            f"agentcard-broker A/B: base {base_commit} vs this checkout ({this}); {load}, "
            f"{args.rounds} x {args.duration:g}s, interleaved"
        )
        print()
        fmt = (">9.3f", "p50 ms") if args.rate else (">9.0f", "req/s")
        bl.Table(("version", "<7"), ("CPU µs/request", ">14.1f"), (fmt[1], fmt[0]), ruled=True).print_all(
            (v, med(v, "cpu_us"), med(v, second)) for v in VERSIONS
        )
        print()
        print(
            f"this / base, median of per-round ratios: CPU per request {ratios['cpu_us']:.3f}, "
            f"{fmt[1]} {ratios[second]:.3f}"
        )
        bl.write_json(
            args.json,
            {
                "base": base_commit,
                "this": this,
                "config": {"rounds": args.rounds, "duration_s": args.duration, "rate": args.rate or None},
                "samples": samples,
                "median": {v: {"cpu_us": med(v, "cpu_us"), second: med(v, second)} for v in VERSIONS},
                "ratio_this_over_base": ratios,
            },
        )
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
