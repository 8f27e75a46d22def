"""`signoff demo` is the README's first command: it must tell the whole story and end by itself."""

from __future__ import annotations

import os

from tests.support import run_signoff


def test_demo_runs_the_whole_flow() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIGNOFF_", "SLACK_"))}
    result = run_signoff("demo", env=env, timeout=120)
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "auto_approve by rule small-refunds, status approved" in out
    assert "ignore by rule heartbeats" in out
    assert "401: no webhook-signature matches" in out
    # Cards as the Slack stand-in received them, with buttons while pending.
    assert "the card in #C0FINANCE" in out and "[ Approve ] [ Reject ] [ Details ]" in out
    # A non-approver and the requester are refused; the SRE lead's click decides.
    assert "you are not one of this request's approvers" in out
    assert "you started this action, so you may not approve it" in out
    assert "approved by sam" in out
    assert "DM to Mona (the requester): Approved" in out
    assert "2 decision(s) synced back to the source" in out
    # The other connectors: GitHub gets its review through its API, alerts come and go.
    assert "GitHub API got the review for run 5453085689: approved (production)" in out
    assert "comment: Approved in Signoff by sam" in out
    assert "two alerts firing: 2 requests routed to #C0ONCALL" in out
    assert "one alert resolved: 1 request cancelled" in out
    assert "intact" in out
