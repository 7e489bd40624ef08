"""Per-user routes and issue 19's OAuth client rules: issuer binding (each user's grant is bound
to the authorization server that issued it) and step-up (a connect for more scope), against two
real authorization servers and one resource whose RFC 9728 metadata names one of them
(tests/e2e/test_oauth_issuer.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from mcp.shared.auth import OAuthClientInformationFull
from pydantic import AnyUrl

from broker.auth.oauth.discovery import ServerMetadata
from broker.auth.oauth.registration import metadata_document_client
from broker.auth.per_user import ConnectError, take_link
from broker.errors import BrokerError
from tests.auth.test_per_user import (
    Setup,
    authorize_in_browser,
    bearer,
    callback_params,
    connect,
    open_grants,
    tokens_of,
)
from tests.e2e.test_oauth_issuer import Resource, two_servers
from tests.mcp_upstream import CimdProvider, run_mcp_upstream


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


# ---------------------------------------------------------------- which client the broker is


async def test_a_restart_reuses_the_per_user_registration(tmp_path: Path) -> None:
    """Dynamic registration ("web": the redirect is the public callback) happens once: a second
    process on the same state store connects its users with the kept registration."""
    async with run_mcp_upstream() as up:
        first = await open_grants(up, tmp_path / "state.sqlite3")
        await connect(first.grants, "librechat", "alice")
        await first.grants.close()
        await first.store.close()
        second = await open_grants(up, tmp_path / "state.sqlite3")
        try:
            await connect(second.grants, "librechat", "bob")
        finally:
            await second.grants.close()
            await second.store.close()
        assert up.recorder.calls[("POST", "/register")] == 1
        assert [r["application_type"] for r in up.recorder.registrations] == ["web"]


async def test_a_pinned_client_id_comes_before_a_metadata_document(tmp_path: Path) -> None:
    async with run_mcp_upstream(cimd=True) as up:
        s = await open_grants(up, tmp_path / "state.sqlite3")
        auth = replace(s.grants.auth, client_id="pinned-client")
        s.grants.auth = auth
        s.grants.route = replace(s.grants.route, auth=auth)
        up.provider.clients["pinned-client"] = OAuthClientInformationFull(
            client_id="pinned-client",
            redirect_uris=[AnyUrl(s.grants.redirect_uri)],
            token_endpoint_auth_method="none",
            scope="cards",
        )
        try:
            await connect(s.grants, "librechat", "alice")
        finally:
            await s.grants.close()
            await s.store.close()
        assert up.recorder.calls[("POST", "/register")] == 0
        assert isinstance(up.provider, CimdProvider) and up.provider.fetched == []
        assert up.provider.access_tokens
        assert {t.client_id for t in up.provider.access_tokens.values()} == {"pinned-client"}


def test_a_metadata_document_client_needs_support_and_an_https_public_url() -> None:
    meta = ServerMetadata(
        issuer="https://as.example",
        authorization_endpoint="https://as.example/authorize",
        token_endpoint="https://as.example/token",
        registration_endpoint="https://as.example/register",
        revocation_endpoint=None,
        resource="https://mcp.example/mcp",
        client_id_metadata_document_supported=True,
    )
    cb = "https://broker.example/_broker/callback"
    client = metadata_document_client(meta, "https://broker.example", cb, insecure_ok=False)
    assert client is not None and client.client_id == "https://broker.example/_broker/oauth/client.json"
    assert not client.registered and client.client_secret is None and client.redirect_uri == cb
    assert metadata_document_client(meta, "http://broker.example", cb, insecure_ok=False) is None
    assert metadata_document_client(meta, "http://127.0.0.1:1", cb, insecure_ok=True) is not None
    assert metadata_document_client(meta, "", cb, insecure_ok=True) is None  # no public_url
    unsupported = replace(meta, client_id_metadata_document_supported=False)
    assert metadata_document_client(unsupported, "https://broker.example", cb, insecure_ok=False) is None


async def test_iss_is_required_when_the_metadata_says_the_server_sends_it(tmp_path: Path) -> None:
    """RFC 9207: with authorization_response_iss_parameter_supported, a callback without `iss`
    (or with another issuer's) stores nothing; with the issuer's own it completes."""
    async with run_mcp_upstream() as up:
        s = await open_grants(up, tmp_path / "state.sqlite3")
        g = s.grants
        try:
            meta, _ = await g.authorization_server()
            g._meta = replace(meta, iss_parameter_supported=True)

            async def callback() -> dict[str, str]:
                link = await g.connect_link("librechat", "alice", None)
                record = await take_link(g.store, link.rsplit("/", 1)[1])
                assert record is not None
                return callback_params(await authorize_in_browser(await g.begin_authorization(record)))

            q = await callback()
            assert "iss" not in q
            with pytest.raises(ConnectError, match="expected authorization server"):
                await g.complete(q["state"], q["code"], None)
            q = await callback()
            with pytest.raises(ConnectError, match="expected authorization server"):
                await g.complete(q["state"], q["code"], "https://evil.example")
            assert await s.store.get_grant("mcp", "librechat", "alice") is None
            up.provider.issuer = meta.issuer  # the server sends its iss now
            q = await callback()
            assert q["iss"] == meta.issuer
            assert await g.complete(q["state"], q["code"], q["iss"]) == ("librechat", "alice")
            assert (await tokens_of(s.store, "alice")).issuer == meta.issuer
        finally:
            await g.close()
            await s.store.close()
