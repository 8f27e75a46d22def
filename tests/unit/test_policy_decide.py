"""Policy.decide: which rule decides which event, the trace, shadow rules and failing closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from connectors.events import Event
from policies.gateway import Policy
from policies.loader import load_policy, parse_policy
from policies.model import DecisionKind, ShadowDecision, TraceOutcome

POLICIES = Path(__file__).parent / "policies"


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(POLICIES / "decide.yaml")


def make_event(**fields: Any) -> Event:
    body: dict[str, Any] = {
        "source": "payments",
        "kind": "refund",
        "subject": "refund/re_1",
        "version": "1",
        "title": "Refund",
        "delivery_id": "d-1",
    }
    body.update(fields)
    return Event.model_validate(body)


CONTRACTOR = {"id": "u-1", "team": "contractors"}

# (id, event fields, deciding rule, decision kind, failed closed)
TABLE: list[tuple[str, dict[str, Any], str, DecisionKind, bool]] = [
    (
        "small refund",
        {"attributes": {"amount": 120}},
        "small-refunds",
        DecisionKind.auto_approve,
        False,
    ),
    (
        "big refund falls to default",
        {"attributes": {"amount": 4200}},
        "default",
        DecisionKind.route,
        False,
    ),
    ("unknown kind falls to default", {"kind": "payroll"}, "default", DecisionKind.route, False),
    (
        "contractor deploy",
        {"kind": "deploy", "actor": CONTRACTOR, "attributes": {"env": "staging"}},
        "contractor-deploys",
        DecisionKind.auto_reject,
        False,
    ),
    (
        "low-risk alert",
        {"source": "alertmanager", "kind": "alert", "risk": "low"},
        "low-risk-alerts",
        DecisionKind.ignore,
        False,
    ),
    (
        "staging deploy",
        {"kind": "deploy", "attributes": {"env": "staging"}},
        "staging-deploys",
        DecisionKind.auto_approve,
        False,
    ),
    (
        "prod deploy",
        {"kind": "deploy", "attributes": {"env": "prod"}},
        "prod-deploys",
        DecisionKind.route,
        False,
    ),
    (
        "flagged payout",
        {"kind": "payout", "attributes": {"flagged": True}},
        "flagged-payouts",
        DecisionKind.route,
        False,
    ),
    (
        "clean payout",
        {"kind": "payout", "attributes": {"flagged": False}},
        "payouts",
        DecisionKind.auto_approve,
        False,
    ),
    # The missing attribute errors in flagged-payouts, so payouts may not auto-approve.
    (
        "payout missing attribute fails closed",
        {"kind": "payout"},
        "payouts",
        DecisionKind.route,
        True,
    ),
    # A string where a bool belongs: the condition is non-bool at runtime, an error too.
    (
        "payout non-bool fails closed",
        {"kind": "payout", "attributes": {"flagged": "yes"}},
        "payouts",
        DecisionKind.route,
        True,
    ),
    # An error before a decision that routes anyway changes nothing.
    ("refund missing amount routes by default", {}, "default", DecisionKind.route, False),
    (
        "shadow match does not act",
        {"kind": "deploy", "attributes": {"env": "staging"}, "anomaly": {"score": 9.5}},
        "staging-deploys",
        DecisionKind.auto_approve,
        False,
    ),
]


@pytest.mark.parametrize(
    ("fields", "rule", "kind", "failed_closed"),
    [pytest.param(*row[1:], id=row[0]) for row in TABLE],
)
def test_decision_table(
    policy: Policy, fields: dict[str, Any], rule: str, kind: DecisionKind, failed_closed: bool
) -> None:
    decision = policy.decide(make_event(**fields))
    assert (decision.rule, decision.kind, decision.failed_closed) == (rule, kind, failed_closed)
    assert decision.trace[-1].rule == rule
    assert (decision.route is not None) == (kind is DecisionKind.route)


def test_every_decision_kind_is_in_the_table() -> None:
    assert {row[3] for row in TABLE} == set(DecisionKind)


def test_match_trace_shows_condition_and_values(policy: Policy) -> None:
    decision = policy.decide(make_event(attributes={"amount": 120}))
    assert [(s.rule, s.outcome) for s in decision.trace] == [
        ("watch-anomalies", TraceOutcome.no_match),
        ("contractor-deploys", TraceOutcome.no_match),
        ("low-risk-alerts", TraceOutcome.no_match),
        ("small-refunds", TraceOutcome.matched),
    ]
    assert decision.trace[-1].detail == (
        'event.kind == "refund" && event.attributes.amount < 500'
        ' with event.kind="refund", event.attributes.amount=120'
    )
    assert "small-refunds: matched (" in decision.explain()


def test_trace_stops_after_the_winner(policy: Policy) -> None:
    decision = policy.decide(make_event(kind="deploy", attributes={"env": "prod"}))
    assert [s.rule for s in decision.trace][-2:] == ["staging-deploys", "prod-deploys"]
    assert "payouts" not in [s.rule for s in decision.trace]
    assert decision.route is not None
    assert decision.route.channel == "C0DEPLOYS"


def test_long_values_are_truncated_in_the_trace() -> None:
    policy = parse_policy(
        """
rules:
  - name: long
    when: event.title.startsWith("x")
    decide: ignore
default: {decide: auto_reject}
"""
    )
    decision = policy.decide(make_event(title="x" * 500))
    detail = decision.trace[-1].detail
    assert 'event.title="xxx' in detail
    assert detail.endswith("...")
    assert len(detail) < 120


def test_default_step(policy: Policy) -> None:
    decision = policy.decide(make_event(kind="payroll"))
    last = decision.trace[-1]
    assert (last.rule, last.outcome) == ("default", TraceOutcome.default)
    assert len(decision.trace) == len(policy.rules) + 1
    assert decision.route is not None
    assert decision.route.channel == "C0APPROVALS"


def test_shadow_rule_is_recorded_not_acted_on(policy: Policy) -> None:
    decision = policy.decide(
        make_event(kind="deploy", attributes={"env": "staging"}, anomaly={"score": 9.5})
    )
    assert decision.shadow == [
        ShadowDecision(rule="watch-anomalies", decide=DecisionKind.auto_reject)
    ]
    first = decision.trace[0]
    assert (first.rule, first.outcome) == ("watch-anomalies", TraceOutcome.shadow_match)
    assert "event.anomaly.score=9.5" in first.detail
    assert decision.kind is DecisionKind.auto_approve


def test_fail_closed_routes_with_the_default_route(policy: Policy) -> None:
    decision = policy.decide(make_event(kind="payout"))
    steps = {s.rule: s for s in decision.trace}
    assert steps["flagged-payouts"].outcome is TraceOutcome.error
    assert steps["flagged-payouts"].detail == "event.attributes.flagged is missing"
    assert "failed closed" in steps["payouts"].detail
    assert "flagged-payouts errored" in steps["payouts"].detail
    assert decision.route is not None
    assert decision.route.channel == "C0APPROVALS"


def test_non_bool_result_is_an_error_step(policy: Policy) -> None:
    decision = policy.decide(make_event(kind="payout", attributes={"flagged": "yes"}))
    step = next(s for s in decision.trace if s.rule == "flagged-payouts")
    assert step.outcome is TraceOutcome.error
    assert "a string, not a bool" in step.detail


FAIL_CLOSED_TO_REJECT = """
rules:
  - name: shadow-broken
    when: event.attributes.score > 3
    decide: auto_reject
    shadow: true
  - name: big
    when: event.attributes.amount > 1000
    decide: route
    route: {channel: C1, approvers: [{group: g}]}
  - name: everything
    when: event.kind == "refund"
    decide: auto_approve
default:
  decide: ignore
"""


def test_fail_closed_rejects_when_the_default_does_not_route() -> None:
    policy = parse_policy(FAIL_CLOSED_TO_REJECT)
    decision = policy.decide(make_event(attributes={}))
    assert (decision.rule, decision.kind, decision.failed_closed) == (
        "everything",
        DecisionKind.auto_reject,
        True,
    )
    assert decision.route is None


def test_the_default_fails_closed_too() -> None:
    policy = parse_policy(FAIL_CLOSED_TO_REJECT)
    decision = policy.decide(make_event(kind="payroll"))
    assert (decision.rule, decision.kind, decision.failed_closed) == (
        "default",
        DecisionKind.auto_reject,
        True,
    )
    assert "failed closed" in decision.trace[-1].detail


def test_an_erroring_shadow_rule_does_not_fail_closed() -> None:
    policy = parse_policy(FAIL_CLOSED_TO_REJECT)
    decision = policy.decide(make_event(attributes={"amount": 10}))
    assert decision.trace[0].outcome is TraceOutcome.error
    assert (decision.kind, decision.failed_closed) == (DecisionKind.auto_approve, False)


@pytest.mark.parametrize(
    "attributes",
    [
        {"amount": "lots"},  # type error
        {"amount": 2**62, "score": 2**62},  # fine, big ints
        {"amount": [1, 2]},  # list compared with int
        {"amount": None},
        {"amount": {"nested": {"deep": [1, {"x": None}]}}},
        {"amount": 1.5e308},
    ],
)
def test_decide_never_raises_for_event_content(attributes: dict[str, Any]) -> None:
    policy = parse_policy(FAIL_CLOSED_TO_REJECT)
    decision = policy.decide(make_event(attributes=attributes))
    assert decision.kind in set(DecisionKind)
    assert decision.trace


def test_event_the_engine_cannot_read_fails_closed(policy: Policy) -> None:
    # json.loads accepts a lone surrogate escape; the CEL engine refuses to convert it.
    decision = policy.decide(make_event(kind="payout", attributes={"note": "\udcff"}))
    assert (decision.rule, decision.kind, decision.failed_closed) == (
        "default",
        DecisionKind.route,
        True,
    )
    assert decision.trace[0].outcome is TraceOutcome.error
    assert "cannot be read by CEL" in decision.trace[0].detail


def test_event_without_actor_can_be_decided(policy: Policy) -> None:
    decision = policy.decide(make_event(kind="deploy", attributes={"env": "prod"}))
    assert decision.rule == "prod-deploys"


def test_folder_rules_run_in_file_name_order() -> None:
    policy = load_policy(POLICIES / "folder")
    assert [Path(f).name for f in policy.files] == ["a-payments.yaml", "b-everything.yml"]
    assert [r.name for r in policy.rules] == ["refunds-first", "refunds-second", "deploys"]
    decision = policy.decide(make_event())
    assert (decision.rule, decision.kind) == ("refunds-first", DecisionKind.auto_reject)
    assert policy.decide(make_event(kind="other")).kind is DecisionKind.auto_reject


def test_design_example_decides_refunds() -> None:
    policy = load_policy(POLICIES / "design_example.yaml")
    small = policy.decide(make_event(attributes={"amount": 120}))
    big = policy.decide(make_event(attributes={"amount": 4200}))
    assert (small.rule, small.kind) == ("small-refunds", DecisionKind.auto_approve)
    assert (big.rule, big.kind) == ("big-refunds", DecisionKind.route)
    assert big.route is not None
    assert [group.label for group in big.route.approvers] == ["finance-leads", "U0CFO"]
