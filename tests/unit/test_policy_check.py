"""load_policy's checks: every kind of problem, each pointing at its file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.errors import PolicyError, Problem
from policies.loader import load_policy

POLICIES = Path(__file__).parent / "policies"

DEFAULT = """
default:
  decide: route
  route: {channel: C0APPROVALS, approvers: [{group: approvers}]}
"""


def problems(tmp_path: Path, text: str, name: str = "policy.yaml") -> list[str]:
    path = tmp_path / name
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    with pytest.raises(PolicyError) as raised:
        load_policy(path)
    return [str(problem) for problem in raised.value.problems]


def only(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def test_problem_str_is_file_line_message() -> None:
    assert str(Problem("p.yaml", 3, "bad")) == "p.yaml:3: bad"


def test_bad_yaml(tmp_path: Path) -> None:
    found = only(tmp_path, 'rules:\n  - name: a\n    when: "unclosed\n')
    assert found.startswith(f"{tmp_path / 'policy.yaml'}:4: YAML syntax error:")
    assert "at line 3" in found


def test_unknown_top_level_key(tmp_path: Path) -> None:
    found = only(tmp_path, "rules: []\ndefualt: {decide: ignore}\ndefault: {decide: ignore}\n")
    assert found == f"{tmp_path / 'policy.yaml'}:2: unknown key 'defualt' at the top level" + (
        " (allowed: rules, default, baselines)"
    )


def test_unknown_rule_key(tmp_path: Path) -> None:
    found = only(
        tmp_path,
        """
rules:
  - name: a
    when: "true"
    decide: ignore
    descripton: typo
"""
        + DEFAULT,
    )
    assert found.startswith(f"{tmp_path / 'policy.yaml'}:5: unknown key 'descripton' in a rule")


def test_unknown_route_key(tmp_path: Path) -> None:
    found = only(
        tmp_path,
        """
rules:
  - name: a
    when: "true"
    decide: route
    route:
      channel: C1
      approvers:
        - group: g
          mni: 2
"""
        + DEFAULT,
    )
    assert found == (
        f"{tmp_path / 'policy.yaml'}:9: rule 'a': unknown key 'mni' in route.approvers[0]"
    )


def test_cel_syntax_error(tmp_path: Path) -> None:
    found = only(
        tmp_path, "rules:\n  - name: a\n    decide: ignore\n    when: event.kind ==\n" + DEFAULT
    )
    assert found.startswith(
        f"{tmp_path / 'policy.yaml'}:4: rule 'a': CEL syntax error at line 1, column 14 of `when`"
    )


@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("event.kind + 1 > 0", "type error in `when`: Unsupported operation: string + int"),
        ("event.risk > 2", "type error in `when`: No such overload"),
        ("event.kind", "type error in `when`: the condition gives a string, not a bool"),
        ("size(event.context)", "type error in `when`: the condition gives an int, not a bool"),
        ("event.nope == 1", "type error in `when`: unknown field event.nope"),
        ('event.actor.nmae == "x"', "type error in `when`: unknown field event.actor.nmae"),
        ('evnt.kind == "x"', "unknown name in `when`: Undefined variable or function: 'evnt'"),
    ],
)
def test_cel_type_errors(tmp_path: Path, when: str, message: str) -> None:
    found = only(
        tmp_path, f"rules:\n  - name: a\n    when: '{when}'\n    decide: ignore\n" + DEFAULT
    )
    assert found.startswith(f"{tmp_path / 'policy.yaml'}:3: rule 'a': {message}")


@pytest.mark.parametrize(
    "when",
    [
        # Attributes and context differ per source: a key the probe lacks is not an error.
        "event.attributes.amount > 10",
        'event.context.Customer == "ACME"',
        # A field name inside a string literal is not a reference.
        'event.kind == "event.nope"',
        'event.actor.email.endsWith("@example.com")',
        'event.occurred_at > timestamp("2024-01-01T00:00:00Z")',
        "has(event.anomaly.score) && event.anomaly.score > 3.0",
        "true",
    ],
)
def test_valid_conditions_pass(tmp_path: Path, when: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(f"rules:\n  - name: a\n    when: '{when}'\n    decide: ignore\n" + DEFAULT)
    assert [rule.name for rule in load_policy(path).rules] == ["a"]


@pytest.mark.parametrize(
    ("route", "line", "message"),
    [
        ("sla: 30 minutes", 7, "route.sla: unknown duration '30 minutes'"),
        ("expires_after: 3w", 7, "route.expires_after: unknown duration '3w'"),
        ("sla: 30", 7, "route.sla: unknown duration 30"),
        (
            "escalate:\n        - after: 2 hours\n          notify: [U1]",
            8,
            "route.escalate[0].after: unknown duration",
        ),
    ],
)
def test_unknown_duration(tmp_path: Path, route: str, line: int, message: str) -> None:
    found = only(
        tmp_path,
        f"""
rules:
  - name: a
    when: "true"
    decide: route
    route:
      channel: C1
      {route}
      approvers: [{{group: g}}]
"""
        + DEFAULT,
    )
    assert found.startswith(f"{tmp_path / 'policy.yaml'}:{line}: rule 'a': {message}")


def test_duplicate_rule_name(tmp_path: Path) -> None:
    found = only(
        tmp_path,
        """
rules:
  - name: a
    when: "true"
    decide: ignore
  - name: a
    when: "false"
    decide: ignore
"""
        + DEFAULT,
    )
    path = tmp_path / "policy.yaml"
    assert found == f"{path}:5: duplicate rule name 'a' (first defined at {path}:2)"


def test_duplicate_rule_name_across_files(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text('rules:\n  - {name: a, when: "true", decide: ignore}\n')
    (tmp_path / "b.yaml").write_text(
        'rules:\n  - {name: x, when: "true", decide: ignore}\n'
        '  - {name: a, when: "true", decide: ignore}\n' + DEFAULT
    )
    with pytest.raises(PolicyError) as raised:
        load_policy(tmp_path)
    first = tmp_path / "a.yaml"
    assert [str(p) for p in raised.value.problems] == [
        f"{tmp_path / 'b.yaml'}:3: duplicate rule name 'a' (first defined at {first}:2)"
    ]


def test_route_decision_without_route(tmp_path: Path) -> None:
    found = only(tmp_path, 'rules:\n  - name: a\n    when: "true"\n    decide: route\n' + DEFAULT)
    assert found == f"{tmp_path / 'policy.yaml'}:2: rule 'a': `decide: route` needs a `route`"


def test_route_with_another_decision(tmp_path: Path) -> None:
    found = only(
        tmp_path,
        'rules:\n  - name: a\n    when: "true"\n    decide: ignore\n'
        "    route: {channel: C1, approvers: [{group: g}]}\n" + DEFAULT,
    )
    assert found.startswith(f"{tmp_path / 'policy.yaml'}:5: rule 'a': `route` is only allowed")


def test_missing_default(tmp_path: Path) -> None:
    found = only(tmp_path, 'rules:\n  - name: a\n    when: "true"\n    decide: ignore\n')
    assert found.startswith(f"{tmp_path / 'policy.yaml'}:1: the policy has no `default`")


def test_two_defaults_in_a_folder(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(DEFAULT)
    (tmp_path / "b.yml").write_text("\n" + DEFAULT)
    with pytest.raises(PolicyError) as raised:
        load_policy(tmp_path)
    assert [str(p) for p in raised.value.problems] == [
        f"{tmp_path / 'b.yml'}:3: `default` is already defined at {tmp_path / 'a.yaml'}:2;"
        " a policy has exactly one"
    ]


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nowhere\.yaml:0: no such policy file"):
        load_policy(tmp_path / "nowhere.yaml")
    with pytest.raises(PolicyError, match=r":0: no \*\.yaml or \*\.yml policy files here"):
        load_policy(tmp_path)


SEVERAL = """
rules:
  - name: a
    when: event.kind + 1 > 0
    decide: auto_approve
  - name: a
    when: event.kind ==
    decide: maybe
  - name: c
    when: event.kind == "x"
    decide: route
    colour: red
  - name: d
    when: 'true'
    decide: route
    route:
      channel: C1
      approvers: [{group: g, min: 0}]
      sla: 3w
    shadow: yes
    shadow: no
top: 1
"""


def test_several_problems_are_all_reported(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    assert problems(tmp_path, SEVERAL) == [
        f"{path}:1: the policy has no `default`: every event needs an answer when no rule matches"
        " (e.g. `default: {decide: route, route: {...}}`)",
        f"{path}:3: rule 'a': type error in `when`: Unsupported operation: string + int",
        f"{path}:5: duplicate rule name 'a' (first defined at {path}:2)",
        f"{path}:6: rule 'a': CEL syntax error at line 1, column 14 of `when`: Syntax error:"
        " mismatched input '<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', 'false',"
        " 'null', NUM_FLOAT, NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER}",
        f"{path}:7: rule 'a': unknown decision 'maybe' (use one of: auto_approve, auto_reject,"
        " route, ignore)",
        f"{path}:8: rule 'c': `decide: route` needs a `route`",
        f"{path}:11: unknown key 'colour' in a rule (allowed: name, when, decide, route, shadow,"
        " description)",
        f"{path}:17: rule 'd': route.approvers[0].min: Input should be greater than or equal to 1",
        f"{path}:18: rule 'd': route.sla: unknown duration '3w' (use e.g. 45s, 30m, 2h, 1d, 1h30m)",
        f"{path}:20: duplicate key 'shadow'",
        f"{path}:21: unknown key 'top' at the top level (allowed: rules, default, baselines)",
    ]


def test_reserved_and_missing_names(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        'rules:\n  - name: default\n    when: "true"\n    decide: ignore\n'
        '  - when: "true"\n    decide: ignore\n' + DEFAULT,
    )
    path = tmp_path / "policy.yaml"
    assert found == [
        f"{path}:2: rule name 'default' is reserved for the policy's default",
        f"{path}:5: rule #2: missing `name`",
    ]


def test_design_example_checks_clean() -> None:
    policy = load_policy(POLICIES / "design_example.yaml")
    assert [rule.name for rule in policy.rules] == ["small-refunds", "big-refunds"]
    big = policy.rules[1].route
    assert big is not None
    assert big.sla is not None
    assert big.sla.total_seconds() == 1800
    assert [level.after.total_seconds() for level in big.escalate] == [1800, 7200]


@pytest.mark.parametrize("name", ["decide.yaml", "folder"])
def test_other_fixtures_check_clean(name: str) -> None:
    assert load_policy(POLICIES / name).rules
