"""`stdio ROUTE` before it relays: the route it is asked for must exist (the relay itself runs
against a real daemon in tests/e2e/test_stdio.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker import config as config_mod
from broker.tools import ToolError, stdio
from tests.conftest import write_config

REPO = Path(__file__).resolve().parents[2]


def test_serve_names_a_route_the_config_lacks(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg = config_mod.load(write_config(tmp_path / "c.yaml", doc))
    with pytest.raises(ToolError, match=rf"^no route named 'nope' in {tmp_path}/c.yaml$"):
        stdio.serve(cfg, "nope")
