"""The `agentcard-broker` command line: parse, call one function, print, exit code.

Owns: argument parsing and what each command prints. Imports what a command needs only when
that command runs, so `--help` stays fast. Must never: print or log a secret value (set-key
reads it hidden and prints only its mode).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from broker import __version__
from broker.admin import report

if TYPE_CHECKING:
    from broker.auth.route_secret import OutputLine
    from broker.config import Config

EXIT_CONFIG = 78  # EX_CONFIG: systemd's RestartPreventExitStatus uses it to stop a restart loop


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentcard-broker",
        description="Hold AgentCard credentials for local agents and forward their requests.",
    )
    p.add_argument("--version", action="version", version=f"agentcard-broker {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $AGENTCARD_BROKER_CONFIG, then the user config dir, then ./config.yaml)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")
    ck = sub.add_parser("check", parents=[common], help="validate the config and the credentials it names")
    ck.add_argument("--json", action="store_true", help="machine-readable output")
    sk = sub.add_parser(
        "set-key",
        parents=[common],
        help="store a route's API key or client secret (or `store`: the Redis password)",
    )
    sk.add_argument("route")
    sk.add_argument("--stdin", action="store_true", help="read the secret from standard input")
    st = sub.add_parser("status", parents=[common], help="ask the running daemon for its state")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    lg = sub.add_parser("login", parents=[common], help="log an oauth route in, in your browser")
    lg.add_argument("route")
    lg.add_argument("--no-browser", action="store_true", help="print the URL; paste the redirect back")
    lg.add_argument("--device", action="store_true", help="device grant (RFC 8628): enter a code")
    lg.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the browser (300)")
    lo = sub.add_parser("logout", parents=[common], help="revoke and forget an oauth route's tokens")
    lo.add_argument("route")
    sd = sub.add_parser("stdio", parents=[common], help="an MCP stdio server relaying to the daemon's route")
    sd.add_argument("route", nargs="?", default="mcp")
    cn = sub.add_parser("connect", parents=[common], help="point an agent host at the broker")
    cn.add_argument("host", help="claude-desktop, claude-code, cursor, vscode, open-webui, librechat, env")
    cn.add_argument(
        "--write", action="store_true", help="merge it into the host's config file (with a backup)"
    )
    cn.add_argument(
        "--file", metavar="PATH", help="the host config file to merge into (default: the host's own)"
    )
    cn.add_argument("--route", default="mcp", help="the MCP route (default: mcp)")
    cn.add_argument("--per-user", action="store_true", help="a chat platform on a per-user route")
    cl = sub.add_parser("clients", parents=[common], help="platform clients of per-user routes: their tokens")
    cl.add_argument("action", choices=["add", "list", "remove"])
    cl.add_argument("name", nargs="?", help="a name under `clients:` in the config (add, remove)")
    cl.add_argument("--json", action="store_true", help="machine-readable output (list)")
    us = sub.add_parser("users", parents=[common], help="end users of per-user routes; `users revoke ...`")
    us.add_argument("words", nargs="*", metavar="ROUTE | revoke ROUTE CLIENT USER")
    us.add_argument("--json", action="store_true", help="machine-readable output")
    sb = sub.add_parser("sandbox", help="run a local stand-in for AgentCard (test data only) on 127.0.0.1")
    sb.add_argument("--port", type=int, default=8780, help="port on 127.0.0.1 (default 8780)")
    dm = sub.add_parser("demo", help="see the broker work end to end against the sandbox, offline")
    dm.add_argument("--per-user", action="store_true", help="a chat platform's per-user route, two end users")
    ins = sub.add_parser(
        "install-service", parents=[common], help="write the systemd user unit / launchd agent for this user"
    )
    ins.add_argument("--print", action="store_true", help="only print the file, write nothing")
    ins.add_argument(
        "--system", action="store_true", help="Linux: the unit for a separate system user (root)"
    )
    ap = sub.add_parser("approvals", parents=[common], help="requests held for your approval (a table)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--watch", action="store_true", help="refresh every second until Ctrl-C")
    for verb, what in (("approve", "let a held request go on"), ("deny", "refuse a held request")):
        sub.add_parser(verb, parents=[common], help=what).add_argument("id", metavar="ID")
    db = sub.add_parser(
        "dashboard", parents=[common], help="open the dashboard in your browser (a one-time link)"
    )
    db.add_argument(
        "--print-url", action="store_true", help="only print the link (it works once, for a minute)"
    )
    uns = sub.add_parser(
        "uninstall-service", parents=[common], help="stop, disable and remove the service file"
    )
    uns.add_argument("--system", action="store_true", help="the system-user unit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "check": cmd_check,
        "set-key": cmd_set_key,
        "status": cmd_status,
        "stdio": cmd_stdio,
        "sandbox": cmd_sandbox,
        "demo": cmd_demo,
        "connect": cmd_connect,
        "clients": cmd_clients,
        "users": cmd_users,
        "approvals": cmd_approvals,
        "approve": cmd_approvals,
        "deny": cmd_approvals,
        "dashboard": cmd_dashboard,
        "login": cmd_login,
        "logout": cmd_logout,
        "install-service": cmd_install_service,
        "uninstall-service": cmd_uninstall_service,
    }
    try:
        return handler[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _load(args: argparse.Namespace) -> Config | None:
    from broker.config import ConfigError, find_config, load

    try:
        return load(find_config(args.config))
    except ConfigError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return None


def _say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------- run


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from broker import logs
    from broker.scrub import SecretSet
    from broker.service import harden

    hardening = harden.apply()  # before anything is read or created
    cfg = _load(args)
    if cfg is None:
        return EXIT_CONFIG
    from broker import daemon

    secrets = SecretSet()
    log_setup = logs.configure(cfg.log.level, cfg.log.format, secrets)
    try:  # optional extra `fast`: a faster event loop for the hot path, same behaviour
        import uvloop
    except ImportError:
        # only the missing extra falls back: an ImportError raised while the daemon runs is a
        # fault to report, never a reason to start it a second time
        return asyncio.run(daemon.serve(cfg, secrets, hardening, log_setup))
    return int(uvloop.run(daemon.serve(cfg, secrets, hardening, log_setup)))


# ---------------------------------------------------------------- check


def cmd_check(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from broker.auth import check_credentials
    from broker.config import ConfigError, find_config, load
    from broker.store.opening import check_store

    try:
        cfg = load(find_config(args.config))
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"config": {"path": exc.path, "errors": exc.lines()}, "ok": False}, indent=2))
        else:
            for line in exc.lines():
                print(line, file=sys.stderr)
        return 1
    found = check_credentials(cfg)
    store_place, store_problem = check_store(cfg)
    problems = [*found.problems, *([f"{cfg.path}: store: {store_problem}"] if store_problem else [])]
    if args.json:
        doc = {
            "config": {"path": cfg.path, "errors": []},
            "secret_store": found.secret_store,
            "store": {"place": store_place, "problem": store_problem},
            "routes": [asdict(r) for r in found.routes],
            "problems": problems,
            "ok": not problems,
        }
        print(json.dumps(doc, indent=2))
        return 1 if problems else 0
    print(f"config: {cfg.path}: ok ({len(cfg.routes)} routes, listen {', '.join(map(str, cfg.listen))})")
    print(f"secret store: {found.secret_store}")
    if store_place is not None:
        print(f"state store: {store_place}: {'a problem' if store_problem else 'ok'}")
    rows = [["ROUTE", "PREFIX", "AUTH", "CREDENTIAL", "OK"]]
    rows += [[r.name, r.prefix, r.auth, r.credential, "no" if r.problem else "yes"] for r in found.routes]
    print(*report.table(rows), sep="\n")
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{len(problems)} problem(s)" if problems else "no problems")
    return 1 if problems else 0


# ---------------------------------------------------------------- set-key


def cmd_set_key(args: argparse.Namespace) -> int:
    cfg = _load(args)
    if cfg is None:
        return 1
    from broker.auth.route_secret import RouteSecretError, set_route_secret

    try:
        said = set_route_secret(cfg, args.route, lambda prompt: _read_secret(args.stdin, prompt))
    except RouteSecretError as exc:
        _print_lines(exc.printed_before)
        print(exc, file=sys.stderr)
        return 1
    _print_lines(said)
    _tell_daemon(cfg)
    return 0


def _read_secret(from_stdin: bool, prompt: str) -> str:
    if from_stdin:
        return sys.stdin.read()
    import getpass

    return getpass.getpass(prompt)


def _print_lines(lines: Iterable[OutputLine]) -> None:
    for line in lines:
        print(line.text, file=sys.stderr if line.to_stderr else sys.stdout)


# ---------------------------------------------------------------- status


def _tell_daemon(cfg: Config) -> None:
    """After the secret store changed: a running daemon re-reads it now (it would within seconds)."""
    from broker.admin.client import DaemonClient

    if DaemonClient(cfg).reload() is not None:
        print("the running daemon picked it up")


def _config_for_status(args: argparse.Namespace) -> Config | None:
    """The config to find the daemon with: a broken file still says where the daemon listens."""
    from broker.config import ConfigError, find_config, load, load_listen_only

    try:
        return load(find_config(args.config))
    except ConfigError as exc:
        print("note: the config file has problems (the daemon keeps its previous config):", file=sys.stderr)
        for line in exc.lines():
            print(f"  {line}", file=sys.stderr)
        return load_listen_only(exc.path)


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config_for_status(args)
    if cfg is None:
        return 1
    from broker.admin.client import DaemonClient

    client = DaemonClient(cfg)
    doc = client.status()
    if doc is None:
        print(
            f"agentcard-broker is not running (nothing answers on {client.address}); "
            "start it: agentcard-broker run",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(*report.status_lines(doc), sep="\n")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from broker.admin import dashboard_cli  # a one-time link from the running daemon

    return dashboard_cli.main(args, _config_for_status(args))


# ---------------------------------------------------------------- service files


def cmd_install_service(args: argparse.Namespace) -> int:
    from pathlib import Path

    from broker.service import units

    config_path, drain = Path(units.SYSTEM_CONFIG), 30.0
    if not args.system:
        cfg = _load(args)
        if cfg is None:
            print("fix the config first: the service would refuse to start with it", file=sys.stderr)
            return 1
        config_path, drain = Path(cfg.path).resolve(), cfg.timeouts.drain
    try:
        if args.print:
            sys.stdout.write(units.preview(config_path, system=args.system, drain=drain))
        else:
            print(*units.install_service(config_path, system=args.system, drain=drain), sep="\n")
    except units.ServiceError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def cmd_uninstall_service(args: argparse.Namespace) -> int:
    from broker.service import units

    try:
        print(*units.uninstall_service(system=args.system), sep="\n")
    except units.ServiceError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- login / logout


def cmd_login(args: argparse.Namespace) -> int:
    from broker.auth.oauth import LoginError, run_login

    cfg = _load(args)
    if cfg is None:
        return 1
    try:
        browser, device = not args.no_browser, args.device
        said = run_login(cfg, args.route, open_browser=browser, wait_s=args.timeout, say=_say, device=device)
    except LoginError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(*said, sep="\n")
    _tell_daemon(cfg)
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from broker.auth.oauth import LoginError, run_logout

    cfg = _load(args)
    if cfg is None:
        return 1
    try:
        print(run_logout(cfg, args.route, _say))
    except LoginError as exc:
        print(exc, file=sys.stderr)
        return 1
    _tell_daemon(cfg)
    return 0


# ---------------------------------------------------------------- stdio


def cmd_stdio(args: argparse.Namespace) -> int:
    from broker.tools import ToolError, stdio

    cfg = _load(args)
    if cfg is None:
        return 1
    try:
        return stdio.serve(cfg, args.route)
    except ToolError as exc:
        print(exc, file=sys.stderr)
        return 1


# ---------------------------------------------------------------- connect


def cmd_connect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from broker.tools import ToolError, connect

    cfg = _load(args)
    if cfg is None:
        return 1
    try:
        plan = connect.plan_for(cfg, args.host, args.route, per_user=args.per_user)
        if args.write:
            print(*connect.write(plan, Path(args.file) if args.file else None), sep="\n")
        else:
            sys.stdout.write(connect.preview(plan))
    except ToolError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------- clients / users (per-user routes)


def cmd_clients(args: argparse.Namespace) -> int:
    from broker.auth import platform_clients as pc

    if (args.name is None) != (args.action == "list"):
        name = "" if args.action == "list" else " NAME"
        print(f"usage: agentcard-broker clients {args.action}{name}", file=sys.stderr)
        return 2
    cfg = _load(args)
    if cfg is None:
        return 1
    try:
        if args.action == "add":
            _print_lines(pc.add_client(cfg, args.name))  # the token alone on stdout, the rest on stderr
        elif args.action == "remove":
            print(pc.remove_client(cfg, args.name))
            _tell_daemon(cfg)  # it may hold the token's lookup
        else:
            rows = pc.list_clients(cfg)
            _print_listing(pc.clients_doc(rows), pc.clients_table(rows), args.json)
    except pc.PlatformClientError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def cmd_users(args: argparse.Namespace) -> int:
    from broker.auth import platform_clients as pc

    words = args.words
    revoking = words[:1] == ["revoke"] and len(words) > 1
    if len(words) > 1 and not (revoking and len(words) == 4):
        print("usage: agentcard-broker users [ROUTE] | users revoke ROUTE CLIENT USER", file=sys.stderr)
        return 2
    cfg = _load(args)
    if cfg is None:
        return 1
    try:
        if revoking:
            _print_lines(pc.revoke_user(cfg, *words[1:]))
            _tell_daemon(cfg)  # it drops its cached copy of the grant
        else:
            grants = pc.list_users(cfg, words[0] if words else None)
            _print_listing(pc.users_doc(grants), pc.users_table(grants), args.json)
    except pc.PlatformClientError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _print_listing(doc: list[dict[str, Any]], table: list[list[str]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2))
    elif len(table) > 1:
        print(*report.table(table), sep="\n")
    else:
        print("none yet")


def cmd_approvals(args: argparse.Namespace) -> int:
    from broker.admin import approvals_cli  # approvals, approve ID, deny ID

    return approvals_cli.main(args, _config_for_status(args))


# ---------------------------------------------------------------- sandbox / demo


def cmd_sandbox(args: argparse.Namespace) -> int:
    from broker.tools import ToolError, run_sandbox

    try:
        return run_sandbox(args.port, _say)
    except ToolError as exc:
        print(exc, file=sys.stderr)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from broker.tools import ToolError, run_demo

    try:
        return run_demo(_say, per_user=getattr(args, "per_user", False))
    except ToolError as exc:
        print(exc, file=sys.stderr)
        return 1
