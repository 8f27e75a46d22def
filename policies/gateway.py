"""The gateway: a loaded Policy decides each Event, with a trace.

Rules run in order and the first non-shadow rule whose condition is true decides. A matching
``shadow: true`` rule is recorded (``Decision.shadow`` and a ``shadow_match`` trace step) and
evaluation goes on. When nothing matches, the policy's ``default`` decides (``rule="default"``).

A condition that fails at runtime (a missing attribute, a type error, a result that is not a bool)
does not match; its trace step has outcome ``error``. Because that rule might have been the one
meant to stop the event, the gateway FAILS CLOSED: if a live rule errored before the winner and
the winner would auto-approve or ignore the event, the decision becomes ``route`` (with the
default's route) when the default routes, else ``auto_reject``. ``Decision.rule`` still names the
winner, ``failed_closed`` is set and the winner's trace step says what happened. An erroring
shadow rule is only traced: shadow rules never change what happens.

Cost: the event is converted to CEL values once per ``decide`` (one ``cel.Context``) and every
rule's program, compiled at load, runs against it. Only matches get a detailed explanation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cel

from connectors.events import Event
from policies.anomaly import BaselineSpec, Measurement
from policies.conditions import (
    EVALUATION_ERRORS,
    Condition,
    describe_error,
    describe_result,
    explain_match,
)
from policies.model import (
    Decision,
    DecisionKind,
    Route,
    ShadowDecision,
    TraceOutcome,
    TraceStep,
)

DEFAULT_RULE = "default"
# Decisions that let an event through without a person: refused when a rule before them errored.
_UNGUARDED = frozenset({DecisionKind.auto_approve, DecisionKind.ignore})
_NO_MATCH = "condition is false"
# ValueError also covers an event the engine cannot convert (a lone surrogate in a string).
_MEASURE_ERRORS: tuple[type[Exception], ...] = (ValueError, *EVALUATION_ERRORS)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    condition: Condition
    decide: DecisionKind
    route: Route | None
    shadow: bool = False
    description: str = ""
    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class DefaultDecision:
    """What happens to an event no rule matches."""

    decide: DecisionKind
    route: Route | None
    file: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    default: DefaultDecision
    # The files the policy was read from, in load order.
    files: tuple[str, ...] = ()
    # At most one per (source, kind): see policies.anomaly.
    baselines: tuple[BaselineSpec, ...] = ()

    @property
    def channels(self) -> list[str]:
        """Every channel a rule or the default routes to, in policy order."""
        routes = [rule.route for rule in self.rules] + [self.default.route]
        return list(dict.fromkeys(route.channel for route in routes if route is not None))

    def measure(self, event: Event) -> Measurement | None:
        """The event's value for its baseline, or None: no baseline watches this source and
        kind, or the event lacks a usable key or number (it then gets no anomaly score, and a
        rule that reads one fails closed)."""
        spec = next(
            (b for b in self.baselines if b.source == event.source and b.kind == event.kind),
            None,
        )
        if spec is None:
            return None
        try:
            context = cel.Context({"event": event.to_cel()})
            key = spec.key.program.execute(context)
            value = spec.value.program.execute(context)
        except _MEASURE_ERRORS:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if not math.isfinite(value) or isinstance(key, bool) or not isinstance(key, str | int):
            return None
        return Measurement(
            baseline=(event.source, event.kind, spec.field, str(key)[:512]),
            value=float(value),
            alpha=spec.alpha,
            min_samples=spec.min_samples,
        )

    def decide(self, event: Event) -> Decision:
        """The decision for one event. Raises nothing for anything the event contains."""
        cel_event = event.to_cel()
        try:
            context = cel.Context({"event": cel_event})
        except ValueError as exc:
            # JSON can carry a lone surrogate ("\udcff"), which the engine refuses to convert.
            return self._fail_closed_without_rules(f"event cannot be read by CEL: {exc}")
        trace: list[TraceStep] = []
        shadows: list[ShadowDecision] = []
        errored: list[str] = []
        for rule in self.rules:
            try:
                result: Any = rule.condition.program.execute(context)
            except EVALUATION_ERRORS as exc:
                trace.append(
                    _step(rule.name, TraceOutcome.error, describe_error(rule.condition, exc))
                )
                if not rule.shadow:
                    errored.append(rule.name)
                continue
            if result is True:
                detail = explain_match(rule.condition, cel_event)
                if rule.shadow:
                    trace.append(_step(rule.name, TraceOutcome.shadow_match, detail))
                    shadows.append(ShadowDecision(rule=rule.name, decide=rule.decide))
                    continue
                return self._finish(
                    rule.name, rule.decide, rule.route, detail, trace, shadows, errored
                )
            if result is False:
                trace.append(_step(rule.name, TraceOutcome.no_match, _NO_MATCH))
                continue
            trace.append(_step(rule.name, TraceOutcome.error, describe_result(result)))
            if not rule.shadow:
                errored.append(rule.name)
        return self._finish(
            DEFAULT_RULE,
            self.default.decide,
            self.default.route,
            "no rule matched",
            trace,
            shadows,
            errored,
            outcome=TraceOutcome.default,
        )

    def _finish(
        self,
        rule: str,
        kind: DecisionKind,
        route: Route | None,
        detail: str,
        trace: list[TraceStep],
        shadows: list[ShadowDecision],
        errored: list[str],
        *,
        outcome: TraceOutcome = TraceOutcome.matched,
    ) -> Decision:
        failed_closed = bool(errored) and kind in _UNGUARDED
        if failed_closed:
            closed_kind, route = self._closed()
            detail += (
                f"; failed closed: {', '.join(errored)} errored before this rule,"
                f" so {kind.value} became {closed_kind.value}"
            )
            kind = closed_kind
        trace.append(_step(rule, outcome, detail))
        return Decision(
            kind=kind,
            rule=rule,
            route=route,
            trace=trace,
            shadow=shadows,
            failed_closed=failed_closed,
        )

    def _closed(self) -> tuple[DecisionKind, Route | None]:
        if self.default.decide is DecisionKind.route:
            return DecisionKind.route, self.default.route
        return DecisionKind.auto_reject, None

    def _fail_closed_without_rules(self, why: str) -> Decision:
        kind, route = self._closed()
        return Decision(
            kind=kind,
            rule=DEFAULT_RULE,
            route=route,
            trace=[_step(DEFAULT_RULE, TraceOutcome.error, f"{why}; failed closed")],
            failed_closed=True,
        )


def _step(rule: str, outcome: TraceOutcome, detail: str) -> TraceStep:
    # Plain construction: measured faster than model_construct() for three small fields.
    return TraceStep(rule=rule, outcome=outcome, detail=detail)
