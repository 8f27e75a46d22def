"""`policy check` and `policy test` output and exit codes; and backtest."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from connectors.events import Event

# Imported as a module: pytest would collect a function named test_command as a test.
from policies import commands
from policies.backtest import backtest
from policies.loader import load_policy

POLICIES = Path(__file__).parent / "policies"
DESIGN = str(POLICIES / "design_example.yaml")


def body(**fields: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "source": "payments",
        "kind": "refund",
        "subject": "refund/re_1",
        "version": "1",
        "title": "Refund",
    }
    event.update(fields)
    return event


def run_check(path: str | Path) -> tuple[int, str]:
    out = io.StringIO()
    code = commands.check_command(str(path), out)
    return code, out.getvalue()


def run_test(path: str | Path, *files: Path) -> tuple[int, str]:
    out = io.StringIO()
    code = commands.test_command(str(path), [str(f) for f in files], out)
    return code, out.getvalue()


def test_check_ok() -> None:
    assert run_check(DESIGN) == (0, "ok: 2 rules in 1 files\n")
    assert run_check(POLICIES / "folder") == (0, "ok: 3 rules in 2 files\n")


def test_check_prints_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text('rules:\n  - name: a\n    when: "true"\n    decide: nope\n    extra: 1\n')
    code, output = run_check(path)
    assert code == 1
    lines = output.splitlines()
    assert lines[0].startswith(f"{path}:1: the policy has no `default`")
    assert lines[1].startswith(f"{path}:4: rule 'a': unknown decision 'nope'")
    assert lines[2].startswith(f"{path}:5: unknown key 'extra' in a rule")
    assert len(lines) == 3


def test_test_one_event(tmp_path: Path) -> None:
    events = tmp_path / "small.json"
    events.write_text(json.dumps(body(attributes={"amount": 120})))
    code, output = run_test(DESIGN, events)
    assert code == 0
    assert output.splitlines() == [
        f"{events} #1 refund/re_1: small-refunds -> auto_approve",
        '  small-refunds: matched (event.kind == "refund" && event.attributes.amount < 500'
        ' with event.kind="refund", event.attributes.amount=120)',
    ]


def test_test_array_and_json_lines(tmp_path: Path) -> None:
    array = tmp_path / "array.json"
    array.write_text(json.dumps([body(attributes={"amount": 4200}), body(kind="deploy")]))
    lines = tmp_path / "events.jsonl"
    lines.write_text(
        json.dumps(body(subject="refund/a", attributes={})) + "\n\n" + json.dumps(body()) + "\n"
    )
    code, output = run_test(DESIGN, array, lines)
    assert code == 0
    headers = [line for line in output.splitlines() if not line.startswith("  ")]
    assert headers == [
        f"{array} #1 refund/re_1: big-refunds -> route",
        f"{array} #2 refund/re_1: default -> route",
        f"{lines} #1 refund/a: big-refunds -> route",
        f"{lines} #2 refund/re_1: big-refunds -> route",
    ]
    assert "  small-refunds: error (event.attributes.amount is missing)" in output
    assert "  default: default (no rule matched)" in output


def test_test_shows_shadow_and_failed_closed(tmp_path: Path) -> None:
    events = tmp_path / "e.json"
    events.write_text(
        json.dumps(
            [
                body(kind="payout"),
                body(kind="deploy", attributes={"env": "staging"}, anomaly={"score": 9}),
            ]
        )
    )
    code, output = run_test(POLICIES / "decide.yaml", events)
    assert code == 0
    assert f"{events} #1 refund/re_1: payouts -> route (failed closed)" in output
    assert "  shadow: watch-anomalies would auto_reject (not acted on)" in output


def test_test_invalid_event_names_file_and_field(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(body()))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([body(), body(risk="extreme", colour="red")]))
    code, output = run_test(DESIGN, good, bad)
    assert code == 1
    assert output.splitlines() == [
        f"{bad}: event 2: risk: Input should be 'low', 'medium', 'high' or 'critical';"
        " colour: Extra inputs are not permitted"
    ]


def test_test_unreadable_event_files(tmp_path: Path) -> None:
    not_json = tmp_path / "x.json"
    not_json.write_text("{nope")
    bad_line = tmp_path / "y.jsonl"
    bad_line.write_text(json.dumps(body()) + "\n{nope\n")
    scalar = tmp_path / "z.json"
    scalar.write_text("42")
    code, output = run_test(DESIGN, not_json, bad_line, scalar, tmp_path / "missing.json")
    assert code == 1
    lines = output.splitlines()
    assert lines[0].startswith(f"{not_json}: not JSON: ")
    assert lines[1].startswith(f"{bad_line}: line 2 is not JSON")
    assert lines[2] == f"{scalar}: event 1: an event is a JSON object, not int"
    assert lines[3].startswith(f"{tmp_path / 'missing.json'}: cannot read:")


def test_test_invalid_policy(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("rules: [\n")
    events = tmp_path / "e.json"
    events.write_text(json.dumps(body()))
    code, output = run_test(policy, events)
    assert code == 1
    assert output.splitlines()[0] == f"the policy {policy} is invalid (1 problem):"
    assert output.splitlines()[1].startswith(f"  {policy}:2: YAML syntax error")


def test_test_decides_every_event_in_a_file(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        'rules:\n  - name: d\n    when: event.kind == "refund"\n    decide: ignore\n'
        "default: {decide: auto_reject}\n"
    )
    events = tmp_path / "e.json"
    events.write_text(json.dumps([body(), body()]))
    code, output = run_test(policy, events)
    assert code == 0
    assert output.count("d -> ignore") == 2


def make_event(index: int, **fields: Any) -> Event:
    return Event.model_validate({**body(**fields), "delivery_id": f"d-{index}"})


def test_backtest_reports_changes_and_counts() -> None:
    policy = load_policy(DESIGN)
    stored = [
        (make_event(1, attributes={"amount": 120}), "auto_approve", "small-refunds"),  # same
        (make_event(2, attributes={"amount": 120}), "route", "default"),  # kind changes
        (make_event(3, attributes={"amount": 4200}), "route", "old-rule"),  # rule changes
        (make_event(4, kind="deploy"), "ignore", "deploys"),  # kind and rule change
    ]
    report = backtest(policy, stored)
    assert report.total == 4
    assert [(c.event.delivery_id, c.new.kind.value, c.new.rule) for c in report.changes] == [
        ("d-2", "auto_approve", "small-refunds"),
        ("d-3", "route", "big-refunds"),
        ("d-4", "route", "default"),
    ]
    assert report.transitions == {
        ("auto_approve", "auto_approve"): 1,
        ("route", "auto_approve"): 1,
        ("route", "route"): 1,
        ("ignore", "route"): 1,
    }
    text = report.render()
    assert text.splitlines()[0] == "3 of 4 events would change"
    assert "  d-2 refund/re_1: route by default -> auto_approve by small-refunds" in text
    assert "  ignore -> route: 1" in text


def test_backtest_of_nothing() -> None:
    report = backtest(load_policy(DESIGN), [])
    assert (report.total, report.changes, report.transitions) == (0, [], {})
    assert report.render() == "0 of 0 events would change"
