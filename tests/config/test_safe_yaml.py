"""broker/config/safe_yaml.py: YAML read without running it, every problem at its line, no content quoted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.documents import VALID, assert_not_echoed, issues_at, load_error, write_text
from tests.conftest import TEST_KEY

# ---------------------------------------------------------------- YAML safety


def test_python_object_tag_refused_without_executing(cfg_path: Path, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    text = (
        f'listen: !!python/object/apply:os.system ["touch {marker}"]\n'
        'x: !!python/object/apply:os.system ["echo hi"]\n'
        "y: !!python/name:os.system\n" + VALID[VALID.index("routes:") :]
    )
    err = load_error(write_text(cfg_path, text))
    assert not marker.exists()
    (issue,) = issues_at(err, "listen")
    assert issue.line == 1
    assert "tag" in issue.message
    assert "not allowed" in issue.message
    assert issues_at(err, "x")[0].line == 2
    assert issues_at(err, "y")[0].line == 3


@pytest.mark.parametrize("value", ["!!set {a, b}", "!!binary aGVsbG8=", "!!omap [a: 1]", "2020-01-01"])
def test_other_non_plain_tags_refused(cfg_path: Path, value: str) -> None:
    err = load_error(write_text(cfg_path, f"allowed_hosts: {value}\n" + VALID))
    assert "tag" in issues_at(err, "allowed_hosts")[0].message


def test_anchors_and_aliases_refused(cfg_path: Path) -> None:
    text = VALID.replace("    auth:\n      type: oauth\n", "    auth: &shared\n      type: oauth\n")
    text += "  - name: other\n    prefix: /other\n    upstream: https://a.example\n    auth: *shared\n"
    err = load_error(write_text(cfg_path, text))
    (issue,) = issues_at(err, "routes[2].auth")
    assert "anchors and aliases" in issue.message
    assert [i.place for i in err.issues] == ["routes[2].auth"]


def test_alias_issue_points_at_the_alias_line(cfg_path: Path) -> None:
    text = VALID.replace("    auth:\n      type: oauth\n", "    auth: &shared\n      type: oauth\n")
    text += "  - name: other\n    prefix: /other\n    upstream: https://a.example\n    auth: *shared\n"
    err = load_error(write_text(cfg_path, text))
    assert issues_at(err, "routes[2].auth")[0].line == 18


def test_alias_bomb_is_refused_quickly(cfg_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 20)]
    err = load_error(write_text(cfg_path, "\n".join(lines) + "\n" + VALID))
    assert any("anchors and aliases" in i.message for i in err.issues)


@pytest.mark.parametrize(
    ("broken", "line"),
    [
        (f"bad: {TEST_KEY}: oops\n", 16),
        (f'bad: "{TEST_KEY}\\q"\n', 16),
        (f"bad:\n\t- {TEST_KEY}\n", 17),
        (f"bad: [{TEST_KEY}\nmore: 1\n", 17),
    ],
)
def test_invalid_yaml_has_line_and_no_content(cfg_path: Path, broken: str, line: int) -> None:
    text = "# comment\n" + VALID + broken
    err = load_error(write_text(cfg_path, text))
    (issue,) = err.issues
    assert issue.message.startswith("not valid YAML")
    assert issue.line == line
    assert err.lines()[0].startswith(f"{cfg_path}:{line}: not valid YAML")
    assert_not_echoed(err, TEST_KEY, TEST_KEY[len("sk_test_") :])


def test_duplicate_yaml_keys(cfg_path: Path) -> None:
    text = "log: {level: info}\nlog: {level: debug}\n" + VALID + "      key: env:OTHER\n"
    err = load_error(write_text(cfg_path, text))
    (top,) = issues_at(err, "log")
    assert top.message == "duplicate key"
    assert top.line == 2
    (nested,) = issues_at(err, "routes[1].auth.key")
    assert nested.message == "duplicate key"
    assert nested.line == 17


def test_non_string_keys_refused(cfg_path: Path) -> None:
    err = load_error(write_text(cfg_path, "1: one\n" + VALID))
    assert any("plain strings" in i.message and i.line == 1 for i in err.issues)
