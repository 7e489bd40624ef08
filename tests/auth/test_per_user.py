"""broker/auth/per_user.py: end users' grants on a per-user route, against real servers.

The authorization server is the broker's own sandbox one (the MCP SDK's: dynamic registration,
PKCE S256, single-use rotating refresh tokens, revocation) on 127.0.0.1; the browser's part is a
real aiohttp client; the store is a real SQLite file with its master key in the keyring file
backend. Only fake values.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from broker.auth.oauth.tokens import TokenSet
from broker.auth.per_user import ConnectError, UserGrants, read_link, take_link
from broker.auth.secret_store import KeyringStore
from broker.config import Config, OAuthAuth, Route
from broker.errors import BrokerError
from broker.scrub import SecretSet
from broker.store.sqlite import SqliteStore
from tests.mcp_upstream import McpUpstream, run_mcp_upstream
from tests.store.conftest import Clock

PUBLIC_URL = "https://broker.example.test"
NEAR_EXPIRY_S = 2.5


def per_user_config(up: McpUpstream, public_url: str = PUBLIC_URL, name: str = "mcp") -> tuple[Config, Route]:
    auth = OAuthAuth(scopes=("cards",), per_user=True, user_label_header="X-User-Email")
    route = Route(name=name, prefix="/mcp", upstream=up.mcp_url, auth=auth, place="routes[0]")
    cfg = Config(
        path="test.yaml", listen=(), routes=(route,), allow_insecure_upstream=True, public_url=public_url
    )
    return cfg, route


@dataclass
class Setup:
    up: McpUpstream
    grants: UserGrants
    store: SqliteStore
    db_path: Path


async def open_grants(up: McpUpstream, db_path: Path, public_url: str = PUBLIC_URL, **kw: object) -> Setup:
    cfg, route = per_user_config(up, public_url)
    store = await SqliteStore.open(db_path, KeyringStore(), **kw)  # type: ignore[arg-type]
    return Setup(up, UserGrants(route, cfg, store, KeyringStore(), SecretSet()), store, db_path)


@pytest.fixture
async def up() -> AsyncIterator[McpUpstream]:
    async with run_mcp_upstream(access_ttl=60) as server:
        yield server


@pytest.fixture
async def setup(up: McpUpstream, tmp_path: Path) -> AsyncIterator[Setup]:
    s = await open_grants(up, tmp_path / "state" / "state.sqlite3")
    yield s
    await s.grants.close()
    await s.store.close()


async def authorize_in_browser(authorize_url: str) -> str:
    """What the user's browser does at AgentCard: sign in (auto-approved), get sent back. The
    Location it is sent to (the broker's callback, with code, state and maybe iss)."""
    async with aiohttp.ClientSession() as s, s.get(authorize_url, allow_redirects=False) as r:
        assert r.status == 302, await r.text()
        return r.headers["Location"]


def callback_params(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


async def connect(grants: UserGrants, client: str, user: str, label: str | None = None) -> dict[str, str]:
    """A whole connect: the link, its page's Continue, AgentCard, the callback. The callback's
    query parameters (already used)."""
    link = await grants.connect_link(client, user, label)
    record = await take_link(grants.store, link.rsplit("/", 1)[1])
    assert record is not None
    location = await authorize_in_browser(await grants.begin_authorization(record))
    assert location.startswith(grants.redirect_uri + "?")
    q = callback_params(location)
    assert await grants.complete(q["state"], q["code"], q.get("iss")) == (client, user)
    return q


async def tokens_of(store: SqliteStore, user: str, client: str = "librechat") -> TokenSet:
    grant = await store.get_grant("mcp", client, user)
    assert grant is not None
    return TokenSet.from_json(grant.tokens)


def bearer(header: dict[str, str]) -> str:
    return header["Authorization"].removeprefix("Bearer ")


async def expire_access_tokens(up: McpUpstream) -> None:
    """Tokens issued from now on live 3 s: the broker refreshes them from 2.4 s on (its margin
    is a fifth of the lifetime), which `NEAR_EXPIRY_S` of sleep reaches."""
    up.provider.access_ttl = 3


# ---------------------------------------------------------------- connect links


async def test_a_connect_link_is_single_use_and_bound_to_its_user(setup: Setup) -> None:
    g = setup.grants
    link = await g.connect_link("librechat", "alice", "alice@example.test")
    prefix = f"{PUBLIC_URL}/_broker/connect/"
    assert link.startswith(prefix)
    connect_id = link.removeprefix(prefix)
    assert len(connect_id) == 43
    # the page may be shown any number of times without using the link up
    for _ in range(2):
        shown = await read_link(setup.store, connect_id)
        assert shown is not None and (shown.route, shown.client, shown.user) == ("mcp", "librechat", "alice")
        assert shown.label == "alice@example.test"
    taken = await take_link(setup.store, connect_id)
    assert taken is not None and taken.user == "alice"
    assert await take_link(setup.store, connect_id) is None
    assert await read_link(setup.store, connect_id) is None
    other = await g.connect_link("librechat", "alice", None)
    assert other != link


async def test_a_connect_link_expires_after_15_minutes(up: McpUpstream, tmp_path: Path) -> None:
    clock = Clock(time.time())
    s = await open_grants(up, tmp_path / "state.sqlite3", clock=clock)
    try:
        fresh = (await s.grants.connect_link("librechat", "alice", None)).rsplit("/", 1)[1]
        old = (await s.grants.connect_link("librechat", "bob", None)).rsplit("/", 1)[1]
        clock.now += 899
        assert await take_link(s.store, fresh) is not None
        clock.now += 2
        assert await read_link(s.store, old) is None
        assert await take_link(s.store, old) is None
    finally:
        await s.grants.close()
        await s.store.close()


# ---------------------------------------------------------------- connecting


async def test_connecting_stores_that_users_grant_and_only_that_users(setup: Setup) -> None:
    up, g = setup.up, setup.grants
    await connect(g, "librechat", "alice", "alice@example.test")
    infos = await setup.store.list_grants()
    assert [(i.route, i.client, i.user, i.state) for i in infos] == [("mcp", "librechat", "alice", "active")]
    # the broker registered once, as a web client whose redirect URI is public_url's callback
    assert up.recorder.calls[("POST", "/register")] == 1
    (registered,) = up.provider.clients.values()
    assert [str(u) for u in registered.redirect_uris or []] == [f"{PUBLIC_URL}/_broker/callback"]
    assert registered.application_type == "web"
    assert up.recorder.grants["authorization_code"] == 1

    header = await g.credential("librechat", "alice", None).authorization()
    access = up.provider.access_tokens[bearer(header)]
    assert access.resource == up.mcp_url  # the resource indicator is the route's upstream
    assert access.client_id == registered.client_id
    # the same user id from another platform is another user: not connected
    with pytest.raises(BrokerError) as err:
        await g.credential("openwebui", "alice", None).authorization()
    assert err.value.code == "needs_connect"
    assert err.value.connect_url is not None
    assert err.value.connect_url.startswith(f"{PUBLIC_URL}/_broker/connect/")
    assert err.value.connect_url in err.value.message
    assert "connect your AgentCard account" in err.value.message

    await connect(g, "librechat", "bob")
    assert up.recorder.calls[("POST", "/register")] == 1  # the registration is reused
    bob = await g.credential("librechat", "bob", None).authorization()
    assert bearer(bob) != bearer(header)
    assert (await tokens_of(setup.store, "alice")).access_token == bearer(header)


async def test_a_user_without_a_grant_gets_a_new_connect_link_each_time(setup: Setup) -> None:
    cred = setup.grants.credential("librechat", "carol", "carol@example.test")
    assert cred.ready_authorization() is None
    links = []
    for _ in range(2):
        with pytest.raises(BrokerError) as err:
            await cred.authorization()
        links.append(err.value.connect_url)
    assert links[0] != links[1]
    record = await read_link(setup.store, str(links[1]).rsplit("/", 1)[1])
    assert record is not None and (record.client, record.user, record.label) == (
        "librechat",
        "carol",
        "carol@example.test",
    )
    assert await setup.store.list_grants() == []


async def test_a_forged_state_stores_nothing(setup: Setup) -> None:
    g = setup.grants
    link = await g.connect_link("librechat", "mallory", None)
    record = await take_link(g.store, link.rsplit("/", 1)[1])
    assert record is not None
    q = callback_params(await authorize_in_browser(await g.begin_authorization(record)))
    tag = q["state"].partition(".")[0]
    for forged in ("", "x", f"{tag}.FAKEstate0123456789abcdefABCDEF0123456789abcd", q["state"] + "x"):
        with pytest.raises(ConnectError, match="unknown, expired or already finished"):
            await g.complete(forged, q["code"], None)
    assert await setup.store.list_grants() == []
    assert setup.up.recorder.grants["authorization_code"] == 0  # the code was never tried


async def test_a_state_is_used_once(setup: Setup) -> None:
    q = await connect(setup.grants, "librechat", "alice")
    before = await tokens_of(setup.store, "alice")
    with pytest.raises(ConnectError, match="already finished"):
        await setup.grants.complete(q["state"], q["code"], q.get("iss"))
    after = await tokens_of(setup.store, "alice")
    assert after.access_token == before.access_token
    assert setup.up.recorder.grants["authorization_code"] == 1


async def test_a_wrong_issuer_stores_nothing_and_ends_the_state(setup: Setup) -> None:
    up, g = setup.up, setup.grants
    up.provider.issuer = up.base  # RFC 9207: the authorization response names its issuer
    record = await take_link(g.store, (await g.connect_link("librechat", "alice", None)).rsplit("/", 1)[1])
    assert record is not None
    q = callback_params(await authorize_in_browser(await g.begin_authorization(record)))
    assert q["iss"] == up.base
    with pytest.raises(ConnectError, match="expected authorization server"):
        await g.complete(q["state"], q["code"], "https://evil.example.test")
    with pytest.raises(ConnectError, match="already finished"):
        await g.complete(q["state"], q["code"], q["iss"])
    assert await setup.store.list_grants() == []
    assert up.recorder.grants["authorization_code"] == 0


async def test_a_state_belongs_to_its_route(setup: Setup, up: McpUpstream) -> None:
    cfg, route = per_user_config(up, name="other")
    other = UserGrants(route, cfg, setup.store, KeyringStore(), SecretSet())
    record = await take_link(setup.store, (await setup.grants.connect_link("c", "u", None)).rsplit("/", 1)[1])
    assert record is not None
    q = callback_params(await authorize_in_browser(await setup.grants.begin_authorization(record)))
    assert setup.grants.owns_state(q["state"])
    assert not other.owns_state(q["state"])
    await other.close()


# ---------------------------------------------------------------- refreshing


async def test_concurrent_requests_across_an_expiry_refresh_once(setup: Setup) -> None:
    up, g = setup.up, setup.grants
    await expire_access_tokens(up)
    await connect(g, "librechat", "alice")
    cred = g.credential("librechat", "alice", None)
    first = await cred.authorization()
    assert cred.ready_authorization() == first
    old = await tokens_of(setup.store, "alice")
    await asyncio.sleep(NEAR_EXPIRY_S)  # within the refresh margin before the 3 s expiry
    assert cred.ready_authorization() is None
    headers = await asyncio.gather(*(cred.authorization() for _ in range(20)))
    assert up.recorder.grants["refresh_token"] == 1
    assert len({bearer(h) for h in headers}) == 1
    new = await tokens_of(setup.store, "alice")
    assert bearer(headers[0]) == new.access_token != old.access_token
    # the rotated refresh token was stored, and it is the one the server holds now
    assert new.refresh_token in up.provider.refresh_tokens
    assert old.refresh_token not in up.provider.refresh_tokens
    assert cred.ready_authorization() == headers[0]
    # RFC 8707: the refresh names the resource, as the code exchange did
    assert [r["resource"] for r in up.recorder.token_requests] == [up.mcp_url, up.mcp_url]
    assert up.recorder.token_requests[-1]["grant_type"] == "refresh_token"


async def test_two_processes_refresh_one_user_once(setup: Setup, up: McpUpstream) -> None:
    """Two brokers on one store file: the lease lets one refresh; the other reads its result."""
    await expire_access_tokens(up)
    await connect(setup.grants, "librechat", "alice")
    second = await open_grants(up, setup.db_path)
    try:
        a = setup.grants.credential("librechat", "alice", None)
        b = second.grants.credential("librechat", "alice", None)
        await asyncio.gather(a.authorization(), b.authorization())  # both hold the same tokens
        await asyncio.sleep(NEAR_EXPIRY_S)
        headers = await asyncio.gather(*(c.authorization() for c in (a, b) for _ in range(10)))
        assert up.recorder.grants["refresh_token"] == 1
        assert len({bearer(h) for h in headers}) == 1
        assert bearer(headers[0]) in up.provider.access_tokens
    finally:
        await second.grants.close()
        await second.store.close()


async def test_a_dead_grant_ends_only_that_user(setup: Setup) -> None:
    up, g = setup.up, setup.grants
    await expire_access_tokens(up)
    await connect(g, "librechat", "alice")
    await connect(g, "librechat", "bob")
    alice, bob = g.credential("librechat", "alice", None), g.credential("librechat", "bob", None)
    await alice.authorization()
    # AgentCard forgets alice's grant (she revoked it there): her refresh token is refused
    dead = await tokens_of(setup.store, "alice")
    up.provider.refresh_tokens.pop(str(dead.refresh_token))
    await asyncio.sleep(NEAR_EXPIRY_S)
    with pytest.raises(BrokerError) as err:
        await alice.authorization()
    assert err.value.code == "needs_connect"
    assert err.value.connect_url and err.value.connect_url in err.value.message
    assert str(dead.refresh_token) not in err.value.message
    assert up.recorder.grants["refresh_token"] == 1
    with pytest.raises(BrokerError):  # no loop on a dead refresh token
        await alice.authorization()
    assert up.recorder.grants["refresh_token"] == 1
    states = {i.user: i.state for i in await setup.store.list_grants()}
    assert states == {"alice": "dead", "bob": "active"}
    header = await bob.authorization()
    assert bearer(header) in up.provider.access_tokens
    assert up.recorder.grants["refresh_token"] == 2
    # alice connects again and works again
    await connect(g, "librechat", "alice")
    assert bearer(await alice.authorization()) in up.provider.access_tokens


async def test_an_upstream_401_refreshes_once(setup: Setup) -> None:
    up, g = setup.up, setup.grants
    await connect(g, "librechat", "alice")
    cred = g.credential("librechat", "alice", None)
    used = await cred.authorization()
    up.provider.access_tokens.pop(bearer(used))  # the upstream now answers 401 to it
    assert await cred.retry_after_rejection(used)
    fresh = await cred.authorization()
    assert bearer(fresh) != bearer(used) and bearer(fresh) in up.provider.access_tokens
    assert await cred.retry_after_rejection(used)  # already refreshed: retry, no second refresh
    assert up.recorder.grants["refresh_token"] == 1


async def test_an_upstream_401_on_a_revoked_grant_asks_to_connect(setup: Setup) -> None:
    """The 401 for a grant AgentCard revoked ends in the user's connect link, not the route-level
    `needs_login` an unretried 401 answers; another request that used the dead token also
    re-reads the grant and gets a link."""
    up, g = setup.up, setup.grants
    await connect(g, "librechat", "alice")
    cred = g.credential("librechat", "alice", None)
    used = await cred.authorization()
    up.provider.revoke_everything()
    with pytest.raises(BrokerError) as err:
        await cred.retry_after_rejection(used)
    assert err.value.code == "needs_connect" and err.value.connect_url
    assert up.recorder.grants["refresh_token"] == 1
    assert await cred.retry_after_rejection(used)  # ended meanwhile: retry reads the store ...
    with pytest.raises(BrokerError) as err:
        await cred.authorization()  # ... and asks to connect, without a second refresh
    assert err.value.code == "needs_connect"
    assert up.recorder.grants["refresh_token"] == 1


async def test_revoke_ends_the_grant_upstream_and_here(setup: Setup) -> None:
    up, g = setup.up, setup.grants
    await connect(g, "librechat", "alice")
    await connect(g, "librechat", "bob")
    alice = await tokens_of(setup.store, "alice")
    assert await g.revoke("librechat", "alice")
    assert alice.access_token not in up.provider.access_tokens
    assert alice.refresh_token not in up.provider.refresh_tokens
    assert [i.user for i in await setup.store.list_grants()] == ["bob"]
    assert not await g.revoke("librechat", "alice")
    with pytest.raises(BrokerError) as err:
        await g.credential("librechat", "alice", None).authorization()
    assert err.value.code == "needs_connect"
    assert bearer(await g.credential("librechat", "bob", None).authorization()) in up.provider.access_tokens


# ---------------------------------------------------------------- what is kept, and where


async def test_the_store_file_holds_no_token(setup: Setup) -> None:
    up, g = setup.up, setup.grants
    await expire_access_tokens(up)
    link = await g.connect_link("librechat", "dave", None)  # a link not used yet
    await connect(g, "librechat", "alice")
    cred = g.credential("librechat", "alice", None)
    seen = [await cred.authorization()]
    await asyncio.sleep(NEAR_EXPIRY_S)
    seen.append(await cred.authorization())
    assert up.recorder.grants["refresh_token"] == 1
    held = {bearer(h) for h in seen} | set(up.provider.refresh_tokens) | set(up.provider.access_tokens)
    held.add(link.rsplit("/", 1)[1])
    raw = b"".join(p.read_bytes() for p in setup.db_path.parent.glob(setup.db_path.name + "*"))
    assert len(held) >= 4
    for secret in held:
        assert secret.encode() not in raw
    # and nothing the credential reports carries a token
    assert all(secret not in f"{cred.reason} {cred.details()} {cred.check()}" for secret in held)


async def test_credentials_are_cached_and_bounded(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.auth import per_user

    monkeypatch.setattr(per_user, "MAX_CACHED_USERS", 2)
    g = setup.grants
    alice = g.credential("librechat", "alice", None)
    assert g.credential("librechat", "alice", "alice@example.test") is alice
    assert alice.has_mode is False and alice.mode is None and alice.can_refresh
    bob = g.credential("librechat", "bob", None)
    g.credential("librechat", "alice", None)  # used last: bob is now the oldest
    g.credential("librechat", "carol", None)
    assert g.credential("librechat", "alice", None) is alice
    assert g.credential("librechat", "bob", None) is not bob  # evicted: a new one reads the store
    assert g.credential("openwebui", "alice", None) is not alice


async def test_a_grant_revoked_elsewhere_is_forgotten_at_the_next_stamp(
    setup: Setup, up: McpUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica (or `users revoke`) deleted the grant: this one's cached token is dropped
    when it next stamps the last use, with no store read on the requests in between."""
    from broker.auth import per_user_credential

    await connect(setup.grants, "librechat", "alice")
    cred = setup.grants.credential("librechat", "alice", None)
    await cred.authorization()
    assert cred.ready_authorization() is not None  # cached: no store read
    second = await open_grants(up, setup.db_path)
    try:
        assert await second.store.delete_grant("mcp", "librechat", "alice")
    finally:
        await second.grants.close()
        await second.store.close()
    assert cred.ready_authorization() is not None  # not known here yet
    monkeypatch.setattr(per_user_credential, "TOUCH_EVERY_S", 0.0)
    cred.ready_authorization()  # the stamp goes out beside this request ...
    for _ in range(100):
        await asyncio.sleep(0.01)
        if cred.ready_authorization() is None:
            break
    assert cred.ready_authorization() is None  # ... finds no grant, and the cache forgets it
    with pytest.raises(BrokerError) as info:
        await cred.authorization()
    assert info.value.code == "needs_connect"


async def test_each_user_s_tokens_are_masked_in_their_own_answers_not_held_by_all(
    setup: Setup, up: McpUpstream
) -> None:
    """A user's tokens are masked in that user's answers (split across chunks too), and the
    daemon's secret set, which every answer of every route is searched for, does not grow with
    the users: scrubbing cost stays flat however many users connect (bench/replicas.py found
    300 users doubling the CPU per call when each user's tokens joined the shared set)."""
    g = setup.grants
    held_before = len(g.secrets)
    creds = []
    for user in ("alice", "bob", "carol"):
        await connect(g, "librechat", user)
        cred = g.credential("librechat", user, None)
        await cred.authorization()
        creds.append(cred)
    assert len(g.secrets) == held_before  # no end user's token in the shared set
    alice, bob, _ = creds
    token = bearer(await alice.authorization()).encode()
    factory = alice.answer_mask()
    assert factory is not None
    answer = b'{"echo": "' + token + b'", "other": "' + bearer(await bob.authorization()).encode() + b'"}'
    for cut in (5, len(answer) // 2, 13 + len(token) // 2):  # the token split across two chunks
        mask = factory()
        out = mask.feed(answer[:cut]) + mask.feed(answer[cut:]) + mask.flush()
        assert token not in out and len(out) == len(answer)
    # bob's token is bob's to mask: alice's answers are scrubbed for alice's own tokens
    assert bearer(await bob.authorization()).encode() in out
    other = bob.answer_mask()
    assert other is not None and token in other().feed(answer) + b""  # bob's mask leaves alice's
