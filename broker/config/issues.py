"""A problem in a config file, named by its place and line, and the error that carries them all.

Owns: `ConfigIssue` (`routes[1].auth.key`, line 23, what is wrong) and `ConfigError`, which
collects every issue of one file and renders them as `config.yaml:23: routes[1].auth.key: ...`.
Must never: let a secret-shaped value through into its text, whatever part of an issue (place
or message) it sits in.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.scrub import redact_shapes


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    place: str
    message: str
    line: int | None = None

    def render(self, path: str) -> str:
        where = f"{path}:{self.line}" if self.line else path
        return f"{where}: {self.place}: {self.message}" if self.place else f"{where}: {self.message}"


class ConfigError(Exception):
    """Every problem found in one config file. Its text never contains a secret value."""

    def __init__(self, path: str, issues: list[ConfigIssue]) -> None:
        self.path = path
        # A value that was a pasted secret can surface in a place (a key) or a message (a
        # name, an address, YAML's own text): mask anything secret-shaped, whatever its role.
        self.issues = [ConfigIssue(redact_shapes(i.place), redact_shapes(i.message), i.line) for i in issues]
        super().__init__(self.render())

    def lines(self) -> list[str]:
        return [i.render(self.path) for i in self.issues]

    def render(self) -> str:
        return "\n".join(self.lines())
