"""Fixtures shared by the config tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    return tmp_path / "config.yaml"
