"""The broker's own endpoints under /_broker/: health, status, metrics, reload.

Owns: what these endpoints answer. Must never: include a secret value (status shows where a
credential lives and its state, never the value), or forward anything upstream.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from broker import __version__
from broker.auth.base import AuthState
from broker.errors import BrokerError
from broker.http.server import Request, Response, StreamResponse
from broker.store import StoreError

if TYPE_CHECKING:
    from broker.runtime import Runtime


async def status_document(rt: Runtime) -> dict[str, Any]:
    cfg, policies = rt.snapshot.config, rt.snapshot.policies
    routes = []
    for r in cfg.routes:
        cred = rt.credentials.get(r.name)
        routes.append(
            {
                "name": r.name,
                "prefix": r.prefix,
                "upstream": r.upstream,
                "auth": r.auth.type,
                "state": str(cred.state) if cred else None,
                "reason": cred.reason if cred else None,
                "mode": cred.mode if cred else None,
                "expires_at": cred.expires_at.isoformat() if cred and cred.expires_at else None,
                "requests": rt.metrics.by_route.get(r.name, 0),
                **(cred.details() if cred else {}),
                **(await policies[r.name].status() if r.name in policies else {}),
            }
        )
    return {
        "version": __version__,
        "pid": os.getpid(),
        "listen": rt.listen_addresses,
        "config": {"path": rt.config_path, "error": rt.config_error},
        "secret_store": rt.store.description,
        # the state store (per-user grants; with Redis also budgets and rates): where, and its
        # health as the last check (once a second) found it
        "store": rt.store_health.document() if rt.store_health is not None else None,
        "uptime_s": round(rt.uptime(), 1),
        "in_flight": rt.in_flight,
        "process": _process_counts(),
        "routes": routes,
    }


async def _count_users(rt: Runtime, doc: dict[str, Any]) -> None:
    """Per-user routes: how many end users are in each state (never who they are)."""
    snap = rt.snapshot
    for r in doc["routes"]:
        if r["name"] not in snap.per_user:
            continue
        # the route-level credential of a per-user route is never used: its state would mislead
        r.update(state="per_user", reason=None, mode=None, expires_at=None, scopes=None, subject=None)
        if isinstance(r.get("budget"), dict):  # each end user has the budget to themselves
            r["budget"] = {k: r["budget"][k] for k in ("amount_cents", "per")} | {"each_user": True}
        if rt.state_store is None:
            r.update(state="store_unavailable", users=None)
            continue
        try:
            r["users"] = await rt.state_store.count_grants(r["name"])
        except StoreError:
            r.update(state="store_unavailable", users=None)  # the store's own entry says why


def _process_counts() -> dict[str, int | None]:
    """Tasks and open file descriptors: what a leak would grow (benchmarks watch these)."""
    import asyncio

    try:
        fds: int | None = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    return {"tasks": len(asyncio.all_tasks()), "open_fds": fds}


def _json(doc: Any) -> Response:
    return Response(
        body=json.dumps(doc, indent=2).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


async def handle(request: Request, rt: Runtime) -> StreamResponse:
    from broker.routing import normalize_path

    path = normalize_path(request.raw_path.partition("?")[0]).rstrip("/")
    if path == "/_broker/health":
        _only(request, "GET", "HEAD")
        return _json({"status": "ok"})
    if path == "/_broker/status":
        _only(request, "GET", "HEAD")
        await rt.credentials_read()
        doc = await status_document(rt)
        await _count_users(rt, doc)
        # reasons can quote an upstream (a token endpoint's error): nothing held goes out
        return _json(json.loads(rt.secrets.redact(json.dumps(doc))))
    if path == "/_broker/metrics":
        _only(request, "GET", "HEAD")
        await rt.credentials_read()
        routes = rt.snapshot.config.routes
        states = [(r.name, str(rt.credentials[r.name].state)) for r in routes]
        for r in routes:
            rt.metrics.refreshes[r.name] = int(rt.credentials[r.name].details().get("refreshes", 0))
        text = rt.metrics.render(states, [str(s) for s in AuthState])
        if rt.gc_meter is not None:
            text += "\n".join(rt.gc_meter.render()) + "\n"
        if rt.store_health is not None:
            up = 1 if rt.store_health.document()["ok"] else 0
            text += (
                "# HELP agentcard_broker_store_up 1 when the state store answered its last health check\n"
                f"# TYPE agentcard_broker_store_up gauge\nagentcard_broker_store_up {up}\n"
            )
        return Response(
            text=text, content_type="text/plain", charset="utf-8", headers={"Cache-Control": "no-store"}
        )
    if path == "/_broker/reload":
        # re-read config.yaml and the secret store (what `set-key`, `login` and `logout` call
        # after changing the store); the store is read before the answer, so a `status` asked
        # next shows the new credential (also when the config file has an error)
        _only(request, "POST")
        await rt.reload(reason="api")
        await rt.reread_credentials()
        return _json({"reloaded": rt.config_error is None, "config": {"error": rt.config_error}})
    if path == "/_broker/approvals" or path.startswith(("/_broker/approvals/", "/_broker/approve/")):
        from broker.admin import approvals  # the owner's decisions (admin key) and end users' page

        return await approvals.handle(request, rt, path)
    if path == "/_broker/ui" or path.startswith("/_broker/ui/"):
        from broker.admin import dashboard  # the owner's page, only once a browser (or the CLI) asks

        return await dashboard.handle(request, rt, path)
    if path == "/_broker/oauth/client.json":
        from broker.admin import oauth_client  # the Client ID Metadata Document (per-user routes)

        return oauth_client.handle(request, rt)
    if path.startswith("/_broker/connect/") or path == "/_broker/callback":
        from broker.admin import connect  # the OAuth client modules, only once a browser comes

        if path == "/_broker/callback":
            return await connect.callback(request, rt)
        return await connect.connect_page(request, rt, path.removeprefix("/_broker/connect/"))
    raise BrokerError("not_found", "unknown /_broker/ endpoint (health, status, metrics, reload)")


def _only(request: Request, *methods: str) -> None:
    if request.method not in methods:
        raise BrokerError("method_not_allowed", f"use {' or '.join(methods)} here")
