"""`signoff policy check` and `signoff policy test`, as functions the CLI wires to argparse.

Both write to ``out`` and return the process exit code: 0 when all is well, 1 otherwise.

An events file for ``test`` holds one event body (the ``POST /v1/events`` JSON), a JSON array of
them, or JSON lines (one body per line). Each becomes an ``Event`` with
``delivery_id="test:<file>:<n>"``, ``n`` counting from 1 within the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from pydantic import ValidationError

from connectors.events import Event, EventBody
from policies.errors import PolicyError
from policies.gateway import Policy
from policies.loader import load_policy


def check_command(path: str, out: TextIO) -> int:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=out)
        return 1
    print(f"ok: {len(policy.rules)} rules in {len(policy.files)} files", file=out)
    return 0


def test_command(path: str, event_files: list[str], out: TextIO) -> int:
    try:
        policy = load_policy(path)
    except PolicyError as exc:
        count = len(exc.problems)
        print(f"the policy {path} is invalid ({count} problem{'s' * (count != 1)}):", file=out)
        for problem in exc.problems:
            print(f"  {problem}", file=out)
        return 1
    events: list[tuple[str, int, Event]] = []
    errors: list[str] = []
    for file in event_files:
        read = _read_events(file)
        if isinstance(read, str):
            errors.append(f"{file}: {read}")
            continue
        for index, item in enumerate(read, start=1):
            made = _make_event(item, file, index)
            if isinstance(made, str):
                errors.append(f"{file}: event {index}: {made}")
            else:
                events.append((file, index, made))
    if errors:
        for error in errors:
            print(error, file=out)
        return 1
    if not events:
        print("no events to test", file=out)
        return 1
    for file, index, event in events:
        _print_decision(policy, file, index, event, out)
    return 0


def _read_events(file: str) -> list[Any] | str:
    """The event bodies in a file, or why it cannot be read."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot read: {exc}"
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        whole_error = exc
    else:
        return whole if isinstance(whole, list) else [whole]
    items = []
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1)]
    if sum(1 for _, line in lines if line.strip()) < 2:
        # One line that is not JSON: the JSON error says more than "line 1 is not JSON".
        return f"not JSON: {whole_error}"
    for number, line in lines:
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            return f"line {number} is not JSON (nor is the whole file): {exc}"
    return items


def _make_event(item: Any, file: str, index: int) -> Event | str:
    if not isinstance(item, dict):
        return f"an event is a JSON object, not {type(item).__name__}"
    try:
        # Validate as the wire body first, so fields only a connector sets are refused here too.
        body = EventBody.model_validate(item)
        return Event.model_validate({**body.model_dump(), "delivery_id": f"test:{file}:{index}"})
    except ValidationError as exc:
        return "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or '(body)'}: {error['msg']}"
            for error in exc.errors()
        )


def _print_decision(policy: Policy, file: str, index: int, event: Event, out: TextIO) -> None:
    decision = policy.decide(event)
    flags = " (failed closed)" if decision.failed_closed else ""
    print(
        f"{file} #{index} {event.subject}: {decision.rule} -> {decision.kind.value}{flags}",
        file=out,
    )
    for line in decision.explain().splitlines():
        print(f"  {line}", file=out)
    for shadow in decision.shadow:
        print(f"  shadow: {shadow.rule} would {shadow.decide.value} (not acted on)", file=out)
