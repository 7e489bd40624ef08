"""Memory and leak benchmark: the broker's RSS, asyncio tasks and open fds idle and under long streams.

    python bench/memory.py [--streams 1000] [--requests 10000] [--concurrency 16] [--json out.json]

What it starts, all on 127.0.0.1 and inside one temporary directory removed on exit:

* the nginx of rest.py ("direct": `{"ok":true}` and /big, a 200 MiB sparse file);
* an SSE upstream in this process (aiohttp): GET /sse/... answers `text/event-stream` and sends one
  small event at once and then every second, keeping the stream open until the peer goes away;
* the broker (`agentcard-broker run`, started after RLIMIT_NOFILE is raised to the hard limit so it
  inherits it): route `api` (/) -> nginx and route `sse` (/sse) -> the SSE upstream, fake sk_test_
  keys in a keyring file backend in a temporary HOME, warning-level log.

Phases, each sampled as VmRSS (/proc/PID/status) plus tasks and open fds (/_broker/status "process",
asked on a fresh connection that itself counts as one fd and one task in every sample):

1. idle, 1 s after the broker answers /_broker/health;
2. `--streams` concurrent SSE GETs through the broker (one aiohttp ClientSession, no connector
   limit), sampled once every stream has had its first event (or failed, or `--stream-timeout`);
3. all streams closed by the client, sampled `--settle` s later; tasks and fds must be back at idle
   (when not, they are polled up to 20 s more to tell slow from leaked);
4. 200 MiB downloaded from nginx /big through the broker, read 1 MiB at a time (benchlib.stream_big;
   the body is never held), RSS sampled every 20 ms meanwhile;
5. `--requests` small GETs with `--concurrency` keep-alive connections.

Targets: SSE streams open < 60 MiB over idle; the 200 MiB stream < 10 MiB over the RSS just before
it (the peak while streaming counts); tasks and fds back to idle once the streams are closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import aiohttp  # noqa: E402
import benchlib as bl  # noqa: E402
from aiohttp import web  # noqa: E402

SSE_RSS_TARGET_MIB = 60.0
BIG_RSS_TARGET_MIB = 10.0
LEAK_POLL_S = 20.0


# ---------------------------------------------------------------- the SSE upstream


class SseUpstream:
    """text/event-stream, one small event now and then every second, until the peer goes away."""

    def __init__(self) -> None:
        self.open = 0
        self.served = 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        self.open += 1
        self.served += 1
        try:
            n = 0
            while True:
                await resp.write(f'id: {n}\nevent: tick\ndata: {{"n": {n}}}\n\n'.encode())
                n += 1
                await asyncio.sleep(1.0)
        except (ConnectionError, asyncio.CancelledError):
            pass  # the broker went away: that is how these streams end
        finally:
            self.open -= 1
        return resp

    async def start(self, port: int) -> None:
        app = web.Application()
        app.router.add_get("/sse/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, bl.HOST, port, backlog=4096).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# ---------------------------------------------------------------- sampling


def sample(pid: int, port: int, phase: str, **extra: Any) -> dict[str, Any]:
    status = bl.broker_status(port)
    proc = status.get("process") or {}
    rss = bl.rss_kib(pid)
    return {
        "phase": phase,
        "rss_kib": rss["VmRSS"],
        "hwm_kib": rss["VmHWM"],
        "tasks": proc.get("tasks"),
        "open_fds": proc.get("open_fds"),
        "in_flight": status.get("in_flight"),
        "at": time.time(),
        **extra,
    }


async def asample(pid: int, port: int, phase: str, **extra: Any) -> dict[str, Any]:
    return await asyncio.to_thread(sample, pid, port, phase, **extra)


# ---------------------------------------------------------------- phase 2 and 3: SSE streams


class Streams:
    def __init__(self, n: int) -> None:
        self.n = n
        self.first = 0  # streams that received their first event
        self.settled = 0  # first event or failure
        self.events = 0
        self.failures: Counter[str] = Counter()
        self.cut_after_first = 0
        self.all_settled = asyncio.Event()
        self.first_times: list[float] = []

    def settle(self) -> None:
        self.settled += 1
        if self.settled >= self.n:
            self.all_settled.set()


async def one_stream(session: aiohttp.ClientSession, url: str, st: Streams, t0: float) -> None:
    resp: aiohttp.ClientResponse | None = None
    got_first = False
    try:
        resp = await session.get(url, headers={"Accept": "text/event-stream"})
        if resp.status != 200:
            code = resp.headers.get("X-Broker-Error", "")
            st.failures[f"HTTP {resp.status} {code}".strip()] += 1
            return
        async for line in resp.content:
            if line.startswith(b"data:"):
                st.events += 1
                if not got_first:
                    got_first = True
                    st.first += 1
                    st.first_times.append(time.perf_counter() - t0)
                    st.settle()
        if got_first:
            st.cut_after_first += 1
        else:
            st.failures["ended before the first event"] += 1
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        if got_first:
            st.cut_after_first += 1
        else:
            st.failures[type(exc).__name__] += 1
    finally:
        if resp is not None:
            resp.close()
        if not got_first:
            st.settle()


async def sse_phase(
    args: argparse.Namespace, pid: int, port: int, up: SseUpstream, idle: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    url = f"http://{bl.HOST}:{port}/sse/stream"
    st = Streams(args.streams)
    session = aiohttp.ClientSession(
        # no limit; force_close: a refused stream's connection is closed, not kept idle in the pool
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
    )
    samples: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    tasks: list[asyncio.Task[None]] = []
    try:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one_stream(session, url, st, t0)) for _ in range(args.streams)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.all_settled.wait(), args.stream_timeout)
        info["open_s"] = round(time.perf_counter() - t0, 3)
        await asyncio.sleep(1.0)
        first_sorted = sorted(st.first_times)
        samples.append(
            await asample(
                pid,
                port,
                f"{args.streams} SSE streams open",
                note=f"{st.first}/{args.streams} had their first event",
            )
        )
        info.update(
            {
                "streams": args.streams,
                "first_event": st.first,
                "failures_before_first": dict(st.failures),
                "cut_after_first_event": st.cut_after_first,
                "upstream_open_at_sample": up.open,
                "upstream_served": up.served,
                "events_received": st.events,
                "first_event_s_p50": round(first_sorted[len(first_sorted) // 2], 3) if first_sorted else None,
                "first_event_s_max": round(first_sorted[-1], 3) if first_sorted else None,
            }
        )
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
    closed_at = time.perf_counter()
    await asyncio.sleep(args.settle)
    after = await asample(
        pid, port, f"streams closed (+{args.settle:g} s)", note=f"SSE upstream still open: {up.open}"
    )
    samples.append(after)
    info["upstream_open_after_close"] = up.open
    # not back? poll a while longer to tell "slow" from "leaked"
    back_after: float | None = args.settle if _back(after, idle) else None
    last = after
    while back_after is None and time.perf_counter() - closed_at < args.settle + LEAK_POLL_S:
        await asyncio.sleep(0.5)
        last = await asample(pid, port, "poll")
        if _back(last, idle):
            back_after = round(time.perf_counter() - closed_at, 1)
    info["back_to_idle_after_s"] = back_after
    info["last_poll"] = {k: last[k] for k in ("tasks", "open_fds", "rss_kib", "in_flight")}
    info["upstream_open_at_last_poll"] = up.open
    return samples, info


def _back(s: dict[str, Any], idle: dict[str, Any]) -> bool:
    return bool(s["tasks"] == idle["tasks"] and s["open_fds"] == idle["open_fds"])


# ---------------------------------------------------------------- phase 5: small GETs


async def small_gets(port: int, n: int, concurrency: int) -> dict[str, Any]:
    url = f"http://{bl.HOST}:{port}{bl.BENCH_PATH}"
    statuses: Counter[str] = Counter()
    left = iter(range(n))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:

        async def worker() -> None:
            for _ in left:
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        statuses[str(resp.status)] += 1
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    statuses[type(exc).__name__] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "requests": n,
        "statuses": dict(statuses),
        "seconds": round(elapsed, 3),
        "rps": round(n / elapsed),
    }


# ---------------------------------------------------------------- main


async def amain(args: argparse.Namespace, nofile: tuple[int, int]) -> int:
    up = SseUpstream()
    async with bl.BenchRun("agentcard-bench-memory-", args.keep) as run:
        broker_log = run.broker_log
        ports = bl.free_ports("direct", "nginx", "broker", "sse")
        nginx = await asyncio.to_thread(
            bl.start_nginx, run.tmp, ports["direct"], ports["nginx"], big_bytes=bl.BIG_BYTES
        )
        run.stop_on_exit(nginx, "nginx")
        run.callback(up.stop)
        await up.start(ports["sse"])

        routes = [
            bl.api_route(f"http://{bl.HOST}:{ports['direct']}"),
            bl.api_route(f"http://{bl.HOST}:{ports['sse']}/sse", name="sse", prefix="/sse"),
        ]
        cfg, env = await asyncio.to_thread(bl.prepare_broker, run.tmp, ports["broker"], routes)
        broker = await asyncio.to_thread(bl.start_broker, cfg, env, ports["broker"], broker_log)
        run.stop_on_exit(broker, "broker")
        pid = int(bl.broker_status(ports["broker"]).get("pid") or broker.pid)
        limits = Path(f"/proc/{pid}/limits").read_text()
        broker_nofile = next((ln.split()[3:5] for ln in limits.splitlines() if "open files" in ln), None)

        await asyncio.sleep(1.0)
        idle = await asample(pid, ports["broker"], "idle after start")
        samples = [idle]

        print(f"opening {args.streams} SSE streams through the broker ...", file=sys.stderr)
        sse_samples, sse = await sse_phase(args, pid, ports["broker"], up, idle)
        samples += sse_samples
        print(
            f"  {sse['first_event']}/{args.streams} streams had their first event in {sse['open_s']} s; "
            f"back to idle after: {sse['back_to_idle_after_s']}",
            file=sys.stderr,
        )
        if broker.poll() is not None:
            raise RuntimeError(f"broker died during the SSE phase:\n{bl.tail(broker_log)}")

        before_big = await asample(pid, ports["broker"], "before the 200 MiB stream")
        print("streaming 200 MiB through the broker ...", file=sys.stderr)
        big = await asyncio.to_thread(bl.stream_big, ports["broker"], pid)
        await asyncio.sleep(0.5)
        after_big = await asample(
            pid,
            ports["broker"],
            "after a 200 MiB stream",
            note=f"peak during {bl.mib(big['peak_rss_during_kib']):.1f} MiB, {big['mib_per_s']} MiB/s",
        )
        samples.append(after_big)
        big_growth_kib = max(big["peak_rss_during_kib"], after_big["rss_kib"]) - before_big["rss_kib"]

        print(f"{args.requests} small GETs, {args.concurrency} connections ...", file=sys.stderr)
        gets = await small_gets(ports["broker"], args.requests, args.concurrency)
        await asyncio.sleep(0.5)
        samples.append(
            await asample(
                pid,
                ports["broker"],
                f"after {args.requests} small GETs",
                note=f"{gets['rps']} req/s, statuses {gets['statuses']}",
            )
        )
        if broker.poll() is not None:
            raise RuntimeError(f"broker died:\n{bl.tail(broker_log)}")
        await asyncio.to_thread(bl.sanity, {**ports})
        problems = bl.broker_log_problems(broker_log)

        # ------------------------------------------------------------ report
        print()
        print(
            f"agentcard-broker memory bench ({os.cpu_count()} CPUs, python {platform.python_version()}, "
            f"aiohttp {aiohttp.__version__}); broker pid {pid}, RLIMIT_NOFILE soft/hard here {nofile[0]}/"
            f"{nofile[1]}, broker {'/'.join(broker_nofile or ['?'])}"
        )
        print()
        width = max(len(s["phase"]) for s in samples)
        bl.Table(
            ("phase", f"<{width}"),
            ("RSS MiB", ">7.1f"),
            ("Δ idle", ">+7.1f"),
            ("tasks", ">5"),
            ("fds", ">5"),
            ("note", ""),
        ).print_all(
            (
                s["phase"],
                bl.mib(s["rss_kib"]),
                bl.mib(s["rss_kib"] - idle["rss_kib"]),
                str(s["tasks"]),
                str(s["open_fds"]),
                s.get("note", ""),
            )
            for s in samples
        )
        print()
        print(
            f"SSE: {sse['first_event']}/{sse['streams']} had a first event (p50 "
            f"{sse['first_event_s_p50']} s, max {sse['first_event_s_max']} s after opening); failures "
            f"before the first event: {sse['failures_before_first'] or 'none'}; cut after it: "
            f"{sse['cut_after_first_event']}"
        )
        print(
            f"SSE upstream: {sse['upstream_served']} streams served, {sse['upstream_open_at_sample']} open "
            f"at the sample, {sse['upstream_open_after_close']} still open {args.settle:g} s after the "
            "client closed"
        )
        if sse["back_to_idle_after_s"] is None:
            lp = sse["last_poll"]
            print(
                f"NOT back to idle {args.settle + LEAK_POLL_S:g} s after closing: tasks {lp['tasks']} "
                f"(idle {idle['tasks']}), fds {lp['open_fds']} (idle {idle['open_fds']}), in_flight "
                f"{lp['in_flight']}, SSE upstream streams still open {sse['upstream_open_at_last_poll']}"
            )
        else:
            print(f"tasks and fds back to idle {sse['back_to_idle_after_s']} s after the client closed")
        print(
            f"200 MiB stream: RSS before {bl.mib(before_big['rss_kib']):.1f} MiB, peak during "
            f"{bl.mib(big['peak_rss_during_kib']):.1f} MiB, after {bl.mib(after_big['rss_kib']):.1f} MiB: "
            f"growth {bl.mib(big_growth_kib):+.1f} MiB; {big['bytes']} bytes in {big['seconds']} s"
        )
        print(f"high-water mark (VmHWM) at the end: {bl.mib(samples[-1]['hwm_kib']):.1f} MiB")
        print("(fds after the stream/GET phases include the broker's pooled keep-alive connections to nginx)")
        bl.print_log_problems(problems)

        after_close = sse_samples[1]
        partial = (
            f"only {sse['first_event']}/{args.streams} streams open"
            if sse["first_event"] < args.streams
            else None
        )
        checks = [
            bl.check("memory: SSE streams with a first event", sse["first_event"], "", ">=", args.streams),
            bl.check(
                f"memory: RSS with {args.streams} SSE streams (Δ idle)",
                bl.mib(sse_samples[0]["rss_kib"] - idle["rss_kib"]),
                "MiB",
                "<",
                SSE_RSS_TARGET_MIB,
                invalid=partial,
            ),
            bl.check(
                "memory: 200 MiB stream RSS growth", bl.mib(big_growth_kib), "MiB", "<", BIG_RSS_TARGET_MIB
            ),
            bl.check(
                f"memory: tasks over idle {args.settle:g}s after close",
                after_close["tasks"] - idle["tasks"],
                "",
                "==",
                0,
            ),
            bl.check(
                f"memory: fds over idle {args.settle:g}s after close",
                after_close["open_fds"] - idle["open_fds"],
                "",
                "==",
                0,
            ),
        ]
        bl.report_checks(
            checks,
            args.json,
            {
                "config": {
                    "streams": args.streams,
                    "requests": args.requests,
                    "concurrency": args.concurrency,
                    "settle_s": args.settle,
                    "stream_timeout_s": args.stream_timeout,
                    "nofile_bench": list(nofile),
                    "nofile_broker": broker_nofile,
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "aiohttp": aiohttp.__version__,
                },
                "samples": samples,
                "sse": sse,
                "stream_200mib": {
                    **big,
                    "before_rss_kib": before_big["rss_kib"],
                    "growth_kib": big_growth_kib,
                },
                "small_gets": gets,
                "broker_log_problems": problems,
            },
        )
    return run.exit_code


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--streams", type=int, default=1000, help="concurrent SSE streams (default 1000)")
    p.add_argument("--stream-timeout", type=float, default=60.0, help="seconds to wait for first events")
    p.add_argument("--settle", type=float, default=2.0, help="seconds after closing before sampling (2)")
    p.add_argument("--requests", type=int, default=10000, help="small GETs in the last phase (10000)")
    p.add_argument("--concurrency", type=int, default=16, help="connections for the small GETs (16)")
    bl.add_output_args(p)
    a = p.parse_args()
    if a.streams < 1 or a.requests < 1 or a.concurrency < 1:
        p.error("--streams, --requests and --concurrency must be at least 1")
    return a


def main() -> int:
    args = parse_args()
    nofile = bl.raise_nofile()  # before the broker starts: it inherits the limit
    if nofile[0] < 2 * args.streams + 256:
        print(f"note: RLIMIT_NOFILE is {nofile[0]}; {args.streams} streams need about {2 * args.streams}")
    return bl.run_async(amain(args, nofile))


if __name__ == "__main__":
    sys.exit(main())
