"""Policy files in, a checked ``Policy`` out; or a ``PolicyError`` listing every problem found.

A policy is one YAML file, or a folder of ``*.yaml``/``*.yml`` files read in file-name order with
their rules concatenated in that order (``10-payments.yaml`` before ``20-deploys.yaml``). A file
holds ``rules`` (a list), ``default``, or both.

Exactly one file must define ``default``. A policy without one is a problem, not a silent
built-in answer: every event must get an answer someone wrote down (``default: {decide: route,
route: ...}`` is the usual one).

Everything is checked at load, strictly, and each problem points at a file and a line:
unknown keys, rule names (non-empty, unique, not ``default``), decisions, ``route`` (present with
``decide: route`` and only then; validated by ``policies.model.Route``), durations (``30m``,
``2h``, ``1d``, ``1h30m``: ``30 minutes``, ``3w`` or a bare number are refused), and conditions
(CEL syntax, and the probe checks described in ``policies.conditions``). Each condition is
compiled once, here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from policies.anomaly import DEFAULT_HALF_LIFE, DEFAULT_MIN_SAMPLES, BaselineSpec
from policies.conditions import Condition, check_condition, compile_condition
from policies.errors import PolicyError, Problem
from policies.gateway import DEFAULT_RULE, DefaultDecision, Policy, Rule
from policies.model import DecisionKind, Route

_TOP_KEYS = ("rules", "default", "baselines")
_BASELINE_KEYS = ("source", "kind", "key", "value", "half_life", "min_samples")
_RULE_KEYS = ("name", "when", "decide", "route", "shadow", "description")
_DEFAULT_KEYS = ("decide", "route")
_SUFFIXES = (".yaml", ".yml")
_DURATION_HINT = "use e.g. 45s, 30m, 2h, 1d, 1h30m"
_YAML_TAG_PREFIX = "tag:yaml.org,2002:"
# `<<` keys: not a value of their own (and not a key a policy knows: reported as unknown).
_MERGE_TAG = _YAML_TAG_PREFIX + "merge"


def load_policy(path: str | Path) -> Policy:
    """The policy in a YAML file or a folder of them. Raises PolicyError with every problem."""
    root = Path(path)
    if root.is_dir():
        files = sorted(
            (p for p in root.iterdir() if p.is_file() and p.suffix in _SUFFIXES),
            key=lambda p: p.name,
        )
        if not files:
            raise PolicyError([Problem(str(root), 0, "no *.yaml or *.yml policy files here")])
    elif root.is_file():
        files = [root]
    else:
        raise PolicyError([Problem(str(root), 0, "no such policy file or folder")])
    reader = _Reader()
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reader.problems.append(Problem(str(file), 0, f"cannot read: {exc}"))
            reader.unreadable = True
            continue
        reader.read(text, str(file))
    return reader.finish()


def parse_policy(text: str, *, file: str = "<policy>") -> Policy:
    """The policy in one YAML document (tests, API uploads). Raises PolicyError."""
    reader = _Reader()
    reader.read(text, file)
    return reader.finish()


@dataclass(frozen=True, slots=True)
class _Entry:
    """A mapping key with its value node and the 1-based line of the key."""

    key: str
    node: Node
    line: int


@dataclass
class _Reader:
    problems: list[Problem] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    default: DefaultDecision | None = None
    baselines: list[BaselineSpec] = field(default_factory=list)
    # Where each rule name (and the default) was first defined, for duplicate messages.
    seen: dict[str, str] = field(default_factory=dict)
    file: str = ""
    unreadable: bool = False

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, message))

    def finish(self) -> Policy:
        # A `default` that is present but wrong was already reported: do not also call it missing.
        # Nor when a file could not be parsed: its `default` may be in the part that failed.
        if DEFAULT_RULE not in self.seen and self.files and not self.unreadable:
            self.problems.append(
                Problem(
                    self.files[0],
                    1,
                    "the policy has no `default`: every event needs an answer when no rule"
                    " matches (e.g. `default: {decide: route, route: {...}}`)",
                )
            )
        if self.problems:
            order = {file: index for index, file in enumerate(self.files)}
            raise PolicyError(sorted(self.problems, key=lambda p: (order.get(p.file, -1), p.line)))
        assert self.default is not None
        return Policy(
            rules=tuple(self.rules),
            default=self.default,
            files=tuple(self.files),
            baselines=tuple(self.baselines),
        )

    # -- one file ------------------------------------------------------------------------------

    def read(self, text: str, file: str) -> None:
        self.file = file
        self.files.append(file)
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            self.unreadable = True
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 0
            message = f"YAML syntax error: {exc.problem or exc.context}"
            if exc.problem and exc.context and exc.context_mark is not None:
                message += f" ({exc.context} at line {exc.context_mark.line + 1})"
            self.problem(line, message)
            return
        except yaml.YAMLError as exc:
            self.unreadable = True
            self.problem(0, f"YAML error: {exc}")
            return
        except RecursionError:
            # PyYAML composes recursively: a few hundred nested `[` exhaust Python's stack.
            self.unreadable = True
            self.problem(0, "YAML nested too deeply")
            return
        if root is None:
            return  # An empty file: nothing to add.
        if not self.check_nodes(root):
            self.unreadable = True
            return
        if not isinstance(root, MappingNode):
            self.problem(_line(root), "a policy file is a mapping with `rules` and `default`")
            return
        for entry in self.entries(root, _TOP_KEYS, "at the top level"):
            if entry.key == "rules":
                self.read_rules(entry)
            elif entry.key == "baselines":
                self.read_baselines(entry)
            else:
                self.read_default(entry)

    def check_nodes(self, root: Node) -> bool:
        """Duplicate keys, and scalars that cannot be read as their tag says (`!!int abc`,
        `!!python/object`); False if any scalar could not be read.

        Each node is visited once: an alias is the same node object as its anchor, so a
        "billion laughs" document (anchors of anchors) costs its size, not its expansion.
        """
        readable = True
        visited: set[int] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            if isinstance(node, MappingNode):
                # PyYAML keeps the last of two equal keys without a word; a policy must not.
                seen: set[str] = set()
                for key, value in node.value:
                    if isinstance(key, ScalarNode):
                        if key.value in seen:
                            self.problem(_line(key), f"duplicate key {key.value!r}")
                        seen.add(key.value)
                    stack.extend((key, value))
            elif isinstance(node, SequenceNode):
                stack.extend(node.value)
            elif isinstance(node, ScalarNode) and node.tag != _MERGE_TAG:
                try:
                    SafeConstructor().construct_document(node)
                except (yaml.YAMLError, ValueError, TypeError, IndexError, OverflowError) as exc:
                    # SafeConstructor's own errors, int()/date() refusing a tagged value, and an
                    # empty `!!int` (PyYAML indexes its first character).
                    why = getattr(exc, "problem", None) or str(exc)
                    tag = node.tag.replace(_YAML_TAG_PREFIX, "!!")
                    self.problem(_line(node), f"cannot read a {tag} value: {_first(why)}")
                    readable = False
        return readable

    def entries(self, node: MappingNode, allowed: tuple[str, ...], where: str) -> Iterator[_Entry]:
        """The mapping's known keys; unknown ones are reported."""
        for key, value in node.value:
            name = key.value if isinstance(key, ScalarNode) else None
            if name not in allowed:
                shown = name if name is not None else "(not a plain key)"
                self.problem(
                    _line(key),
                    f"unknown key {shown!r} {where} (allowed: {', '.join(allowed)})",
                )
                continue
            assert name is not None
            yield _Entry(name, value, _line(key))

    # -- rules ---------------------------------------------------------------------------------

    def read_rules(self, entry: _Entry) -> None:
        if not isinstance(entry.node, SequenceNode):
            self.problem(entry.line, "`rules` must be a list of rules")
            return
        for index, node in enumerate(entry.node.value, start=1):
            if not isinstance(node, MappingNode):
                self.problem(
                    _line(node), f"rule #{index} must be a mapping with name, when, decide"
                )
                continue
            self.read_rule(node, index)

    def read_rule(self, node: MappingNode, index: int) -> None:
        values = {e.key: e for e in self.entries(node, _RULE_KEYS, "in a rule")}
        count = len(self.problems)
        name = self.read_rule_name(values.get("name"), node, index)
        label = f"rule {name!r}" if name else f"rule #{index}"
        decide = self.read_decide(values.get("decide"), _line(node), label)
        route = self.read_route(values.get("route"), decide, _line(node), label)
        shadow = self.read_bool(values.get("shadow"), label)
        description = self.read_text(values.get("description"), label)
        condition = None
        when = values.get("when")
        if when is None:
            self.problem(_line(node), f"{label}: missing `when` (a CEL condition)")
        else:
            source = _scalar(when.node)
            if isinstance(source, bool):
                source = "true" if source else "false"
            if not isinstance(source, str) or not source.strip():
                self.problem(when.line, f"{label}: `when` must be a CEL condition (a string)")
            else:
                compiled = compile_condition(source)
                if isinstance(compiled, str):
                    self.problem(when.line, f"{label}: {compiled}")
                else:
                    for message in check_condition(compiled):
                        self.problem(when.line, f"{label}: {message}")
                    condition = compiled
        if len(self.problems) > count or condition is None or decide is None or not name:
            return
        self.rules.append(
            Rule(
                name=name,
                condition=condition,
                decide=decide,
                route=route,
                shadow=shadow,
                description=description,
                file=self.file,
                line=_line(node),
            )
        )

    def read_rule_name(self, entry: _Entry | None, node: MappingNode, index: int) -> str:
        if entry is None:
            self.problem(_line(node), f"rule #{index}: missing `name`")
            return ""
        name = _scalar(entry.node)
        if not isinstance(name, str) or not name.strip():
            self.problem(entry.line, f"rule #{index}: `name` must be a non-empty string")
            return ""
        name = name.strip()
        where = f"{self.file}:{entry.line}"
        if name == DEFAULT_RULE:
            self.problem(entry.line, f"rule name {name!r} is reserved for the policy's default")
        elif name in self.seen:
            self.problem(
                entry.line, f"duplicate rule name {name!r} (first defined at {self.seen[name]})"
            )
        else:
            self.seen[name] = where
        return name

    def read_decide(self, entry: _Entry | None, line: int, label: str) -> DecisionKind | None:
        if entry is None:
            self.problem(line, f"{label}: missing `decide`")
            return None
        value = _scalar(entry.node)
        try:
            return DecisionKind(str(value) if isinstance(value, str) else "")
        except ValueError:
            kinds = ", ".join(kind.value for kind in DecisionKind)
            self.problem(entry.line, f"{label}: unknown decision {value!r} (use one of: {kinds})")
            return None

    def read_bool(self, entry: _Entry | None, label: str) -> bool:
        if entry is None:
            return False
        value = _scalar(entry.node)
        if not isinstance(value, bool):
            self.problem(entry.line, f"{label}: `{entry.key}` must be true or false")
            return False
        return value

    def read_text(self, entry: _Entry | None, label: str) -> str:
        if entry is None:
            return ""
        value = _scalar(entry.node)
        if not isinstance(value, str):
            self.problem(entry.line, f"{label}: `{entry.key}` must be a string")
            return ""
        return value

    # -- anomaly baselines ---------------------------------------------------------------------

    def read_baselines(self, entry: _Entry) -> None:
        if not isinstance(entry.node, SequenceNode):
            self.problem(entry.line, "`baselines` must be a list")
            return
        for index, node in enumerate(entry.node.value, start=1):
            label = f"baseline #{index}"
            if not isinstance(node, MappingNode):
                self.problem(
                    _line(node), f"{label} must be a mapping with source, kind, key, value"
                )
                continue
            values = {e.key: e for e in self.entries(node, _BASELINE_KEYS, "in a baseline")}
            count = len(self.problems)
            source = self.read_required_text(values.get("source"), _line(node), label, "source")
            kind = self.read_required_text(values.get("kind"), _line(node), label, "kind")
            key = self.read_expression(values.get("key"), _line(node), label, "key")
            value = self.read_expression(values.get("value"), _line(node), label, "value")
            half_life = self.read_int(values.get("half_life"), label, DEFAULT_HALF_LIFE, 1)
            min_samples = self.read_int(values.get("min_samples"), label, DEFAULT_MIN_SAMPLES, 2)
            if len(self.problems) > count or key is None or value is None:
                continue
            if any(b.source == source and b.kind == kind for b in self.baselines):
                self.problem(
                    _line(node), f"{label}: a baseline for {source}/{kind} is already defined"
                )
                continue
            self.baselines.append(
                BaselineSpec(
                    source=source,
                    kind=kind,
                    key=key,
                    value=value,
                    half_life=half_life,
                    min_samples=min_samples,
                )
            )

    def read_required_text(self, entry: _Entry | None, line: int, label: str, name: str) -> str:
        if entry is None:
            self.problem(line, f"{label}: missing `{name}`")
            return ""
        value = _scalar(entry.node)
        if not isinstance(value, str) or not value.strip():
            self.problem(entry.line, f"{label}: `{name}` must be a non-empty string")
            return ""
        return value.strip()

    def read_expression(
        self, entry: _Entry | None, line: int, label: str, name: str
    ) -> Condition | None:
        if entry is None:
            self.problem(line, f"{label}: missing `{name}` (a CEL expression)")
            return None
        source = _scalar(entry.node)
        if not isinstance(source, str) or not source.strip():
            self.problem(entry.line, f"{label}: `{entry.key}` must be a CEL expression")
            return None
        compiled = compile_condition(source, key=entry.key)
        if isinstance(compiled, str):
            self.problem(entry.line, f"{label}: {compiled}")
            return None
        problems = check_condition(compiled, key=entry.key, boolean=False)
        for message in problems:
            self.problem(entry.line, f"{label}: {message}")
        return None if problems else compiled

    def read_int(self, entry: _Entry | None, label: str, default: int, least: int) -> int:
        if entry is None:
            return default
        value = _scalar(entry.node)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            self.problem(entry.line, f"{label}: `{entry.key}` must be a whole number ≥ {least}")
            return default
        return value

    # -- default and routes --------------------------------------------------------------------

    def read_default(self, entry: _Entry) -> None:
        where = f"{self.file}:{entry.line}"
        if DEFAULT_RULE in self.seen:
            self.problem(
                entry.line,
                f"`default` is already defined at {self.seen[DEFAULT_RULE]};"
                " a policy has exactly one",
            )
            return
        self.seen[DEFAULT_RULE] = where
        if not isinstance(entry.node, MappingNode):
            self.problem(entry.line, "`default` must be a mapping with `decide` (and `route`)")
            return
        values = {e.key: e for e in self.entries(entry.node, _DEFAULT_KEYS, "in `default`")}
        count = len(self.problems)
        decide = self.read_decide(values.get("decide"), entry.line, "`default`")
        route = self.read_route(values.get("route"), decide, entry.line, "`default`")
        if len(self.problems) == count and decide is not None:
            self.default = DefaultDecision(
                decide=decide, route=route, file=self.file, line=entry.line
            )

    def read_route(
        self, entry: _Entry | None, decide: DecisionKind | None, line: int, label: str
    ) -> Route | None:
        if entry is None:
            if decide is DecisionKind.route:
                self.problem(line, f"{label}: `decide: route` needs a `route`")
            return None
        if decide is not None and decide is not DecisionKind.route:
            self.problem(
                entry.line, f"{label}: `route` is only allowed with `decide: route`, not {decide}"
            )
            return None
        data = SafeConstructor().construct_document(entry.node)
        count = len(self.problems)
        self.check_durations(data, entry, label)
        try:
            route = Route.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors():
                self.problem(
                    _line_at(entry.node, error["loc"], entry.line),
                    f"{label}: {_route_message(error)}",
                )
            return None
        return route if len(self.problems) == count else None

    def check_durations(self, data: Any, entry: _Entry, label: str) -> None:
        """Durations must be written with a unit: a bare `30` would silently mean 30 seconds."""
        if not isinstance(data, dict):
            return
        found: list[tuple[tuple[str | int, ...], object]] = [
            (("sla",), data.get("sla")),
            (("expires_after",), data.get("expires_after")),
            (("warn_before",), data.get("warn_before")),
        ]
        escalate = data.get("escalate")
        if isinstance(escalate, list):
            found += [
                (("escalate", i, "after"), level.get("after"))
                for i, level in enumerate(escalate)
                if isinstance(level, dict)
            ]
        for loc, value in found:
            if value is not None and not isinstance(value, str):
                self.problem(
                    _line_at(entry.node, loc, entry.line),
                    f"{label}: {_path(loc)}: unknown duration {value!r} ({_DURATION_HINT})",
                )


def _first(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _scalar(node: Node) -> object:
    """The value of a scalar node (typed as YAML says); a list or mapping gives None."""
    if not isinstance(node, ScalarNode):
        return None
    return SafeConstructor().construct_document(node)


def _line_at(node: Node, loc: tuple[str | int, ...], start: int) -> int:
    """The line of the key a pydantic error location points at, as deep as it can be followed."""
    line = start
    for part in loc:
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if isinstance(key, ScalarNode) and key.value == part:
                    line, node = _line(key), value
                    break
            else:
                return line
        elif isinstance(node, SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = _line(node)
        else:
            return line
    return line


def _path(loc: tuple[str | int, ...]) -> str:
    return "route" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


def _route_message(error: ErrorDetails) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden" and loc:
        return f"unknown key {loc[-1]!r} in {_path(loc[:-1])}"
    if error["type"] == "missing" and loc:
        return f"missing key {loc[-1]!r} in {_path(loc[:-1])}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{_path(loc)}: {message}"
