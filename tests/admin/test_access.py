"""broker/admin/access.py: the admin key file (0600, replaced at each start) and its check."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from broker.admin import access
from broker.errors import BrokerError


def test_a_new_key_is_written_0600_and_read_back(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = access.write_new_key(state)
    path = access.key_path(state)
    assert path.stat().st_mode & 0o777 == 0o600 and state.stat().st_mode & 0o777 == 0o700
    assert access.read_key(state) == key and len(key) >= 43
    assert access.write_new_key(state) != key  # each start makes a new one
    assert not [p for p in state.iterdir() if p.name != access.FILE_NAME]  # no temp file left


def test_a_key_others_can_read_or_a_link_is_not_used(tmp_path: Path) -> None:
    state = tmp_path / "state"
    access.write_new_key(state)
    access.key_path(state).chmod(0o644)
    assert access.read_key(state) is None
    access.key_path(state).unlink()
    target = tmp_path / "elsewhere"
    target.write_text("planted")
    target.chmod(0o600)
    os.symlink(target, access.key_path(state))
    assert access.read_key(state) is None
    assert access.read_key(tmp_path / "nowhere") is None


@pytest.mark.parametrize("presented", [None, "", "x", "wrong-key-of-the-same-length-000000000000000", "é"])
def test_only_the_key_is_allowed(presented: str | None) -> None:
    key = access.AdminKey("the-admin-key-0123456789abcdefghijklmnopqrstu")
    assert not key.allows(presented)
    with pytest.raises(BrokerError) as info:
        key.require(presented, "approving")
    assert info.value.code == "admin_required" and "the-admin-key" not in info.value.message
    assert key.allows("the-admin-key-0123456789abcdefghijklmnopqrstu")
    assert "the-admin-key" not in repr(key)
