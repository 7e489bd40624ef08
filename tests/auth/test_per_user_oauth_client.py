"""Per-user routes and issue 19's OAuth client rules: issuer binding (each user's grant is bound
to the authorization server that issued it) and step-up (a connect for more scope), against two
real authorization servers and one resource whose RFC 9728 metadata names one of them
(tests/e2e/test_oauth_issuer.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.auth.per_user import take_link
from broker.errors import BrokerError
from tests.auth.test_per_user import Setup, bearer, connect, open_grants, tokens_of
from tests.e2e.test_oauth_issuer import Resource, two_servers


@dataclass
class Upstream:
    mcp_url: str


@pytest.fixture
async def res() -> AsyncIterator[Resource]:
    async with two_servers() as r:
        yield r


@pytest.fixture
async def setup(res: Resource, tmp_path: Path) -> AsyncIterator[Setup]:
    s = await open_grants(Upstream(res.url), tmp_path / "state.sqlite3")  # type: ignore[arg-type]
    yield s
    await s.grants.close()
    await s.store.close()


async def test_a_users_grant_of_the_former_authorization_server_is_not_used(
    res: Resource, setup: Setup
) -> None:
    a, b = res.servers
    g = setup.grants
    await connect(g, "librechat", "alice")
    await connect(g, "librechat", "bob")
    assert (await tokens_of(setup.store, "alice")).issuer == a.base  # bound to its issuer
    alice = g.credential("librechat", "alice", None)
    used = await alice.authorization()
    assert bearer(used) in a.provider.access_tokens

    res.current = 1  # the resource now names another authorization server: a 401 for alice
    with pytest.raises(BrokerError) as err:
        await alice.retry_after_rejection(used)
    assert err.value.code == "needs_connect"
    assert err.value.message.startswith(
        f"the authorization server changed from {a.base} to {b.base}: connect again; "
        "connect your AgentCard account to use this: open https://broker.example.test/_broker/connect/"
    )
    assert (await tokens_of(setup.store, "alice")).dead
    assert "authorization server changed" in alice.reason
    # bob's grant (read now) is of the former server too: not used, and he is asked to connect
    with pytest.raises(BrokerError) as err:
        await g.credential("librechat", "bob", None).authorization()
    assert err.value.code == "needs_connect"
    assert "authorization server changed" in err.value.message
    # neither grant's refresh token went anywhere
    assert a.recorder.grants["refresh_token"] == 0
    assert not b.recorder.token_requests

    # alice connects again: at the new server, where the route registers once
    await connect(g, "librechat", "alice")
    assert b.recorder.calls[("POST", "/register")] == 1
    assert (await tokens_of(setup.store, "alice")).issuer == b.base
    fresh = await g.credential("librechat", "alice", None).authorization()
    assert bearer(fresh) in b.provider.access_tokens


async def test_step_up_asks_that_user_to_connect_for_the_union_of_scopes(res: Resource, setup: Setup) -> None:
    a, _ = res.servers
    g = setup.grants
    await connect(g, "librechat", "alice")
    await connect(g, "librechat", "bob")
    alice = g.credential("librechat", "alice", None)
    await alice.authorization()
    err = await alice.step_up(frozenset({"cards:write", "cards"}))
    assert err.code == "needs_connect"
    assert err.message.startswith(
        "the upstream asks for more scope (cards cards:write): connect again for cards cards:write; "
        "connect your AgentCard account to use this: open https://broker.example.test/_broker/connect/"
    )
    assert err.connect_url is not None and err.connect_url in err.message
    stored = await tokens_of(setup.store, "alice")
    assert stored.dead and stored.wanted_scope == "cards cards:write"
    with pytest.raises(BrokerError) as again:  # the grant is not used meanwhile, nor refreshed
        await g.credential("librechat", "alice", None).authorization()
    assert again.value.code == "needs_connect"
    assert a.recorder.grants["refresh_token"] == 0
    # her connect asks for the union; bob's (whose grant is untouched) for the configured scopes
    link = await g.connect_link("librechat", "alice", None)
    record = await take_link(g.store, link.rsplit("/", 1)[1])
    assert record is not None
    url = await g.begin_authorization(record)
    assert parse_qs(urlsplit(url).query)["scope"] == ["cards cards:write"]
    link = await g.connect_link("librechat", "bob", None)
    record = await take_link(g.store, link.rsplit("/", 1)[1])
    assert record is not None
    url = await g.begin_authorization(record)
    assert parse_qs(urlsplit(url).query)["scope"] == ["cards"]
    assert not (await tokens_of(setup.store, "bob")).dead
