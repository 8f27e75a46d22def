"""Anomaly signals: a rolling baseline per (source, kind, key) of one numeric field.

A policy names what to watch:

    baselines:
      - source: payments
        kind: refund
        key: event.attributes.merchant     # CEL: whose baseline (one per merchant)
        value: event.attributes.amount     # CEL: the number to learn

and every matching event gets ``event.anomaly.score`` (how many standard deviations above the
baseline the value is; negative below it), ``event.anomaly.baseline`` (the learned mean) and
``event.anomaly.samples`` before the rules run. "Auto-approve refunds unless the amount is
unusual for this merchant" is then one rule: ``event.anomaly.score < 3``.

The estimator is an exponentially weighted mean and variance **with clamping**: each value is
clamped to mean ± `CLAMP` standard deviations before it updates the baseline. Why this and not
median/MAD: its whole state is three numbers, so a baseline is one row updated in the intake's
own transaction, where a median needs a window of raw values per key. Clamping gives what MAD
gives for outliers: one spike moves the mean by at most ``alpha * CLAMP`` standard deviations, so
it scores high and stays an anomaly, while a slow drift (each step inside the band) is followed
at the EWMA's pace, and a lasting level shift is learned within a few half-lives.

Until a baseline has seen ``min_samples`` values it gives no score: ``event.anomaly`` then has
``samples`` but no ``score``, and a rule reading ``event.anomaly.score`` errors, which makes the
gateway fail closed (route to people). A new merchant's first refunds are seen by a person.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from connectors.events import Anomaly
from policies.conditions import Condition

# Values are clamped to this many standard deviations before they update the baseline.
CLAMP = 3.0
DEFAULT_HALF_LIFE = 50
DEFAULT_MIN_SAMPLES = 10
# The deviation is never taken as smaller than this share of the mean: a stream of identical
# values would otherwise make a one-cent change infinitely unusual.
RELATIVE_FLOOR = 0.05
ABSOLUTE_FLOOR = 1e-9


@dataclass(frozen=True, slots=True)
class BaselineState:
    count: int
    mean: float
    variance: float

    @property
    def deviation(self) -> float:
        floor = max(abs(self.mean) * RELATIVE_FLOOR, ABSOLUTE_FLOOR)
        return max(math.sqrt(self.variance), floor)


# (source, kind, field, key): the identity of one baseline, as stored.
BaselineId = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class BaselineSpec:
    """One `baselines` entry of a policy, compiled."""

    source: str
    kind: str
    key: Condition
    value: Condition
    half_life: int = DEFAULT_HALF_LIFE
    min_samples: int = DEFAULT_MIN_SAMPLES

    @property
    def alpha(self) -> float:
        # The weight that halves an observation's influence every `half_life` observations.
        return 1.0 - math.pow(0.5, 1.0 / self.half_life)

    @property
    def field(self) -> str:
        # The baseline is named by what it learns, so renaming nothing else loses it.
        return self.value.text[:200]


@dataclass(frozen=True, slots=True)
class Measurement:
    """One event's value for one baseline: scored before the decision, learned at commit."""

    baseline: BaselineId
    value: float
    alpha: float
    min_samples: int


def observe(
    state: BaselineState | None, value: float, *, alpha: float, min_samples: int
) -> BaselineState:
    """The baseline after one more value. While young (fewer than `min_samples` values), a plain
    running mean and variance; then EWMA with the value clamped to mean ± CLAMP deviations."""
    if state is None or state.count == 0:
        return BaselineState(count=1, mean=value, variance=0.0)
    count = state.count + 1
    # 1/count while that is larger: the first values are learned as a plain average instead of
    # leaving the first one with most of the weight.
    weight = max(alpha, 1.0 / count)
    if state.count >= min_samples:
        band = CLAMP * state.deviation
        value = min(max(value, state.mean - band), state.mean + band)
    delta = value - state.mean
    mean = state.mean + weight * delta
    variance = (1.0 - weight) * (state.variance + weight * delta * delta)
    return BaselineState(count=count, mean=mean, variance=variance)


def score(state: BaselineState | None, value: float, *, min_samples: int) -> float | None:
    """Standard deviations above the baseline (negative below); None while it is too young."""
    if state is None or state.count < min_samples:
        return None
    return (value - state.mean) / state.deviation


def anomaly_of(state: BaselineState | None, measurement: Measurement) -> Anomaly:
    """What the event carries into the policy: the score (if the baseline is old enough), the
    learned mean and how many values it has seen."""
    value = score(state, measurement.value, min_samples=measurement.min_samples)
    samples = state.count if state else 0
    detail = f"{measurement.baseline[2]} for {measurement.baseline[3]}: {measurement.value:g}"
    if state is not None:
        detail += f" against a baseline of {state.mean:.6g} ± {state.deviation:.3g}"
    return Anomaly(
        score=None if value is None else round(value, 4),
        baseline=None if state is None else state.mean,
        samples=samples,
        detail=(detail + f" ({samples} samples)")[:512],
    )
