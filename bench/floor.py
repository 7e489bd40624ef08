"""How much of the broker's tail latency is any Python proxy on this machine: the broker beside a
minimal Python relay and nginx, all doing the same hop, at a fixed rate, request by request.

    python bench/floor.py [--rate 100] [--duration 25] [--json out.json]

What it starts, all on 127.0.0.1 inside one temporary directory removed on exit: rest.py's nginx
("direct", the fast upstream, and "nginx", a proxy to it injecting the header), the broker (one
api_key route `/` -> direct, the fake sk_test_ key) and "relay": this file run as `relay`, the
least a Python proxy can do (uvloop; per agent connection one upstream connection; bytes copied
both ways, the header spliced in; no parsing, no checks). It is a yardstick, not a proxy: it
assumes each read holds whole requests.

The load: open loop, the four targets taking turns request by request (the order rotating each
round), each at `--rate`, one benchlib.LeanClient per target (its collector paused while
measuring). Reported per target: p50 and p99, each
minus direct's ("added"), each Python proxy's CPU per request (/proc), and the machine's steal
time while measuring. On this VM, quiet (under 2% steal) and measured with the lean client, the
relay (~100 µs of CPU per request) added about +0.5 ms at p99 and the broker (~500 µs) about
+3.5 ms; with 5-15% steal (and the earlier aiohttp client) the relay alone added about +4 ms.
What a Python process needs per request is what the machine's slow windows multiply. No target
is judged here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

TARGETS = ("direct", "relay", "broker", "nginx")


def relay(listen_port: int, upstream_port: int) -> None:
    """The yardstick relay: agent bytes to the upstream with the header added, answers back."""
    import uvloop

    class Up(asyncio.Protocol):
        def __init__(self, agent: asyncio.Transport) -> None:
            self.agent = agent

        def data_received(self, data: bytes) -> None:
            self.agent.write(data)

    class Agent(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport
            self.up: Any = None
            self.pending: list[bytes] = []
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            up, _ = await loop.create_connection(lambda: Up(self.transport), "127.0.0.1", upstream_port)
            self.up = up
            for data in self.pending:
                up.write(data)

        def data_received(self, data: bytes) -> None:
            data = data.replace(b"\r\nHost: ", b"\r\nAuthorization: Bearer relay\r\nHost: ", 1)
            if self.up is None:
                self.pending.append(data)
            else:
                self.up.write(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.up is not None:
                self.up.close()

    async def serve() -> None:
        await asyncio.get_running_loop().create_server(Agent, "127.0.0.1", listen_port)
        await asyncio.Event().wait()

    uvloop.run(serve())


async def measure(args: argparse.Namespace, ports: dict[str, int], on_start: Any) -> dict[str, list[float]]:
    """Every target's latencies (ms) after a second of warm-up; on_start() runs as measuring begins."""
    import benchlib as bl

    latency: dict[str, list[float]] = {t: [] for t in TARGETS}
    clients = {t: bl.LeanClient(ports[t]) for t in TARGETS}
    try:

        async def one(target: str, keep: bool) -> None:
            t0 = time.perf_counter()
            status = await clients[target].get()
            if status != 200:
                raise RuntimeError(f"{target} answered {status}")
            if keep:
                latency[target].append((time.perf_counter() - t0) * 1000)

        loop = asyncio.get_running_loop()
        rate = args.rate * len(TARGETS)
        for keep, seconds in ((False, 1.0), (True, args.duration)):
            if keep:
                on_start()
            with bl.client_collector_paused() if keep else contextlib.nullcontext():
                t0, tasks = loop.time(), []
                for i in range(round(rate * seconds)):
                    delay = t0 + i / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    n = len(TARGETS)  # each round of n starts one target further on
                    tasks.append(asyncio.create_task(one(TARGETS[(i % n + i // n) % n], keep)))
                await asyncio.gather(*tasks)
    finally:
        for c in clients.values():
            c.close()
    return latency


def main() -> int:
    import benchlib as bl

    p = bl.arg_parser(__doc__)
    p.add_argument("--rate", type=float, default=100.0, help="requests/s per target (default 100)")
    p.add_argument("--duration", type=float, default=25.0, help="seconds measured (default 25)")
    bl.add_output_args(p)
    args = p.parse_args()
    with bl.BenchRun("agentcard-bench-floor-", args.keep) as run:
        ports = bl.free_ports("direct", "nginx", "broker", "relay")
        run.stop_on_exit(bl.start_nginx(run.tmp, ports["direct"], ports["nginx"]), "nginx")
        cfg, env = bl.prepare_broker(
            run.tmp, ports["broker"], [bl.api_route(f"http://{bl.HOST}:{ports['direct']}")]
        )
        broker = run.stop_on_exit(bl.start_broker(cfg, env, ports["broker"], run.broker_log), "broker")
        cmd = [sys.executable, __file__, "relay", str(ports["relay"]), str(ports["direct"])]
        relay_proc = run.stop_on_exit(subprocess.Popen(cmd, preexec_fn=bl.pdeathsig), "relay")
        bl.wait_port(ports["relay"], relay_proc, "relay")
        pids = {"relay": relay_proc.pid, "broker": broker.pid}
        cpu0: dict[str, float | None] = {}
        machine0: list[list[int] | None] = []

        def on_start() -> None:  # after the warm-up
            cpu0.update({t: bl.cpu_seconds(p) for t, p in pids.items()})
            machine0.append(bl.machine_cpu_ticks())

        latency = asyncio.run(measure(args, ports, on_start))
        cpu1, machine1 = {t: bl.cpu_seconds(p) for t, p in pids.items()}, bl.machine_cpu_ticks()
        steal = bl.steal_fraction(machine0[0], machine1)
        stats = {t: bl.summarize_ms(v) for t, v in latency.items()}
        cpu_us: dict[str, float | None] = {}
        for t in pids:
            c0, c1, n = cpu0[t], cpu1[t], len(latency[t])
            cpu_us[t] = round((c1 - c0) * 1e6 / n, 1) if c0 is not None and c1 is not None and n else None

        print()
        print(
            f"agentcard-broker floor bench: GET {bl.BENCH_PATH}, {args.rate:g} req/s per target for "
            f"{args.duration:g}s, targets taking turns request by request ({os.cpu_count()} CPUs)"
        )
        print()
        d = stats["direct"]
        bl.Table(
            ("target", "<7"),
            ("p50 ms", ">7.3f"),
            ("p99 ms", ">7.3f"),
            ("added p50", ">9.3f"),
            ("added p99", ">9.3f"),
            ("CPU µs/request", ">14"),
            ruled=True,
        ).print_all(
            (
                t,
                s["p50"],
                s["p99"],
                s["p50"] - d["p50"],
                s["p99"] - d["p99"],
                "-" if cpu_us.get(t) is None else f"{cpu_us[t]:.1f}",
            )
            for t, s in stats.items()
        )
        print()
        if steal is not None:
            print(f"steal time while measuring: {steal * 100:.1f}% of the machine's CPU time")
        bl.write_json(
            args.json,
            {
                "config": {"rate": args.rate, "duration_s": args.duration},
                "latency_ms": stats,
                "added_ms": {
                    t: {q: round(stats[t][q] - d[q], 4) for q in ("p50", "p99")} for t in TARGETS[1:]
                },
                "cpu_us_per_request": cpu_us,
                "steal_fraction": steal,
            },
        )
    return run.exit_code


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "relay":
        relay(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
