"""broker/config/per_user.py: public_url, store, clients and an oauth block's user fields, each
problem named by its place and line; and public_url's host admitted by the Host guard."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from broker.config import OAuthAuth, PlatformClient, load
from broker.guard import allowed_host_values
from tests.config.documents import REPO_CONFIG, VALID, assert_not_echoed, issues_at, load_error, write_text

# A valid per-user config written as text so that line numbers are known:
#   1 public_url / 2 clients / 3 clients[0] / 9 routes[0].auth.type / 10 per_user / 11 user_header
#   12 user_label_header / 17 routes[1].auth.type
PER_USER = """\
public_url: https://broker.example.com
clients:
  - name: librechat
routes:
  - name: mcp
    prefix: /mcp
    upstream: https://mcp.agentcard.sh/mcp
    auth:
      type: oauth
      per_user: true
      user_header: X-User-ID
      user_label_header: X-User-Email
  - name: api
    prefix: /
    upstream: https://api.agentcard.sh
    auth:
      type: api_key
      key: keyring
"""


def per_user(**replace: str) -> str:
    """PER_USER with whole lines replaced: `public_url="public_url: x"` replaces the line that
    starts with `public_url:` (indentation kept), so that line numbers stay put."""
    text = PER_USER
    for key, line in replace.items():
        found = re.search(rf"^(\s*){key}:.*$", text, flags=re.M)
        assert found, key
        text = text[: found.start()] + found.group(1) + line + text[found.end() :]
    return text


def one_issue(cfg_path: Path, text: str, place: str, line: int) -> str:
    err = load_error(write_text(cfg_path, text))
    (issue,) = issues_at(err, place)
    assert issue.line == line, err.lines()
    assert f"{cfg_path}:{line}: {place}: {issue.message}" in err.lines()
    return issue.message


# ---------------------------------------------------------------- a valid per-user config


def test_per_user_config_loads(cfg_path: Path) -> None:
    cfg = load(write_text(cfg_path, PER_USER))
    assert cfg.public_url == "https://broker.example.com"
    assert cfg.store == "sqlite"
    assert cfg.clients == (PlatformClient("librechat"),)
    auth = cfg.routes[0].auth
    assert isinstance(auth, OAuthAuth)
    assert (auth.per_user, auth.user_header, auth.user_label_header) == (True, "X-User-ID", "X-User-Email")
    assert cfg.line_of("routes[0].auth.per_user") == 10


def test_defaults_without_the_per_user_keys(cfg_path: Path) -> None:
    cfg = load(write_text(cfg_path, VALID))
    assert (cfg.public_url, cfg.store, cfg.clients) == (None, "sqlite", ())
    auth = cfg.routes[0].auth
    assert isinstance(auth, OAuthAuth)
    assert (auth.per_user, auth.user_header, auth.user_label_header) == (False, "X-User-ID", None)


def test_per_user_with_the_default_user_header(cfg_path: Path) -> None:
    text = PER_USER.replace("      user_header: X-User-ID\n      user_label_header: X-User-Email\n", "")
    auth = load(write_text(cfg_path, text)).routes[0].auth
    assert isinstance(auth, OAuthAuth)
    assert (auth.per_user, auth.user_header, auth.user_label_header) == (True, "X-User-ID", None)


# ---------------------------------------------------------------- public_url


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("https://broker.example.com/", "https://broker.example.com"),
        ("https://Broker.Example.COM", "https://broker.example.com"),
        ("https://broker.example.com:443/", "https://broker.example.com"),
        ("https://broker.example.com:8443", "https://broker.example.com:8443"),
        ("https://[2001:db8::1]:8443/", "https://[2001:db8::1]:8443"),
        ("https://192.0.2.7", "https://192.0.2.7"),
    ],
)
def test_public_url_is_kept_as_an_origin(cfg_path: Path, written: str, kept: str) -> None:
    cfg = load(write_text(cfg_path, per_user(public_url=f"public_url: {written!r}")))
    assert cfg.public_url == kept


def test_public_url_http_needs_allow_insecure_upstream(cfg_path: Path) -> None:
    text = per_user(public_url="public_url: http://localhost:8765/")
    message = one_issue(cfg_path, text, "public_url", 1)
    assert "must be https://" in message
    assert "allow_insecure_upstream" in message

    cfg = load(write_text(cfg_path, text + "allow_insecure_upstream: true\n"))
    assert cfg.public_url == "http://localhost:8765"


@pytest.mark.parametrize(
    ("written", "words"),
    [
        ("https://broker.example.com/broker", "no path"),
        ("https://broker.example.com/?", "query string or fragment"),
        ("https://broker.example.com?x=1", "query string or fragment"),
        ("https://broker.example.com/#top", "query string or fragment"),
        ("https://admin:hunter2@broker.example.com", "user name or password"),
        ("https://admin@broker.example.com", "user name or password"),
        ("broker.example.com", "absolute https:// URL"),
        ("/connect", "absolute https:// URL"),
        ("ftp://broker.example.com", "absolute https:// URL"),
        ("https://", "must name a host"),
        ("https://broker.example.com:99999", "port from 1 to 65535"),
        ("https://broker.example.com:0", "port from 1 to 65535"),
        ("https://broker.example.com:", "must name a host"),
        ("https://broker_example!.com", "must name a host"),
        ("https://broker.example.com ", "spaces"),
        ("https://broker.exa\\tmple.com", "control characters"),
        ("", "got a string"),
    ],
)
def test_public_url_refused(cfg_path: Path, written: str, words: str) -> None:
    text = per_user(public_url=f'public_url: "{written}"')
    message = one_issue(cfg_path, text, "public_url", 1)
    assert words in message
    err = load_error(write_text(cfg_path, text))
    assert_not_echoed(err, "hunter2")
    # a public_url that is there but wrong is reported once, not also as missing
    assert [i.place for i in err.issues] == ["public_url"]


def test_public_url_not_a_string(cfg_path: Path) -> None:
    message = one_issue(cfg_path, per_user(public_url="public_url: 8443"), "public_url", 1)
    assert "got a number" in message


# ---------------------------------------------------------------- store


def test_store_sqlite(cfg_path: Path) -> None:
    assert load(write_text(cfg_path, "store: sqlite\n" + VALID)).store == "sqlite"


@pytest.mark.parametrize("value", ["SQLite", "5", "[sqlite]"])
def test_store_other_values_refused(cfg_path: Path, value: str) -> None:
    message = one_issue(cfg_path, f"store: {value}\n" + VALID, "store", 1)
    assert "must be `sqlite`" in message
    assert "redis://" in message


def test_store_other_url_schemes_refused(cfg_path: Path) -> None:
    message = one_issue(cfg_path, "store: postgres://db/0\n" + VALID, "store", 1)
    assert "must be a redis:// or rediss://" in message


# ---------------------------------------------------------------- clients


def test_clients_valid_names(cfg_path: Path) -> None:
    names = ["a", "open-webui", "x_1", "9lives", "a" * 64]
    text = "clients:\n" + "".join(f"  - name: {n}\n" for n in names) + VALID
    assert load(write_text(cfg_path, text)).clients == tuple(PlatformClient(n) for n in names)


@pytest.mark.parametrize("name", ["LibreChat", "-x", "_x", "a" * 65, "'lib chat'", "lib.chat", "42", "''"])
def test_client_name_refused(cfg_path: Path, name: str) -> None:
    text = PER_USER.replace("  - name: librechat", f"  - name: {name}")
    message = one_issue(cfg_path, text, "clients[0].name", 3)
    assert "a-z, 0-9, _ or -" in message


def test_client_names_are_unique(cfg_path: Path) -> None:
    text = PER_USER.replace("  - name: librechat\n", "  - name: librechat\n  - name: librechat\n")
    message = one_issue(cfg_path, text, "clients[1].name", 4)
    assert "duplicate client name 'librechat'" in message


def test_client_unknown_key_refused(cfg_path: Path) -> None:
    text = PER_USER.replace("  - name: librechat\n", "  - name: librechat\n    label: LibreChat\n")
    message = one_issue(cfg_path, text, "clients[0].label", 4)
    assert "unknown key (allowed here: name)" in message


def test_client_without_a_name(cfg_path: Path) -> None:
    text = PER_USER.replace("  - name: librechat\n", "  - {}\n")
    message = one_issue(cfg_path, text, "clients[0].name", 3)
    assert "is required" in message


@pytest.mark.parametrize(
    ("value", "place", "words"),
    [
        ("librechat", "clients", "must be a list of `{name: NAME}` entries"),
        ("{name: librechat}", "clients", "must be a list"),
        ("[librechat]", "clients[0]", "must be a mapping `{name: NAME}`, got a string"),
    ],
)
def test_clients_shape_refused(cfg_path: Path, value: str, place: str, words: str) -> None:
    message = one_issue(cfg_path, f"clients: {value}\n" + VALID, place, 1)
    assert words in message


# ---------------------------------------------------------------- the oauth block's user fields


def test_per_user_must_be_a_boolean(cfg_path: Path) -> None:
    message = one_issue(cfg_path, per_user(per_user='per_user: "yes"'), "routes[0].auth.per_user", 10)
    assert "true or false" in message


@pytest.mark.parametrize(
    "header",
    [
        "Authorization", "cookie", "Host", "Content-Length", "transfer-encoding", "Connection",
        "Proxy-Authorization", "Origin", "X-Forwarded-User", "Forwarded", "X-Real-IP",
        "X-Broker-Request-Id", "Mcp-Session-Id", "Sec-Fetch-User", "Content-Type", "Upgrade",
    ],
)  # fmt: skip
@pytest.mark.parametrize(("key", "line"), [("user_header", 11), ("user_label_header", 12)])
def test_user_headers_the_broker_reasons_about_are_refused(
    cfg_path: Path, header: str, key: str, line: int
) -> None:
    message = one_issue(cfg_path, per_user(**{key: f"{key}: {header}"}), f"routes[0].auth.{key}", line)
    assert "a header the broker itself reads, drops or sets" in message


@pytest.mark.parametrize("header", ['"X User"', '"X-User:"', '"X-Üser"', '""', "[X-User-ID]", "42"])
def test_user_header_must_be_a_field_name(cfg_path: Path, header: str) -> None:
    message = one_issue(
        cfg_path, per_user(user_header=f"user_header: {header}"), "routes[0].auth.user_header", 11
    )
    assert "HTTP header name" in message or "non-empty string" in message


@pytest.mark.parametrize("header", ["X-OpenWebUI-User-Id", "x-user-id", "X_User~1"])
def test_user_header_tokens_accepted(cfg_path: Path, header: str) -> None:
    auth = load(write_text(cfg_path, per_user(user_header=f"user_header: {header}"))).routes[0].auth
    assert isinstance(auth, OAuthAuth)
    assert auth.user_header == header


@pytest.mark.parametrize(("key", "line"), [("user_header", 11), ("user_label_header", 12)])
@pytest.mark.parametrize("flag", ["per_user: false", "# per_user: true"])
def test_user_headers_need_per_user_true(cfg_path: Path, key: str, line: int, flag: str) -> None:
    text = per_user(per_user=flag)
    message = one_issue(cfg_path, text, f"routes[0].auth.{key}", line)
    assert "add `per_user: true`" in message


@pytest.mark.parametrize(
    ("auth", "kind"),
    [
        ("      type: api_key\n      key: keyring\n", "api_key"),
        (
            "      type: client_credentials\n      token_url: https://api.agentcard.sh/api/v2/oauth/token\n"
            "      client_id: cid\n",
            "client_credentials",
        ),
    ],
)
def test_per_user_only_on_oauth(cfg_path: Path, auth: str, kind: str) -> None:
    text = PER_USER.replace(
        "      type: oauth\n      per_user: true\n", auth.replace("type:", "per_user: true\n      type:", 1)
    ).replace("      user_header: X-User-ID\n      user_label_header: X-User-Email\n", "")
    err = load_error(write_text(cfg_path, text))
    (issue,) = issues_at(err, "routes[0].auth.per_user")  # one clear issue, not also "unknown key"
    assert issue.line == 9
    assert "per-user routes need `type: oauth`" in issue.message
    assert f"not allowed with `type: {kind}`" in issue.message


def test_user_header_on_api_key_is_explained(cfg_path: Path) -> None:
    message = one_issue(cfg_path, VALID + "      user_header: X-User-ID\n", "routes[1].auth.user_header", 15)
    assert "need `type: oauth`" in message


# ---------------------------------------------------------------- what a per-user route needs


def test_per_user_route_needs_public_url(cfg_path: Path) -> None:
    text = per_user(public_url="# no public_url")
    message = one_issue(cfg_path, text, "routes[0].auth.per_user", 10)
    assert "needs `public_url`" in message
    assert "public_url: https://broker.example.com" in message  # the fix


@pytest.mark.parametrize("clients", ["clients: []", "# no clients"])
def test_per_user_route_needs_a_client(cfg_path: Path, clients: str) -> None:
    text = per_user(clients=clients).replace("  - name: librechat\n", "# none\n")
    message = one_issue(cfg_path, text, "routes[0].auth.per_user", 10)
    assert "needs at least one platform client" in message
    assert "clients: [{name: librechat}]" in message
    assert "agentcard-broker clients add librechat" in message


def test_per_user_route_needs_both(cfg_path: Path) -> None:
    text = PER_USER.replace("public_url: https://broker.example.com\nclients:\n  - name: librechat\n", "")
    err = load_error(write_text(cfg_path, text))
    issues = issues_at(err, "routes[0].auth.per_user")
    assert len(issues) == 2
    assert all(i.line == 7 for i in issues)


def test_a_bad_client_entry_is_not_also_reported_as_missing(cfg_path: Path) -> None:
    err = load_error(write_text(cfg_path, PER_USER.replace("  - name: librechat", "  - name: Libre")))
    assert [i.place for i in err.issues] == ["clients[0].name"]


# ---------------------------------------------------------------- the Host guard


def test_host_guard_admits_public_url_host_on_every_listener(cfg_path: Path) -> None:
    cfg = load(write_text(cfg_path, per_user(public_url="public_url: https://Broker.Example.com/")))
    for port in (8765, 80, None):
        hosts = allowed_host_values(cfg, port)
        assert "broker.example.com" in hosts
        assert "evil.example.com" not in hosts
        assert "broker.example.com.evil.example" not in hosts
    hosts = allowed_host_values(cfg, 8765)
    assert "127.0.0.1:8765" in hosts
    assert "broker.example.com:8765" not in hosts  # exactly public_url's authority, nothing more


def test_host_guard_admits_public_url_with_its_port(cfg_path: Path) -> None:
    cfg = load(write_text(cfg_path, per_user(public_url="public_url: https://broker.example.com:8443")))
    hosts = allowed_host_values(cfg, 8765)
    assert "broker.example.com:8443" in hosts
    assert "broker.example.com" not in hosts


def test_host_guard_without_public_url_is_unchanged(cfg_path: Path) -> None:
    cfg = load(write_text(cfg_path, VALID))
    assert allowed_host_values(cfg, 8765) == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}


# ---------------------------------------------------------------- the shipped example


def test_shipped_example_enables_no_per_user_route(cfg_path: Path) -> None:
    shutil.copy(REPO_CONFIG, cfg_path)
    cfg_path.chmod(0o600)
    cfg = load(cfg_path)
    assert (cfg.public_url, cfg.store, cfg.clients) == (None, "sqlite", ())
    assert not any(isinstance(r.auth, OAuthAuth) and r.auth.per_user for r in cfg.routes)


def test_shipped_per_user_example_loads_once_uncommented(cfg_path: Path) -> None:
    keys = r"public_url|store|clients|  - name|- name|  (prefix|upstream|auth)|    \w+"
    text = re.sub(rf"^(\s*)# (?=({keys}):)", r"\1", REPO_CONFIG.read_text(), flags=re.M)
    assert "per_user: true" in text and "# per_user" not in text
    cfg = load(write_text(cfg_path, text))
    assert cfg.public_url == "https://broker.example.com"
    assert cfg.clients == (PlatformClient("librechat"),)
    route = cfg.route("mcp-users")
    assert route is not None
    assert isinstance(route.auth, OAuthAuth)
    assert (route.auth.per_user, route.auth.user_header, route.auth.user_label_header) == (
        True,
        "X-User-ID",
        "X-User-Email",
    )
    assert [r.name for r in cfg.routes] == ["mcp", "api", "mcp-users"]
