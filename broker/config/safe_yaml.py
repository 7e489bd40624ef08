"""YAML text -> plain Python values, and the line of every place in them.

Owns: parsing with PyYAML's safe loader, accepting only plain scalars, lists and string-keyed
mappings, and naming each value by its place (`routes[1].auth.key`) with its line, so that
every later problem can point into the file. Must never: build an object from a YAML tag,
expand an anchor (an alias bomb), or quote the file's text in an issue (a line could hold a
pasted secret).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from broker.config.issues import ConfigIssue

_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:float",
}


class _Tree:
    """Plain Python values from a YAML node tree, remembering the line of every place."""

    def __init__(self, issues: list[ConfigIssue], alias_lines: list[int]) -> None:
        self.issues = issues
        self.alias_lines = alias_lines  # in document order, as the tree is walked
        self.lines: dict[str, int] = {}
        self._seen: set[int] = set()
        self._constructor = yaml.SafeLoader("")

    def build(self, node: Node, place: str) -> Any:
        self.lines[place] = node.start_mark.line + 1
        if id(node) in self._seen:
            # the composer hands an alias back as its anchor's node; the k-th repeat met while
            # walking in document order is the k-th alias in the text
            line = self.alias_lines.pop(0) if self.alias_lines else self.lines[place]
            self.lines[place] = line
            self.issues.append(ConfigIssue(place, "YAML anchors and aliases are not supported", line))
            return None
        self._seen.add(id(node))
        if isinstance(node, MappingNode):
            if node.tag != "tag:yaml.org,2002:map":
                return self._bad_tag(node, place)
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, ScalarNode) or knode.tag != "tag:yaml.org,2002:str":
                    self.issues.append(
                        ConfigIssue(place, "keys must be plain strings", knode.start_mark.line + 1)
                    )
                    continue
                key = str(knode.value)
                sub = f"{place}.{key}" if place else key
                if key in out:
                    self.issues.append(ConfigIssue(sub, "duplicate key", knode.start_mark.line + 1))
                    continue
                out[key] = self.build(vnode, sub)
            return out
        if isinstance(node, SequenceNode):
            if node.tag != "tag:yaml.org,2002:seq":
                return self._bad_tag(node, place)
            return [self.build(n, f"{place}[{i}]") for i, n in enumerate(node.value)]
        if isinstance(node, ScalarNode) and node.tag in _SCALAR_TAGS:
            return self._constructor.construct_object(node)
        return self._bad_tag(node, place)

    def _bad_tag(self, node: Node, place: str) -> None:
        self.issues.append(
            ConfigIssue(place, f"YAML tag {node.tag!r} is not allowed", node.start_mark.line + 1)
        )
        return None


def parse_yaml(text: str, issues: list[ConfigIssue]) -> tuple[Any, dict[str, int]]:
    """Parse YAML text into plain values plus a place -> line map. Problems go into `issues`."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        # Only the problem and the position: PyYAML's own text quotes the line, which could
        # hold a secret someone pasted.
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        issues.append(ConfigIssue("", f"not valid YAML: {exc.problem or exc.context}", line))
        return None, {}
    except yaml.YAMLError as exc:
        issues.append(ConfigIssue("", f"not valid YAML: {type(exc).__name__}"))
        return None, {}
    if node is None:
        return {}, {}
    alias_lines = [
        ev.start_mark.line + 1
        for ev in yaml.parse(text, Loader=yaml.SafeLoader)
        if isinstance(ev, yaml.AliasEvent) and ev.start_mark is not None
    ]
    tree = _Tree(issues, alias_lines)
    return tree.build(node, ""), tree.lines
