"""Unix-socket listener paths: never replace what is not a stale socket of ours."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from broker.daemon import ListenError, _prepare_unix_path


def test_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious")
    link = tmp_path / "broker.sock"
    link.symlink_to(target)
    with pytest.raises(ListenError, match="symlink"):
        _prepare_unix_path(link)
    assert link.is_symlink() and target.read_text() == "precious"


def test_regular_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    path.write_text("precious")
    with pytest.raises(ListenError, match="not a socket"):
        _prepare_unix_path(path)
    assert path.read_text() == "precious"


def test_stale_socket_is_replaced_and_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "broker.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a crashed broker leaves behind
    _prepare_unix_path(path)
    assert not path.exists()
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        with pytest.raises(ListenError, match="in use"):
            _prepare_unix_path(path)
        assert path.is_socket()
    finally:
        live.close()


def test_missing_parent_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "broker.sock"
    _prepare_unix_path(path)
    assert path.parent.is_dir() and (path.parent.stat().st_mode & 0o077) == 0
