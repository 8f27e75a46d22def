"""Anomaly baselines: synthetic streams through the estimator and through a loaded policy.

Steady streams score low, a spike scores high and does not teach the baseline, a slow drift is
learned, a young baseline gives no score (so a rule reading it fails closed)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from connectors.events import Event
from policies.anomaly import BaselineState, Measurement, anomaly_of, observe, score
from policies.errors import PolicyError
from policies.loader import parse_policy
from policies.model import DecisionKind
from tests.support import event_body

POLICY = """
baselines:
  - source: payments
    kind: refund
    key: event.attributes.merchant
    value: event.attributes.amount
    half_life: 20
    min_samples: 10
rules:
  - name: usual-refunds
    when: event.kind == "refund" && event.anomaly.score < 3.0
    decide: auto_approve
default:
  decide: route
  route: {channel: C1, approvers: [{group: finance}]}
"""


def learn(values: list[float], *, alpha: float = 0.05, min_samples: int = 10) -> BaselineState:
    state: BaselineState | None = None
    for value in values:
        state = observe(state, value, alpha=alpha, min_samples=min_samples)
    assert state is not None
    return state


def steady(n: int, mean: float = 100.0, spread: float = 5.0, seed: int = 7) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mean, spread) for _ in range(n)]


def test_a_steady_stream_scores_low() -> None:
    state = learn(steady(300))
    scores = [score(state, value, min_samples=10) for value in steady(200, seed=8)]
    assert all(s is not None and abs(s) < 4 for s in scores)
    assert abs(state.mean - 100) < 3
    assert 2 < state.deviation < 8


def test_a_spike_scores_high_and_does_not_move_the_baseline() -> None:
    state = learn(steady(300))
    spike = score(state, 5000, min_samples=10)
    assert spike is not None and spike > 50
    after = observe(state, 5000, alpha=0.05, min_samples=10)
    # Clamped to mean + 3 deviations before learning: the mean moves by at most alpha * 3 sd.
    assert after.mean - state.mean <= 0.05 * 3 * state.deviation + 1e-9
    again = score(after, 5000, min_samples=10)
    assert again is not None and again > 40  # the same spike is still unusual


def test_a_slow_drift_is_learned() -> None:
    rng = random.Random(3)
    # From 100 to 300 over 2,000 events: 0.1 per event, far inside the clamping band.
    drift = [100 + i * 0.1 + rng.gauss(0, 5) for i in range(2000)]
    state = learn(drift)
    assert abs(state.mean - 300) < 10
    current = score(state, 300, min_samples=10)
    assert current is not None and abs(current) < 2
    # ...while a baseline that had stayed at 100 would find 300 very unusual.
    old = score(learn(steady(300)), 300, min_samples=10)
    assert old is not None and old > 20


def test_a_lasting_level_shift_becomes_the_new_normal() -> None:
    state = learn(steady(300) + steady(400, mean=200, seed=9))
    shifted = score(state, 200, min_samples=10)
    assert shifted is not None and abs(shifted) < 3


def test_a_young_baseline_gives_no_score() -> None:
    state = learn([100.0] * 9)
    assert score(state, 10_000, min_samples=10) is None
    assert score(None, 10_000, min_samples=10) is None
    measurement = Measurement(("payments", "refund", "amount", "m1"), 10_000, 0.05, 10)
    anomaly = anomaly_of(state, measurement)
    assert anomaly.score is None and anomaly.samples == 9 and anomaly.baseline == 100.0


def test_identical_values_do_not_make_a_cent_unusual() -> None:
    state = learn([100.0] * 50)
    slight = score(state, 100.01, min_samples=10)
    assert slight is not None and slight < 0.01


def refund(merchant: str, amount: float) -> Event:
    body = event_body(attributes={"amount": amount, "merchant": merchant})
    return Event.model_validate({**body, "delivery_id": f"t:{merchant}:{amount}"})


def decide_with_baseline(policy_text: str, history: list[float], event: Event) -> DecisionKind:
    policy = parse_policy(policy_text)
    measurement = policy.measure(event)
    assert measurement is not None
    state = learn(history, alpha=measurement.alpha, min_samples=measurement.min_samples)
    scored = event.model_copy(update={"anomaly": anomaly_of(state, measurement)})
    return policy.decide(scored).kind


def test_one_rule_auto_approves_unless_unusual_for_this_merchant() -> None:
    history = steady(100, mean=80, spread=4)
    assert decide_with_baseline(POLICY, history, refund("acme", 82)) is DecisionKind.auto_approve
    assert decide_with_baseline(POLICY, history, refund("acme", 900)) is DecisionKind.route
    # A young baseline: the score is missing, the rule errors, the gateway fails closed.
    young = decide_with_baseline(POLICY, history[:5], refund("acme", 82))
    assert young is DecisionKind.route


def test_measure_names_the_baseline_and_skips_what_it_cannot_read() -> None:
    policy = parse_policy(POLICY)
    measurement = policy.measure(refund("acme", 12.5))
    assert measurement is not None
    assert measurement.baseline == ("payments", "refund", "event.attributes.amount", "acme")
    assert measurement.value == 12.5 and measurement.min_samples == 10
    assert policy.measure(refund("acme", 1).model_copy(update={"kind": "payout"})) is None
    no_amount = event_body(attributes={"merchant": "acme"})
    assert policy.measure(Event.model_validate({**no_amount, "delivery_id": "t:x"})) is None
    text = event_body(attributes={"merchant": "acme", "amount": "lots"})
    assert policy.measure(Event.model_validate({**text, "delivery_id": "t:y"})) is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{source: payments, kind: refund, key: event.attributes.m}", "missing `value`"),
        (
            "{source: payments, kind: refund, key: event.nope, value: event.attributes.a}",
            "type error in `key`: unknown field event.nope",
        ),
        (
            "{source: payments, kind: refund, key: event.kind, value: 'event.attributes.a +'}",
            "CEL syntax error",
        ),
        (
            "{source: p, kind: r, key: event.kind, value: event.attributes.a, half_life: 0}",
            "`half_life` must be a whole number ≥ 1",
        ),
        (
            "{source: p, kind: r, key: event.kind, value: event.attributes.a, window: 3}",
            "unknown key 'window' in a baseline",
        ),
    ],
)
def test_bad_baselines_are_reported_with_their_line(
    tmp_path: Path, entry: str, message: str
) -> None:
    text = f"baselines:\n  - {entry}\ndefault: {{decide: ignore}}\n"
    with pytest.raises(PolicyError) as raised:
        parse_policy(text, file="p.yaml")
    found = [str(problem) for problem in raised.value.problems]
    assert any(message in line and line.startswith("p.yaml:2:") for line in found), found


def test_two_baselines_for_one_source_and_kind_are_refused() -> None:
    entry = "{source: p, kind: r, key: event.kind, value: event.attributes.a}"
    text = f"baselines:\n  - {entry}\n  - {entry}\ndefault: {{decide: ignore}}\n"
    with pytest.raises(PolicyError, match="a baseline for p/r is already defined"):
        parse_policy(text)
