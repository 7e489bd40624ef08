"""broker/admin/dashboard.py over HTTP, against a real daemon, a recording upstream and real
held requests: the one-time link, the session cookie, CSRF, the state, the event stream,
approving and denying, and everything an agent (or another page) tries instead."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from broker import cli
from broker.admin import dashboard_auth
from tests.admin.dashboard_client import Owner, link, open_link, owner
from tests.conftest import TEST_KEY, Broker, BrokerFactory, Upstream, api_config, assert_no_secret, store_key

HELD = {"amount_cents": 2500, "note": "the held one"}


def approve_config(upstream: Upstream, **approve: Any) -> dict[str, Any]:
    route = {
        "name": "api",
        "prefix": "/",
        "upstream": upstream.url,
        "auth": {"type": "api_key", "key": "keyring"},
        "policy": {
            "budget": {"amount_cents": 10000, "per": "24h"},
            "approve": {"above_cents": 1000, "wait": "20s", **approve},
        },
    }
    return api_config(upstream.url, routes=[route])


@pytest.fixture
async def held_broker(make_broker: BrokerFactory, upstream: Upstream) -> Broker:
    store_key(TEST_KEY)
    return await make_broker(approve_config(upstream))


async def hold(
    b: Broker, body: dict[str, Any] = HELD
) -> tuple[asyncio.Task[tuple[int, str]], dict[str, Any]]:
    """An agent's request, held: the task answers when it is decided; and its approval."""

    async def agent() -> tuple[int, str]:
        async with b.request("POST", "/v1/cards", json=body) as r:
            return r.status, await r.text()

    task = asyncio.create_task(agent())
    for _ in range(200):
        pending = b.daemon.rt.approvals.pending()
        if pending:
            return task, pending[0].document()
        await asyncio.sleep(0.02)
    raise AssertionError("the request was not held")


# ---------------------------------------------------------------- the link and the session


async def test_a_link_needs_the_admin_key_and_works_once(broker: Broker) -> None:
    for key in ("", "not-the-key"):
        status, doc = await link(broker, key)
        assert status == 403 and doc["error"]["code"] == "admin_required"
    status, doc = await link(broker)
    assert status == 200 and doc["url"].startswith(f"http://localhost:{broker.port}/_broker/ui/login?t=")
    first, cookie = await open_link(broker, doc["url"])
    assert first == 303 and cookie
    again, none = await open_link(broker, doc["url"])
    assert again == 403 and none is None  # single use
    forged, _ = await open_link(broker, doc["url"][:-4] + "AAAA")
    assert forged == 403


async def test_a_head_request_does_not_spend_the_link(broker: Broker) -> None:
    _, doc = await link(broker)
    path = "/_broker/ui/login?" + doc["url"].split("?")[1]
    async with broker.request("HEAD", path, headers={"Host": f"localhost:{broker.port}"}) as r:
        assert r.status == 405 and "Set-Cookie" not in r.headers  # a link previewer, say
    assert (await open_link(broker, doc["url"]))[0] == 303


async def test_no_link_when_localhost_is_not_an_allowed_host(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(api_config(upstream.url, allowed_hosts=["127.0.0.1"]))
    status, doc = await link(b)
    assert status == 404 and "add localhost to allowed_hosts" in doc["error"]["message"]


async def test_the_cookie_is_httponly_strict_and_scoped(broker: Broker) -> None:
    _, doc = await link(broker)
    async with broker.request(
        "GET", "/_broker/ui/login?" + doc["url"].split("?")[1], headers={"Host": f"localhost:{broker.port}"},
        allow_redirects=False,
    ) as r:  # fmt: skip
        assert r.status == 303 and r.headers["Location"] == "/_broker/ui/"
        cookie = r.headers["Set-Cookie"]
    parts = [p.strip() for p in cookie.split(";")]
    assert parts[0].startswith("acb_session=") and len(parts[0]) > 40
    assert set(parts[1:]) == {"HttpOnly", "SameSite=Strict", "Path=/_broker/ui"}  # no Max-Age, no Domain


async def test_a_late_link_is_refused(broker: Broker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard_auth, "LINK_TTL_S", 0.05)
    _, doc = await link(broker)
    await asyncio.sleep(0.1)
    status, cookie = await open_link(broker, doc["url"])
    assert status == 403 and cookie is None


async def test_the_page_needs_a_session_and_carries_its_csrf_token(broker: Broker) -> None:
    host = {"Host": f"localhost:{broker.port}"}
    async with broker.request("GET", "/_broker/ui/", headers=host) as r:
        assert r.status == 401 and "agentcard-broker dashboard" in await r.text()
    async with broker.request("GET", "/_broker/ui/", headers=host | {"Cookie": "acb_session=forged"}) as r:
        assert r.status == 401
    me = await owner(broker)
    async with broker.request("GET", "/_broker/ui/", headers=me.headers(csrf=False)) as r:
        page = await r.text()
        assert r.status == 200 and me.csrf in page
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["X-Frame-Options"] == "DENY" and r.headers["Referrer-Policy"] == "no-referrer"
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert "Access-Control-Allow-Origin" not in r.headers
    assert (
        "<script>" not in page and "http://" not in page and "https://" not in page
    )  # nothing inline or remote
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        async with broker.request("GET", f"/_broker/ui/static/{name}", headers=host) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith(kind)
            assert "https://" not in await r.text()
    async with broker.request("GET", "/_broker/ui/static/..%2fdashboard.py", headers=host) as r:
        assert r.status in (400, 404)


async def test_logout_ends_the_session(broker: Broker) -> None:
    me = await owner(broker)
    assert (await me.post("/api/logout"))[0] == 200
    async with broker.request("GET", "/_broker/ui/api/state", headers=me.headers()) as r:
        assert r.status == 403 and r.headers["X-Broker-Error"] == "admin_required"


# ---------------------------------------------------------------- state and events


async def test_state_shows_routes_budgets_approvals_and_requests(
    held_broker: Broker, upstream: Upstream
) -> None:
    b = held_broker
    me = await owner(b)
    async with b.request("POST", "/v1/cards?token=hunter2", json={"amount_cents": 300}) as r:
        assert r.status == 200
    task, approval = await hold(b)
    doc = await me.state()
    route = doc["routes"][0]
    assert route["name"] == "api" and route["state"] == "ready"
    # the held call's amount is reserved while it waits
    assert route["budget"]["used"] == 2800 and route["budget"]["left"] == 7200
    [pending] = doc["approvals"]["pending"]
    assert pending["id"] == approval["id"] and pending["amount_cents"] == 2500
    assert "the held one" in pending["arguments"]
    assert doc["requests"][0]["path"] == "/v1/cards?token=[REDACTED]" and doc["requests"][0]["status"] == 200
    assert doc["passkeys"] == 0
    assert_no_secret(json.dumps(doc))
    assert (await me.post(f"/api/approvals/{approval['id']}/deny"))[0] == 200
    assert (await task)[0] == 403
    after = await me.state()
    assert after["routes"][0]["budget"]["used"] == 300  # refunded: it never went upstream
    assert after["approvals"]["pending"] == [] and after["approvals"]["recent"][0]["state"] == "denied"


async def test_the_event_stream_sends_requests_and_approvals_live(held_broker: Broker) -> None:
    b = held_broker
    me = await owner(b)
    async with b.request("GET", "/_broker/ui/api/events", headers=me.headers(csrf=False)) as events:
        assert events.status == 200 and events.headers["Content-Type"] == "text/event-stream"
        async with b.request("GET", "/cards") as r:
            assert r.status == 200
        task, approval = await hold(b)
        seen: list[tuple[str, dict[str, Any]]] = []
        kind = ""
        while len(seen) < 2:
            line = (await asyncio.wait_for(events.content.readline(), 5)).decode().strip()
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                seen.append((kind, json.loads(line[6:])))
        assert seen[0][0] == "request" and seen[0][1]["request"]["path"] == "/cards"
        assert seen[1][0] == "approval" and seen[1][1]["approval"]["id"] == approval["id"]
        assert (await me.post(f"/api/approvals/{approval['id']}/approve"))[0] == 200
        assert (await task)[0] == 200


async def test_shutdown_ends_an_open_event_stream(held_broker: Broker) -> None:
    b = held_broker
    me = await owner(b)
    async with b.request("GET", "/_broker/ui/api/events", headers=me.headers(csrf=False)) as events:
        assert events.status == 200
        await events.content.readline()
        loop = asyncio.get_running_loop()
        started = loop.time()
        await b.daemon.stop()
        assert loop.time() - started < 3  # the drain did not wait for the stream
        rest = await asyncio.wait_for(events.content.read(), 5)  # ended, not hanging
        assert b"event:" not in rest


# ---------------------------------------------------------------- deciding


async def test_the_owner_approves_and_the_held_request_goes_on(
    held_broker: Broker, upstream: Upstream
) -> None:
    b = held_broker
    me = await owner(b)
    task, approval = await hold(b)
    assert not [s for s in upstream.seen if s.raw_path == "/v1/cards"]  # held: not forwarded
    status, doc = await me.post(f"/api/approvals/{approval['id']}/approve")
    assert status == 200 and doc["approval"]["state"] == "approved"
    assert doc["approval"]["decided_by"] == "dashboard"
    code, text = await task
    assert code == 200 and json.loads(text)["path"] == "/v1/cards"
    assert json.loads(upstream.seen[-1].body) == HELD
    again, doc = await me.post(f"/api/approvals/{approval['id']}/approve")
    assert again == 409 and "already approved" in doc["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},  # an agent: no cookie, no token
        {"Cookie": "acb_session=guessed"},
        {"X-CSRF-Token": "guessed"},
    ],
)
async def test_an_agent_cannot_decide(
    held_broker: Broker, upstream: Upstream, headers: dict[str, str]
) -> None:
    b = held_broker
    task, approval = await hold(b)
    for verb in ("approve", "deny"):
        async with b.request(
            "POST", f"/_broker/ui/api/approvals/{approval['id']}/{verb}", headers=headers
        ) as r:
            assert r.status == 403 and r.headers["X-Broker-Error"] == "admin_required"
    assert b.daemon.rt.approvals.get(approval["id"]).state == "pending"  # type: ignore[union-attr]
    task.cancel()


async def test_a_stolen_cookie_without_the_csrf_token_cannot_decide(held_broker: Broker) -> None:
    b = held_broker
    me = await owner(b)
    task, approval = await hold(b)
    path = f"/_broker/ui/api/approvals/{approval['id']}/approve"
    for headers in (me.headers(csrf=False), me.headers(csrf=False, **{"X-CSRF-Token": me.csrf[:-1] + "x"})):
        async with b.request("POST", path, headers=headers) as r:
            assert r.status == 403 and r.headers["X-Broker-Error"] == "admin_required"
    # the right token from another page: its Origin is refused
    other = me.headers(Origin="http://localhost:3000", **{"Sec-Fetch-Site": "same-site"})
    async with b.request("POST", path, headers=other) as r:
        assert r.status == 403 and r.headers["X-Broker-Error"] == "origin_not_allowed"
    # the admin key is for the CLI's link, not a way around the session
    async with b.request("POST", path, headers={"X-Broker-Admin": "x"}) as r:
        assert r.status == 403
    assert b.daemon.rt.approvals.get(approval["id"]).state == "pending"  # type: ignore[union-attr]
    task.cancel()


async def test_with_require_passkey_the_session_alone_cannot_approve(
    make_broker: BrokerFactory, upstream: Upstream
) -> None:
    store_key(TEST_KEY)
    b = await make_broker(approve_config(upstream, require_passkey=True))
    me = await owner(b)
    task, approval = await hold(b)
    assert approval["require_passkey"] is True
    status, doc = await me.post(f"/api/approvals/{approval['id']}/approve")
    assert status == 403 and "passkey" in doc["error"]["message"]
    # no passkey is registered: asking to verify one says so
    status, doc = await me.post("/api/passkey/authenticate/options", {"for": approval["id"]})
    assert status == 400 and "no passkey is registered" in doc["error"]["message"]
    # a forged assertion without a challenge of this session is refused
    status, doc = await me.post("/api/passkey/authenticate/verify", {"credential": {"id": "x"}})
    assert status == 400
    # denying never needs one
    status, doc = await me.post(f"/api/approvals/{approval['id']}/deny")
    assert status == 200 and doc["approval"]["state"] == "denied"
    code, text = await task
    assert code == 403 and json.loads(text)["error"]["code"] == "approval_denied"
    assert not [s for s in upstream.seen if s.raw_path == "/v1/cards"]


# ---------------------------------------------------------------- the command


async def test_the_dashboard_command_prints_a_working_link(
    make_broker: BrokerFactory, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.e2e.conftest import free_port

    store_key(TEST_KEY)
    broker = await make_broker(api_config(upstream.url, listen=[f"127.0.0.1:{free_port()}"]))
    cfg_path = broker.daemon.rt.config_path
    rc = await asyncio.to_thread(cli.main, ["dashboard", "--print-url", "--config", str(cfg_path)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    url = out.out.strip()
    assert url.startswith(f"http://localhost:{broker.port}/_broker/ui/login?t=") and "once" in out.err
    assert (await open_link(broker, url))[0] == 303


def test_the_dashboard_command_says_when_the_daemon_is_not_running(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import write_config

    path = write_config(tmp_path / "c.yaml", api_config("http://127.0.0.1:9", listen=["127.0.0.1:9"]))
    assert cli.main(["dashboard", "--config", str(path)]) == 1
    assert "not running" in capsys.readouterr().err


async def test_a_page_from_another_origin_cannot_read_the_state(broker: Broker) -> None:
    me: Owner = await owner(broker)
    headers = me.headers(csrf=False, Origin="http://evil.example", **{"Sec-Fetch-Site": "cross-site"})
    async with broker.request("GET", "/_broker/ui/api/state", headers=headers) as r:
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        assert "routes" not in await r.text()
