"""Secret references (`keyring`, `env:NAME`, `file:PATH`) and the secret store behind them.

Owns: reading and writing secrets in the OS keyring (service `agentcard-broker`, one entry per
route and secret) or, when the config says `secret_store: file`, a 0600 JSON file in the state
dir, and the account name a route's client secret is kept under.
Must never: fall back silently from the keyring to a file, put a secret value into an
exception or log event, or read a secret file that others can read.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from broker.config import SecretRef
from broker.files import replace_json

SERVICE = "agentcard-broker"


class SecretStoreError(Exception):
    """The store could not be used. The text is the store's own reason, never a secret."""


class SecretStore(Protocol):
    @property
    def description(self) -> str: ...
    @property
    def brief(self) -> str: ...  # the description without touching the store (at start-up)

    def get(self, account: str) -> str | None: ...
    def set(self, account: str, value: str) -> None: ...
    def delete(self, account: str) -> bool: ...


class KeyringStore:
    """The OS keyring through the `keyring` package (Secret Service, macOS Keychain, ...)."""

    def __init__(self, service: str = SERVICE) -> None:
        self.service = service
        self._backend_name: str | None = None

    @property
    def brief(self) -> str:
        """ "keyring", with its backend once something has used it: finding the backend imports
        and probes every candidate (D-Bus included), 66-164 ms measured, too slow for start-up."""
        return "keyring" if self._backend_name is None else f"keyring ({self._backend_name})"

    @property
    def description(self) -> str:
        if self._backend_name is None:
            try:
                import keyring

                kr = keyring.get_keyring()
                self._backend_name = f"{type(kr).__module__}.{type(kr).__name__}"
            except Exception as exc:  # noqa: BLE001 - any backend failure is a reason to show
                return f"keyring (unavailable: {type(exc).__name__})"
        return f"keyring ({self._backend_name})"

    def _fail(self, action: str, exc: Exception, value: str | None = None) -> SecretStoreError:
        text = str(exc) or type(exc).__name__
        if value:
            text = text.replace(value, "[REDACTED]")
        return SecretStoreError(f"the OS keyring could not {action}: {text}")

    def get(self, account: str) -> str | None:
        import keyring

        try:
            return keyring.get_password(self.service, account)
        except Exception as exc:  # noqa: BLE001 - keyring backends raise many kinds
            raise self._fail("be read", exc) from None

    def set(self, account: str, value: str) -> None:
        import keyring

        try:
            keyring.set_password(self.service, account, value)
        except Exception as exc:  # noqa: BLE001
            raise self._fail("store the secret", exc, value) from None

    def delete(self, account: str) -> bool:
        import keyring
        from keyring.errors import PasswordDeleteError

        try:
            keyring.delete_password(self.service, account)
        except PasswordDeleteError:
            return False
        except Exception as exc:  # noqa: BLE001
            raise self._fail("delete the secret", exc) from None
        return True


class FileStore:
    """A 0600 JSON file, for machines without a keyring. Chosen only by `secret_store: file`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = self.brief = f"file ({path})"

    def _read(self) -> dict[str, str]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        if st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise SecretStoreError(
                f"{self.path} must be owned by this user and mode 0600; run: chmod 600 {self.path}"
            )
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SecretStoreError(f"{self.path} cannot be read: {type(exc).__name__}") from None
        if not isinstance(data, dict):
            raise SecretStoreError(f"{self.path} is not a JSON object")
        return {str(k): str(v) for k, v in data.items()}

    def _write(self, data: dict[str, str]) -> None:
        replace_json(self.path, data)  # 0600, whole or not at all

    def get(self, account: str) -> str | None:
        return self._read().get(account)

    def set(self, account: str, value: str) -> None:
        data = self._read()
        data[account] = value
        self._write(data)

    def delete(self, account: str) -> bool:
        data = self._read()
        if account not in data:
            return False
        del data[account]
        self._write(data)
        return True


def client_secret_account(route: str) -> str:
    """The store account of a `client_credentials` or confidential `oauth` route's client secret:
    written by `set-key`, read by the credential and by `login`."""
    return f"{route}:client_secret"


def open_store(kind: str, state_dir: Path) -> SecretStore:
    if kind == "file":
        return FileStore(state_dir / "secrets.json")
    return KeyringStore()


@dataclass(frozen=True, slots=True)
class Lookup:
    """The outcome of resolving one secret reference: a value, or a reason there is none."""

    value: str | None
    reason: str = ""


def resolve(ref: SecretRef, account: str, store: SecretStore) -> Lookup:
    """Read the secret `ref` points at. Never raises; the reason is safe to show."""
    if ref.kind == "env":
        value = os.environ.get(ref.name)
        if not value:
            return Lookup(None, f"environment variable {ref.name} is not set")
        return Lookup(value.strip())
    if ref.kind == "file":
        return _read_secret_file(Path(ref.name))
    try:
        value = store.get(account)
    except SecretStoreError as exc:
        return Lookup(None, str(exc))
    if not value:
        return Lookup(None, f"nothing stored for route {account!r} in {store.description}")
    return Lookup(value.strip())


def _read_secret_file(path: Path) -> Lookup:
    try:
        # O_NONBLOCK: a FIFO must not hang the daemon; O_NOFOLLOW: no symlink games
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return Lookup(None, f"secret file {path} does not exist")
    except OSError as exc:
        return Lookup(None, f"secret file {path} cannot be opened: {exc.strerror}")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Lookup(None, f"secret file {path} is not a regular file")
        if st.st_mode & 0o077:
            return Lookup(None, f"secret file {path} must be mode 0600; run: chmod 600 {path}")
        if st.st_uid != os.getuid():
            return Lookup(None, f"secret file {path} is not owned by this user")
        raw = os.read(fd, 64 * 1024)
    except OSError as exc:
        return Lookup(None, f"secret file {path} cannot be read: {exc.strerror}")
    finally:
        os.close(fd)
    value = raw.decode("utf-8", errors="replace").strip()
    if not value:
        return Lookup(None, f"secret file {path} is empty")
    return Lookup(value)
