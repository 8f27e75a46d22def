"""A policy that cannot be loaded: ``PolicyError`` carries every ``Problem`` found, not the first.

Its place in the tree (drawn in ``connectors.errors``)::

    SignoffError
    └── PolicyError      a policy file is invalid; ``.problems`` says where and why
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from connectors.errors import SignoffError


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a policy file. `line` counts from 1; 0 is the file (or folder) itself."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class PolicyError(SignoffError):
    """The policy is invalid."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))
