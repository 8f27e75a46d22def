"""The operator's CLI as a real process: policy check/test/backtest, db upgrade, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support import POLICY, SECRET, event_body, run_signoff


def signoff(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_signoff(*args, env={**os.environ, **(env or {})})


def test_policy_check_reports_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - name: x\n    when: event.kind ==\n    decide: auto_approve\n")
    result = signoff("policy", "check", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3:" in result.stdout
    ok = signoff("policy", "check", str(POLICY))
    assert ok.returncode == 0
    assert ok.stdout.startswith("ok: ")


def test_policy_test_names_the_deciding_rule(tmp_path: Path) -> None:
    events = tmp_path / "events.json"
    events.write_text(json.dumps([event_body(attributes={"amount": 100}), event_body()]))
    result = signoff("policy", "test", str(POLICY), str(events))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "small-refunds" in result.stdout and "big-refunds" in result.stdout


def test_db_upgrade_then_backtest_stored_events(tmp_path: Path) -> None:
    env = {"SIGNOFF_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 's.db'}"}
    upgraded = signoff("db", "upgrade", env=env)
    assert upgraded.returncode == 0 and "revision" in upgraded.stdout

    # Store two events through the real ledger, then ask what a stricter policy would change.
    script = f"""
import asyncio
from bot.settings import load_settings
from bot.service import Services
from connectors.webhook.intake import receive
from tests.support import sign, event_body
async def main():
    s = await Services.start(load_settings(SIGNOFF_DATABASE_URL={env["SIGNOFF_DATABASE_URL"]!r},
        SIGNOFF_POLICY_PATH={str(POLICY)!r}, SIGNOFF_WEBHOOK_SECRET={SECRET!r}))
    for amount in (100, 9000):
        event = receive(*sign(event_body(attributes={{"amount": amount}})),
                        verifier=s.webhook.verifier)
        await s.batcher.submit(s.intake(event, s.policy.decide(event), s.webhook))
    await s.close()
asyncio.run(main())
"""
    stored = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert stored.returncode == 0, stored.stderr
    strict = tmp_path / "strict.yaml"
    strict.write_text(
        "rules:\n  - name: everything-to-people\n    when: 'true'\n    decide: route\n"
        "    route: {channel: C1, approvers: [{group: g, min: 1}]}\n"
        "default:\n  decide: ignore\n"
    )
    result = signoff("policy", "backtest", str(strict), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 of 2 events would change"), result.stdout
    assert "auto_approve -> route: 1" in result.stdout


def test_operator_errors_are_one_line(tmp_path: Path) -> None:
    env = {"SIGNOFF_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 's.db'}"}
    missing = signoff("requests", "show", "r_nope", env=env)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "signoff: no request 'r_nope'"
    since = signoff("audit", "export", "--since", "yesterday", env=env)
    assert since.returncode == 2
    assert "not an ISO 8601" in since.stderr
