"""SLA reminders, escalations, expiry warnings and expiry, walked with a controlled clock
through the running service and the Slack stand-in (both databases): nothing sleeps, each
notice goes out once, a restart catches up, and expired stays distinct from rejected."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select

from bot.clock import ManualClock
from storage.models import AuditRecord, Request
from tests.integration.conftest import SlackRunning, outbox_settled, slack_app
from tests.integration.test_slack_flow import click
from tests.slack_support import signed, view_submission
from tests.support import event_body, sign

POLICY = """
rules:
  - name: refunds
    when: event.kind == "refund"
    decide: route
    route:
      channel: C0FINANCE
      approvers:
        - group: finance-leads
          min: 2
      sla: 30m
      escalate:
        - after: 45m
          notify: ["@approvers"]
        - after: 2h
          notify: [U0CFO]
      expires_after: 24h
      warn_before: 1h
      on_expiry: {on_expiry}
default:
  decide: route
  route: {{channel: C0APPROVALS, approvers: [{{group: approvers}}]}}
"""


def policy(tmp_path: Path, on_expiry: str = "expire") -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(on_expiry=on_expiry))
    return str(path)


async def routed(env: SlackRunning) -> str:
    raw, headers = sign(event_body(callback_url=env.sink.url))
    response = await env.client.post("/v1/events", data=raw, headers=headers)
    answer = await response.json()
    assert answer["status"] == "pending", answer
    return str(answer["request_id"])


def thread(env: SlackRunning, card_ts: str) -> list[str]:
    return [m.text for m in env.slack.messages("C0FINANCE", thread_ts=card_ts)]


def dms(env: SlackRunning, user: str) -> list[str]:
    channel = env.slack.dm_channel(user)
    return [] if channel is None else [m.text for m in env.slack.messages(channel)]


async def card(env: SlackRunning, request_id: str) -> Request:
    async with env.services.sessions() as session:
        request = await session.get(Request, request_id)
    assert request is not None
    return request


async def card_text(env: SlackRunning, request: Request) -> str:
    [message] = [m for m in env.slack.messages("C0FINANCE") if m.ts == request.card_ts]
    return str(message.blocks)


async def test_the_escalation_ladder_walked_with_a_controlled_clock(
    db_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(datetime.now(UTC))
    async with slack_app(db_url, clock=clock, SIGNOFF_POLICY_PATH=policy(tmp_path)) as env:
        request_id = await routed(env)
        await outbox_settled(env, only_due=True)
        request = await card(env, request_id)
        assert request.card_ts is not None
        tick = env.services.scheduler.tick

        clock.advance(timedelta(minutes=29))
        assert (await tick()).fired == []  # nothing is due yet

        clock.advance(timedelta(minutes=2))  # 31m: the SLA is breached
        [fired] = (await tick()).fired
        assert [k.value for k, _ in fired.notices] == ["sla_breached"]
        await outbox_settled(env, only_due=True)
        assert any("SLA of 30m breached" in text for text in thread(env, request.card_ts))
        # The reminder DMs the approvers who have not voted: the finance leads.
        assert all(any("past its SLA" in t for t in dms(env, u)) for u in ("UA1", "UA2"))

        assert (await tick()).fired == []  # the same moment again: nothing twice

        clock.advance(timedelta(minutes=15))  # 46m: level 1
        [fired] = (await tick()).fired
        assert [(k.value, n) for k, n in fired.notices] == [("escalation", 1)]
        await outbox_settled(env, only_due=True)
        level_1 = [t for t in thread(env, request.card_ts) if "Escalation, level 1" in t]
        assert len(level_1) == 1 and "<!subteam^S0APP>" in level_1[0]
        assert "Escalated* (level 1 of 2)" in await card_text(env, await card(env, request_id))

        clock.advance(timedelta(hours=1, minutes=15))  # 2h01m: level 2, the CFO by DM
        await tick()
        await outbox_settled(env, only_due=True)
        assert any("escalation level 2" in t for t in dms(env, "U0CFO"))

        clock.advance(timedelta(hours=21))  # 23h01m: the expiry warning
        [fired] = (await tick()).fired
        assert [k.value for k, _ in fired.notices] == ["expiry_warning"]
        await outbox_settled(env, only_due=True)
        assert any("Expires" in t and "it expires" in t for t in thread(env, request.card_ts))

        clock.advance(timedelta(hours=1))  # 24h01m: expired
        [fired] = (await tick()).fired
        assert fired.expired_to is not None and fired.expired_to.value == "expired"
        await outbox_settled(env, only_due=True)
        final = await card(env, request_id)
        assert final.status == "expired"
        assert final.reason == "expired: no decision within 1d"
        # Synced back as expired, never as rejected, exactly once.
        [delivery] = env.sink.deliveries
        assert delivery.body["status"] == "expired"
        assert "Expired" in await card_text(env, final)
        assert (await tick()).fired == []
        async with env.services.sessions() as session:
            kinds = list(
                await session.scalars(
                    select(AuditRecord.kind)
                    .where(AuditRecord.request_id == request_id)
                    .order_by(AuditRecord.seq)
                )
            )
    assert [k for k in kinds if k.startswith("request.")] == [
        "request.sla_breached",
        "request.escalation",
        "request.escalation",
        "request.expiry_warning",
        "request.expired",
    ]


async def test_on_expiry_approve_is_said_and_synced_as_approved(
    db_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(datetime.now(UTC))
    settings = {"SIGNOFF_POLICY_PATH": policy(tmp_path, on_expiry="approve")}
    async with slack_app(db_url, clock=clock, **settings) as env:
        request_id = await routed(env)
        await outbox_settled(env, only_due=True)
        clock.advance(timedelta(hours=25))
        await env.services.scheduler.tick()
        await outbox_settled(env, only_due=True)
        request = await card(env, request_id)
    assert request.status == "approved"
    assert "on_expiry: approve" in request.reason
    assert [d.body["status"] for d in env.sink.deliveries] == ["approved"]


async def test_a_vote_deciding_first_wins_over_the_sweep(db_url: str, tmp_path: Path) -> None:
    clock = ManualClock(datetime.now(UTC))
    async with slack_app(db_url, clock=clock, SIGNOFF_POLICY_PATH=policy(tmp_path)) as env:
        request_id = await routed(env)
        await outbox_settled(env, only_due=True)
        answer = {"request_id": request_id, "version": "1"}
        assert await click(env, "signoff_reject", answer, "UA1") == 200  # opens the modal
        [opened] = await env.slack.wait_for_calls("views.open")
        view = opened.params["view"]
        view = json.loads(view) if isinstance(view, str) else view
        body = view_submission(
            callback_id="signoff_reject_reason",
            metadata=view["private_metadata"],
            reason="not this one",
            user="UA1",
        )
        response = await env.client.post("/slack/events", data=body, headers=signed(body))
        assert response.status == 200
        clock.advance(timedelta(hours=25))
        assert (await env.services.scheduler.tick()).fired == []
        await outbox_settled(env, only_due=True)
        request = await card(env, request_id)
    assert request.status == "rejected"
    assert [d.body["status"] for d in env.sink.deliveries] == ["rejected"]


async def test_a_restart_catches_up_on_what_came_due_while_down(
    db_url: str, tmp_path: Path
) -> None:
    clock = ManualClock(datetime.now(UTC))
    settings = {"SIGNOFF_POLICY_PATH": policy(tmp_path)}
    async with slack_app(db_url, clock=clock, **settings) as env:
        request_id = await routed(env)
        await outbox_settled(env, only_due=True)
    # Down for 3 hours: the SLA, both escalation levels came due meanwhile.
    clock.advance(timedelta(hours=3))
    async with slack_app(db_url, clock=clock, **settings) as env:
        [fired] = (await env.services.scheduler.tick()).fired
        assert fired.request_id == request_id
        assert [(k.value, n) for k, n in fired.notices] == [
            ("sla_breached", 0),
            ("escalation", 1),
            ("escalation", 2),
        ]
        assert (await env.services.scheduler.tick()).fired == []
        request = await card(env, request_id)
    assert (request.escalation_level, request.sla_reminded, request.expiry_warned) == (
        2,
        True,
        False,
    )
    assert request.next_due_at is not None
    assert request.next_due_at.replace(tzinfo=UTC) == (
        request.expires_at.replace(tzinfo=UTC) - timedelta(hours=1)
    )
