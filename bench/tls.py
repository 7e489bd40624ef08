"""TLS benchmark: an agent that opens a new connection for every request (curl in a loop), to a TLS upstream.

    python bench/tls.py [--requests 500] [--block 50] [--json out.json]

What it starts, all on 127.0.0.1 and inside one temporary directory removed on exit:

* a self-signed certificate for IP 127.0.0.1 (`openssl req -x509 -newkey rsa:2048 ...`);
* nginx serving HTTPS with it (TLS 1.2/1.3, keep-alive), `return 200 '{"ok":true}'` and
  `/_bench/auth` (200 only when the expected Bearer header arrived); its access log records the
  connection serial number and whether the TLS session was reused, per request;
* the broker with `upstream: https://127.0.0.1:PORT` (allow_insecure_upstream false), trusting the
  certificate through SSL_CERT_FILE, one fake sk_test_ key in a keyring file backend.

Direct: each request is a brand-new TLS connection to nginx (ssl + http.client, a fresh
HTTPSConnection with no session reuse, closed after the answer), i.e. a full handshake each time.
Broker: each request is a brand-new plain-HTTP connection to the broker; the broker keeps its TLS
connections to nginx alive. Sequential requests, in blocks alternating direct and broker.
Reported: requests/s, p50/p99 per request and the ratio broker/direct in requests/s; target >= 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import ssl
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import benchlib as bl  # noqa: E402

RATIO_TARGET = 2.0
TARGETS = ("direct", "broker")

TLS_HTTP = """\
    log_format conns '$connection $ssl_protocol $ssl_session_reused $request_uri';
    access_log {tmp}/nginx-access.log conns;"""

TLS_SERVER = """\
    server {{
        listen {host}:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key_file};
        ssl_protocols TLSv1.2 TLSv1.3;
{locations}
    }}"""


def make_cert(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    done = bl.capture(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ]
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl req failed ({done.returncode}): {done.stderr}")
    return cert, key


def direct_get(port: int, path: str, ctx: ssl.SSLContext) -> tuple[int, bytes]:
    """One request on a brand-new TLS connection (full handshake: no session is offered), then close."""
    return bl.get(port, path, context=ctx)


def access_log(tmp: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for line in (tmp / "nginx-access.log").read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4:
            rows.append((parts[0], parts[1], parts[2], parts[3]))
    return rows


def parse_args() -> argparse.Namespace:
    p = bl.arg_parser(__doc__)
    p.add_argument("--requests", type=int, default=500, help="timed requests per target (default 500)")
    p.add_argument("--block", type=int, default=50, help="requests per alternating block (default 50)")
    p.add_argument("--warmup", type=int, default=20, help="unrecorded requests per target (default 20)")
    bl.add_output_args(p, "logs, certs")
    a = p.parse_args()
    if a.requests < 2 or a.block < 1 or a.warmup < 0:
        p.error("--requests must be at least 2, --block at least 1, --warmup not negative")
    return a


def main() -> int:
    args = parse_args()
    with bl.BenchRun("agentcard-bench-tls-", args.keep, errors=(RuntimeError, OSError)) as run:
        tmp, broker_log = run.tmp, run.broker_log
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl is not installed")
        ports = bl.free_ports("direct", "broker")
        cert, key_file = make_cert(tmp)
        server = TLS_SERVER.format(
            host=bl.HOST, port=ports["direct"], cert=cert, key_file=key_file, locations=bl.UPSTREAM_LOCATIONS
        )
        conf = bl.nginx_conf(tmp, TLS_HTTP.format(tmp=tmp), server)
        run.stop_on_exit(bl.launch_nginx(tmp, conf, (ports["direct"],)), "nginx")

        ctx = ssl.create_default_context(cafile=str(cert))
        upstream_route = bl.api_route(f"https://{bl.HOST}:{ports['direct']}")
        cfg, env = bl.prepare_broker(tmp, ports["broker"], [upstream_route], insecure=False)
        env["SSL_CERT_FILE"] = str(cert)
        env.pop("SSL_CERT_DIR", None)  # trust exactly this certificate
        broker = run.stop_on_exit(bl.start_broker(cfg, env, ports["broker"], broker_log), "broker")

        # sanity: TLS verification works both ways and the broker injects the key
        status, body = direct_get(ports["direct"], bl.BENCH_PATH, ctx)
        if status != 200:
            raise RuntimeError(f"sanity: direct GET {bl.BENCH_PATH} answered {status}: {body[:200]!r}")
        if direct_get(ports["direct"], "/_bench/auth", ctx)[0] != 401:
            raise RuntimeError("sanity: the upstream's auth check is broken (direct was not refused)")
        status, body = bl.get(ports["broker"], "/_bench/auth")
        if status != 200:
            raise RuntimeError(
                f"sanity: broker /_bench/auth answered {status} (TLS trust or key?): {body[:300]!r}"
            )

        def one(target: str, tag: str) -> float:
            path = f"{bl.BENCH_PATH}?via={target}&{tag}"
            started = time.perf_counter()
            if target == "direct":
                status, _ = direct_get(ports["direct"], path, ctx)
            else:
                status, _ = bl.get(ports["broker"], path)
            elapsed = time.perf_counter() - started
            if status != 200:
                raise RuntimeError(f"{target} GET {path} answered {status}")
            return elapsed

        for target in TARGETS:
            for _ in range(args.warmup):
                one(target, "warmup")

        samples: dict[str, list[float]] = {t: [] for t in TARGETS}
        busy: dict[str, float] = dict.fromkeys(TARGETS, 0.0)
        block_rps: dict[str, list[float]] = {t: [] for t in TARGETS}
        done = 0
        rnd = 0
        while done < args.requests:
            n = min(args.block, args.requests - done)
            order = TARGETS if rnd % 2 == 0 else TARGETS[::-1]
            for target in order:
                t0 = time.perf_counter()
                for _ in range(n):
                    samples[target].append(one(target, "timed"))
                spent = time.perf_counter() - t0
                busy[target] += spent
                block_rps[target].append(n / spent)
            done += n
            rnd += 1
        if broker.poll() is not None:
            raise RuntimeError(
                f"broker died during the run (code {broker.returncode}):\n{bl.tail(broker_log)}"
            )

        rows = access_log(tmp)
        upstream: dict[str, Any] = {}
        for target in TARGETS:
            mine = [r for r in rows if f"via={target}&timed" in r[3]]
            upstream[target] = {
                "requests": len(mine),
                "connections": len({r[0] for r in mine}),
                "protocols": sorted({r[1] for r in mine}),
                "session_reused": sum(1 for r in mine if r[2] == "r"),
            }
        problems = bl.broker_log_problems(broker_log)

        res: dict[str, Any] = {}
        for target in TARGETS:
            s = bl.summarize_ms([v * 1000 for v in samples[target]])
            s["rps"] = round(len(samples[target]) / busy[target], 1)
            res[target] = s
        ratio = round(res["broker"]["rps"] / res["direct"]["rps"], 3)

        print()
        print(
            f"agentcard-broker TLS bench: {args.requests} sequential GET {bl.BENCH_PATH} per target, a new "
            f"connection each, blocks of {args.block} alternating ({os.cpu_count()} CPUs, python "
            f"{platform.python_version()}, {ssl.OPENSSL_VERSION})"
        )
        print()
        ms = ">7.3f"
        tab = bl.Table(
            ("target", "<7"),
            ("req/s", ">8.1f"),
            ("p50 ms", ms),
            ("p99 ms", ms),
            ("mean ms", ms),
            ("max ms", ms),
            ("upstream: requests / TLS connections / protocols", ""),
        )
        tab.print_head()
        for t in TARGETS:
            s, u = res[t], upstream[t]
            seen = f"{u['requests']} / {u['connections']} / {','.join(u['protocols'])}"
            tab.print_row(t, s["rps"], s["p50"], s["p99"], s["mean"], s["max"], seen)
        print()
        print("direct = a new TLS connection to nginx per request (full handshake)")
        print("broker = a new plain-HTTP connection to the broker per request; its TLS to nginx is pooled")
        print(f"req/s broker/direct {ratio:.3f}")
        table = bl.tcp_table()
        print(
            f"TCP sockets on this machine after the run: {table['entries']} (/proc/net/tcp + tcp6 entries, "
            f"TIME_WAIT included); reading /proc/net/tcp once takes {table['read_ms']} ms here"
        )
        bl.print_log_problems(problems)

        checks = [bl.check("tls: req/s broker/direct", ratio, "x", ">=", RATIO_TARGET)]
        bl.report_checks(
            checks,
            args.json,
            {
                "config": {
                    "requests": args.requests,
                    "block": args.block,
                    "warmup": args.warmup,
                    "path": bl.BENCH_PATH,
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "openssl": ssl.OPENSSL_VERSION,
                },
                "results": res,
                "block_rps": {t: [round(v, 1) for v in block_rps[t]] for t in TARGETS},
                "upstream": upstream,
                "ratio_rps_broker_direct": ratio,
                "tcp_table_after": table,
                "broker_log_problems": problems,
            },
        )
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
