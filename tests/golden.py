"""Golden files: one input in, one expected output out, kept under tests/unit/golden/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).parent / "unit" / "golden"


def assert_golden(name: str, value: dict[str, Any] | str) -> None:
    """Compare with `golden/<name>.json` (or `.txt` for text); a missing or different golden file
    fails the test and leaves the actual output as `<file>.new` for review."""
    GOLDEN.mkdir(exist_ok=True)
    if isinstance(value, str):
        path, text = GOLDEN / f"{name}.txt", value
    else:
        path = GOLDEN / f"{name}.json"
        text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
    new = path.with_name(path.name + ".new")
    if not path.exists():
        new.write_text(text)
        pytest.fail(f"no golden file {path.name}: wrote {new.name}; review it and rename it")
    if path.read_text() != text:
        new.write_text(text)
        assert path.read_text() == text, f"{path.name} differs; actual output in {new.name}"
    new.unlink(missing_ok=True)
