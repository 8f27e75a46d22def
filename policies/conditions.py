"""CEL conditions: compiled once at load, checked against a probe event, explained when they match.

The CEL library (``common-expression-language``) parses but has no static type checker, so
"type errors" are found by running each condition once against a *probe*: a synthetic Event
with every field set to a value of its type and ``attributes``/``context`` empty. A condition is
reported when, on the probe:

- it names a field the event does not have (``event.nope``, ``event.actor.nmae``): found by
  reading the ``event.<path>`` references in the source, so it is reported even when the probe
  never reaches that part of the expression;
- the engine raises a TypeError (``event.kind + 1``, ``event.risk > 2``, ``event.kind.x``);
- it names a variable or function that does not exist (``evnt.kind``, ``sise(x)``);
- it gives something other than a bool (``when: event.kind``).

Limits, because a probe is one concrete event and not a type checker:

- ``attributes`` and ``context`` are free-form per source, so a reference into them cannot be
  checked, and a missing key stops the probe there (KeyError is not reported): in
  ``event.attributes.amount + "x" > 1`` the type error is only found at runtime.
- ``&&``, ``||`` and ``?:`` short-circuit on the probe's values, so an operand the probe never
  evaluates is not checked (``event.kind == "refund" && event.kind + 1 > 0``: the probe's kind is
  not "refund", so the right side never runs).
- Errors that depend on the data (division by zero, overflow, a bad ``timestamp()`` string, an
  index out of range) are runtime errors, not load errors.

Whatever gets past the probe is caught at runtime: the rule does not match, its trace step says
why, and the gateway fails closed (see ``policies.gateway``).

Cost. CEL has no loops, but its comprehension macros (``all``, ``exists``, ``exists_one``,
``map``, ``filter``) nest, and the engine has no cost limit, no timeout, and runs on the event
loop's thread: three nested ``map`` over a 100-element list literal took 9 s here, and two nested
comprehensions over an event's list (``event.attributes.ids.all(a, event.attributes.ids.exists(b,
a == b))``) cost the square of what a sender puts in a body. So a condition is refused at load
(before the probe runs it) when a comprehension nests inside another one over anything but a
part of the outer element (``event.attributes.items.all(i, i.tags.exists(t, t == "x"))`` is
fine: its cost is the size of the data), or when ``in`` searches an event list inside a
comprehension. What is left costs at most the event's size times the expression's size, both
bounded (``SIGNOFF_MAX_BODY_BYTES``, ``MAX_CONDITION_LENGTH``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cel

from connectors.events import Actor, Anomaly, Event, Risk

# What the engine raises while evaluating: TypeError (no such overload), KeyError (missing map
# key), IndexError, ArithmeticError (division by zero, overflow), RuntimeError (undefined name,
# a function refusing its argument) and ValueError (a value it cannot convert).
EVALUATION_ERRORS: tuple[type[Exception], ...] = (
    TypeError,
    KeyError,
    IndexError,
    ArithmeticError,
    RuntimeError,
    ValueError,
)

# String literals are blanked before references are read, so `"event.nope"` is not a reference.
_STRING_LITERAL = re.compile(
    r"""[rRbB]{0,2}(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')"""
)
# `event.a.b`, not preceded by a word or a dot (`x.event.a` is something else); the last segment
# must not be a method call (`event.actor.email.endsWith(...)` refers to `event.actor.email`).
_EVENT_PATH = re.compile(r"(?<![\w.])event((?:\s*\.\s*[A-Za-z_]\w*)+)(?!\w)(?!\s*\()")
_CEL_ERROR = re.compile(r"<input>:(\d+):(\d+): (.*)")
_UNDEFINED = "Undefined variable or function"
_VALUE_WIDTH = 60
_ERROR_WIDTH = 200

# Maps whose keys vary per source: a reference into them cannot be checked at load.
_DYNAMIC_MAPS = frozenset({"attributes", "context"})


# Longer conditions are refused: no real policy needs one, and the engine's compile time grows
# faster than linearly with the source (a 9 MB expression took 40 s).
MAX_CONDITION_LENGTH = 4000
_MACRO_CALL = re.compile(r"\.\s*(all|exists_one|exists|map|filter)\s*\(\s*([A-Za-z_]\w*)\s*,")
# The start of the operand a macro is called on: `event.attributes.ids`, `x.tags`, `[1, 2]`...
_OPERAND_ROOT = re.compile(r"([A-Za-z_]\w*)[\w.\s]*$")
_IN_EVENT = re.compile(r"(?<![\w.])in\s+event\b")


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled `when`. ``paths`` are the ``event.<path>`` references, for explanations."""

    source: str
    program: cel.Program
    paths: tuple[tuple[str, ...], ...]
    # The source on one line, for traces.
    text: str


def compile_condition(source: str, *, key: str = "when") -> Condition | str:
    """The compiled condition, or a message saying where its syntax or its cost is wrong."""
    if len(source) > MAX_CONDITION_LENGTH:
        return f"`{key}` is {len(source)} characters long, the limit is {MAX_CONDITION_LENGTH}"
    costly = _unbounded_comprehension(source, key)
    if costly is not None:
        return costly
    try:
        program = cel.compile(source)
    except ValueError as exc:
        return _syntax_message(str(exc), key)
    paths: dict[tuple[str, ...], None] = {}
    for match in _EVENT_PATH.finditer(_STRING_LITERAL.sub('""', source)):
        parts = tuple(part.strip() for part in match.group(1).split(".")[1:])
        paths.setdefault(parts, None)
    return Condition(
        source=source, program=program, paths=tuple(paths), text=" ".join(source.split())
    )


def _blank_strings(source: str) -> str:
    """The source with each string literal's content blanked, positions kept."""
    return _STRING_LITERAL.sub(lambda m: '"' + " " * (len(m.group(0)) - 2) + '"', source)


def _unbounded_comprehension(source: str, key: str) -> str | None:
    """Why the condition's cost is not bounded by the event's size (module docstring), or None."""
    text = _blank_strings(source)
    # (start of the arguments, end of the arguments, iteration variable) per macro call.
    spans: list[tuple[int, int, str]] = []
    for match in _MACRO_CALL.finditer(text):
        end = _closing(text, match.start() + match.group(0).index("("))
        enclosing = [span for span in spans if span[0] < match.start() < span[1]]
        if enclosing:
            root = _OPERAND_ROOT.search(text[: match.start()])
            variables = {span[2] for span in enclosing}
            if root is None or root.group(1) not in variables:
                operand = text[: match.start()].rsplit(None, 1)[-1][-40:] if root else "a list"
                return (
                    f"`{key}` nests `{match.group(1)}` over {operand} inside another"
                    " comprehension: the cost is the product of both sizes, which an event can"
                    " make unbounded (only a part of the outer element may be iterated, e.g."
                    " `items.all(i, i.tags.exists(t, ...))`)"
                )
        spans.append((match.end(), end, match.group(2)))
    for start, end, _ in spans:
        if _IN_EVENT.search(text, start, end):
            return (
                f"`{key}` searches an event list with `in` inside a comprehension: the cost is"
                " the product of both sizes, which an event can make unbounded"
            )
    return None


def _closing(text: str, opening: int) -> int:
    """The index of the parenthesis closing the one at `opening` (the end if unbalanced)."""
    depth = 0
    for index in range(opening, len(text)):
        if text[index] == "(":
            depth += 1
        elif text[index] == ")":
            depth -= 1
            if depth == 0:
                return index
    return len(text)


def _syntax_message(raw: str, key: str) -> str:
    found = _CEL_ERROR.search(raw)
    if found is None:
        return f"CEL syntax error: {_first_line(raw)}"
    line, column, message = found.groups()
    # The engine appends a caret drawing on the following lines; the first line says it all.
    return f"CEL syntax error at line {line}, column {column} of `{key}`: {message.strip()}"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"


def _probe_event() -> Event:
    return Event(
        source="probe",
        kind="probe",
        subject="probe/1",
        version="1",
        title="probe",
        summary="probe",
        actor=Actor(id="probe", name="probe", email="probe@example.com", team="probe"),
        risk=Risk.medium,
        attributes={},
        context=[],
        anomaly=Anomaly(score=0.0, baseline=0.0, samples=0, detail="probe"),
        occurred_at=datetime(2000, 1, 1, tzinfo=UTC),
        delivery_id="probe",
    )


_PROBE = _probe_event().to_cel()
_PROBE_CONTEXT = cel.Context({"event": _PROBE})


def _known_fields(path: tuple[str, ...]) -> str | None:
    """The name of the first unknown field in ``event.<path>``, or None if it may exist."""
    value: Any = _PROBE
    walked = ["event"]
    for part in path:
        if not isinstance(value, dict):
            # Selecting a field of a string or number is the engine's TypeError, reported as such.
            return None
        if part not in value:
            return ".".join([*walked, part])
        if len(walked) == 1 and part in _DYNAMIC_MAPS:
            return None
        value = value[part]
        walked.append(part)
    return None


def check_condition(condition: Condition, *, key: str = "when", boolean: bool = True) -> list[str]:
    """Type problems of a compiled expression, found as the module docstring says. `key` names
    it in messages; `boolean=False` accepts any result (a baseline's key or value)."""
    problems = []
    for path in condition.paths:
        unknown = _known_fields(path)
        if unknown is not None:
            problems.append(f"type error in `{key}`: unknown field {unknown}")
    if problems:
        return problems
    try:
        result = condition.program.execute(_PROBE_CONTEXT)
    except TypeError as exc:
        return [f"type error in `{key}`: {_first_sentence(str(exc))}"]
    except RuntimeError as exc:
        if _UNDEFINED in str(exc):
            return [f"unknown name in `{key}`: {_first_sentence(str(exc))}"]
        return []
    except EVALUATION_ERRORS:
        # A missing attribute/context key, or an error that depends on the data: see docstring.
        return []
    if boolean and not isinstance(result, bool):
        return [f"type error in `{key}`: the condition gives {_cel_type(result)}, not a bool"]
    return []


def _first_sentence(text: str) -> str:
    # The engine's messages go on with general advice after the first sentence.
    first = _first_line(text).split(". ", 1)[0].rstrip(".")
    return first[:_ERROR_WIDTH]


def _cel_type(value: object) -> str:
    names = {bool: "a bool", int: "an int", float: "a double", str: "a string", bytes: "bytes"}
    if value is None:
        return "null"
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


def describe_error(condition: Condition, exc: Exception) -> str:
    """Why evaluating a condition failed, in a few words, for the trace."""
    if isinstance(exc, KeyError) and exc.args:
        key = str(exc.args[0])
        for path in condition.paths:
            if path and path[-1] == key:
                return f"{'.'.join(('event', *path))} is missing"
        return f"missing key {key!r}"
    return f"{type(exc).__name__}: {_first_sentence(str(exc))}"


def describe_result(result: object) -> str:
    return f"the condition gave {_cel_type(result)}, not a bool"


def explain_match(condition: Condition, event: dict[str, Any]) -> str:
    """The condition and the values its ``event.<path>`` references had."""
    if not condition.paths:
        return condition.text
    values = ", ".join(
        f"{'.'.join(('event', *path))}={_show(_resolve(event, path))}" for path in condition.paths
    )
    return f"{condition.text} with {values}"


_MISSING = object()


def _resolve(event: dict[str, Any], path: tuple[str, ...]) -> object:
    value: object = event
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _show(value: object) -> str:
    if value is _MISSING:
        return "<missing>"
    if isinstance(value, datetime):
        text = value.isoformat()
    else:
        text = json.dumps(value, ensure_ascii=False, default=str)
    if len(text) > _VALUE_WIDTH:
        return text[: _VALUE_WIDTH - 3] + "..."
    return text
