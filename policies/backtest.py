"""`signoff policy backtest`: replay stored events through a policy and say what would change.

Pure: storage hands in ``(event, old_decision_kind, old_rule)`` tuples, nothing is written.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from connectors.events import Event
from policies.gateway import Policy
from policies.model import Decision


@dataclass(frozen=True, slots=True)
class BacktestChange:
    """One event whose decision kind or deciding rule would change."""

    event: Event
    old_kind: str
    old_rule: str
    new: Decision

    def describe(self) -> str:
        flags = " (failed closed)" if self.new.failed_closed else ""
        return (
            f"{self.event.delivery_id} {self.event.subject}: {self.old_kind} by {self.old_rule}"
            f" -> {self.new.kind.value} by {self.new.rule}{flags}"
        )


@dataclass(frozen=True, slots=True)
class BacktestReport:
    total: int
    changes: list[BacktestChange] = field(default_factory=list)
    # (old kind, new kind) -> number of events, over all events replayed (unchanged ones too).
    transitions: dict[tuple[str, str], int] = field(default_factory=dict)

    def render(self) -> str:
        """The report as text for the CLI: changed events, then the old -> new counts."""
        lines = [f"{len(self.changes)} of {self.total} events would change"]
        lines += [f"  {change.describe()}" for change in self.changes]
        if self.transitions:
            lines.append("decisions (old -> new: events):")
            lines += [
                f"  {old} -> {new}: {count}"
                for (old, new), count in sorted(self.transitions.items())
            ]
        return "\n".join(lines)


def backtest(policy: Policy, stored: Iterable[tuple[Event, str, str]]) -> BacktestReport:
    total = 0
    changes: list[BacktestChange] = []
    transitions: Counter[tuple[str, str]] = Counter()
    for event, old_kind, old_rule in stored:
        total += 1
        new = policy.decide(event)
        transitions[(old_kind, new.kind.value)] += 1
        if new.kind.value != old_kind or new.rule != old_rule:
            changes.append(BacktestChange(event, old_kind, old_rule, new))
    return BacktestReport(total=total, changes=changes, transitions=dict(transitions))
