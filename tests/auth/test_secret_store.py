"""broker/auth/secret_store.py: the keyring (file backend here), env:/file: references, 0600 file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest

from broker.auth.secret_store import (
    SERVICE,
    FileStore,
    KeyringStore,
    Lookup,
    SecretStoreError,
    open_store,
    resolve,
)
from broker.config import SecretRef
from tests.conftest import FILE_BACKEND, LIVE_KEY, TEST_KEY, store_key

# ---------------------------------------------------------------- KeyringStore


def test_keyring_store_set_get_delete() -> None:
    ks = KeyringStore()
    assert ks.get("api") is None
    ks.set("api", TEST_KEY)
    assert ks.get("api") == TEST_KEY
    assert keyring.get_password(SERVICE, "api") == TEST_KEY  # really in the keyring, under our service
    ks.set("api", LIVE_KEY)  # replacing
    assert ks.get("api") == LIVE_KEY
    assert ks.delete("api") is True
    assert ks.get("api") is None
    assert ks.delete("api") is False


def test_keyring_store_accounts_are_separate() -> None:
    ks = KeyringStore()
    ks.set("api", TEST_KEY)
    ks.set("platform", "acs_FAKEclientSecret0123456789")
    assert ks.get("api") == TEST_KEY
    assert ks.get("platform") == "acs_FAKEclientSecret0123456789"
    assert KeyringStore(service="someone-else").get("api") is None


def test_keyring_store_description_names_backend() -> None:
    assert KeyringStore().description == f"keyring ({FILE_BACKEND})"


# ---------------------------------------------------------------- resolve: keyring


def test_resolve_keyring_value() -> None:
    store_key(TEST_KEY + "\n")
    got = resolve(SecretRef("keyring"), "api", KeyringStore())
    assert got == Lookup(TEST_KEY)


def test_resolve_keyring_missing_names_the_store() -> None:
    store_key(TEST_KEY, route="other")
    got = resolve(SecretRef("keyring"), "api", KeyringStore())
    assert got.value is None
    assert "'api'" in got.reason
    assert FILE_BACKEND in got.reason
    assert "keyring" in got.reason


@pytest.fixture
def failing_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    keyring.set_keyring(keyring.backends.fail.Keyring())


def test_unusable_keyring_gives_its_reason_and_no_file_fallback(
    failing_keyring: None, isolated_env: Path
) -> None:
    state = Path(os.environ["XDG_STATE_HOME"]) / "agentcard-broker"
    before = sorted(p for p in isolated_env.rglob("*"))
    # a plaintext secrets file the broker could have fallen back to
    decoy = FileStore(state / "secrets.json")
    decoy.set("api", TEST_KEY)

    store = open_store("keyring", state)
    assert isinstance(store, KeyringStore)
    got = resolve(SecretRef("keyring"), "api", store)
    assert got.value is None
    assert got.reason.startswith("the OS keyring could not be read")
    assert "No recommended backend" in got.reason  # the keyring's own reason
    assert TEST_KEY not in got.reason
    assert "keyring.backends.fail.Keyring" in store.description

    with pytest.raises(SecretStoreError) as info:
        store.set("api", LIVE_KEY)
    assert LIVE_KEY not in str(info.value)
    assert "could not store" in str(info.value)
    with pytest.raises(SecretStoreError):
        store.delete("api")
    # nothing new written anywhere: the failed set did not land in a file instead
    after = sorted(p for p in isolated_env.rglob("*") if p.name != "secrets.json")
    assert [p for p in after if p not in before] == [state]
    assert json.loads((state / "secrets.json").read_text()) == {"api": TEST_KEY}


def test_keyring_error_text_never_carries_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(service: str, account: str, value: str) -> None:
        raise RuntimeError(f"backend refused {value!r}")

    monkeypatch.setattr(keyring, "set_password", boom)
    with pytest.raises(SecretStoreError) as info:
        KeyringStore().set("api", TEST_KEY)
    assert TEST_KEY not in str(info.value)
    assert "[REDACTED]" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ---------------------------------------------------------------- resolve: env


def test_resolve_env_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTCARD_API_KEY", f"  {TEST_KEY}\n")
    got = resolve(SecretRef("env", "AGENTCARD_API_KEY"), "api", KeyringStore())
    assert got == Lookup(TEST_KEY)


@pytest.mark.parametrize("value", [None, ""])
def test_resolve_env_unset(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    store_key(TEST_KEY)  # the keyring has one, but the reference says env: and must not use it
    if value is not None:
        monkeypatch.setenv("AGENTCARD_API_KEY", value)
    got = resolve(SecretRef("env", "AGENTCARD_API_KEY"), "api", KeyringStore())
    assert got.value is None
    assert "AGENTCARD_API_KEY" in got.reason
    assert "not set" in got.reason


# ---------------------------------------------------------------- resolve: file


def _secret_file(path: Path, content: str, mode: int) -> Path:
    path.write_text(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_resolve_file_private(tmp_path: Path, mode: int) -> None:
    f = _secret_file(tmp_path / "key", TEST_KEY + "\n", mode)
    assert resolve(SecretRef("file", str(f)), "api", KeyringStore()) == Lookup(TEST_KEY)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_resolve_file_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    f = _secret_file(tmp_path / "key", TEST_KEY, mode)
    got = resolve(SecretRef("file", str(f)), "api", KeyringStore())
    assert got.value is None
    assert f"chmod 600 {f}" in got.reason
    assert TEST_KEY not in got.reason


def test_resolve_file_symlink_refused(tmp_path: Path) -> None:
    real = _secret_file(tmp_path / "real", TEST_KEY, 0o600)
    link = tmp_path / "link"
    link.symlink_to(real)
    got = resolve(SecretRef("file", str(link)), "api", KeyringStore())
    assert got.value is None
    assert str(link) in got.reason
    assert TEST_KEY not in got.reason


def test_resolve_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    got = resolve(SecretRef("file", str(missing)), "api", KeyringStore())
    assert got == Lookup(None, f"secret file {missing} does not exist")


def test_resolve_file_empty(tmp_path: Path) -> None:
    empty = _secret_file(tmp_path / "empty", "\n  \n", 0o600)
    got = resolve(SecretRef("file", str(empty)), "api", KeyringStore())
    assert got.value is None
    assert "empty" in got.reason


def test_resolve_file_that_is_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    got = resolve(SecretRef("file", str(d)), "api", KeyringStore())
    assert got.value is None
    assert str(d) in got.reason


def test_resolve_file_that_is_a_fifo(tmp_path: Path, alarm: None) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    got = resolve(SecretRef("file", str(fifo)), "api", KeyringStore())
    assert got.value is None
    assert str(fifo) in got.reason


# ---------------------------------------------------------------- FileStore


def test_file_store_writes_0600_atomically(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secrets.json"
    fs = FileStore(path)
    assert fs.get("api") is None
    fs.set("api", TEST_KEY)
    fs.set("mcp", "refresh-token-FAKE-123456")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert json.loads(path.read_text()) == {"api": TEST_KEY, "mcp": "refresh-token-FAKE-123456"}
    assert fs.get("api") == TEST_KEY
    assert [p.name for p in path.parent.iterdir()] == ["secrets.json"]  # no temp files left
    assert fs.delete("api") is True
    assert fs.delete("api") is False
    assert FileStore(path).get("mcp") == "refresh-token-FAKE-123456"
    assert FileStore(path).get("api") is None
    assert "secrets.json" in fs.description


def test_file_store_replace_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "store" / "secrets.json"
    fs = FileStore(path)
    fs.set("api", TEST_KEY)
    inode = path.stat().st_ino

    def fail_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", fail_replace)
        with pytest.raises(OSError, match="disk full"):
            fs.set("api", LIVE_KEY)
    assert path.stat().st_ino == inode
    assert json.loads(path.read_text()) == {"api": TEST_KEY}
    assert [p.name for p in path.parent.iterdir()] == ["secrets.json"]  # the temp file is gone


def test_file_store_new_file_replaces_not_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    fs = FileStore(path)
    fs.set("a", "value-one-12345")
    first = path.stat().st_ino
    fs.set("b", "value-two-12345")
    assert path.stat().st_ino != first  # a new file renamed over the old one


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o606])
def test_file_store_refuses_file_readable_by_others(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "secrets.json"
    FileStore(path).set("api", TEST_KEY)
    path.chmod(mode)
    fs = FileStore(path)
    with pytest.raises(SecretStoreError) as info:
        fs.get("api")
    assert f"chmod 600 {path}" in str(info.value)
    assert TEST_KEY not in str(info.value)
    with pytest.raises(SecretStoreError):
        fs.set("other", LIVE_KEY)
    assert LIVE_KEY not in path.read_text()
    got = resolve(SecretRef("keyring"), "api", fs)  # through resolve: a reason, not an exception
    assert got.value is None
    assert "chmod 600" in got.reason


@pytest.mark.parametrize("content", ["not json", "[1, 2]"])
def test_file_store_corrupt_file(tmp_path: Path, content: str) -> None:
    path = _secret_file(tmp_path / "secrets.json", content, 0o600)
    with pytest.raises(SecretStoreError):
        FileStore(path).get("api")


def test_open_store_kinds(tmp_path: Path) -> None:
    fs = open_store("file", tmp_path)
    assert isinstance(fs, FileStore)
    assert fs.path == tmp_path / "secrets.json"
    assert isinstance(open_store("keyring", tmp_path), KeyringStore)
    assert not (tmp_path / "secrets.json").exists()


def test_resolve_through_file_store(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "secrets.json")
    fs.set("api", TEST_KEY)
    assert resolve(SecretRef("keyring"), "api", fs) == Lookup(TEST_KEY)
    missing = resolve(SecretRef("keyring"), "mcp", fs)
    assert missing.value is None
    assert str(tmp_path / "secrets.json") in missing.reason
