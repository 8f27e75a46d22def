"""Digests: the numbers come from SQL aggregates over one channel's requests (both databases),
the message reads as its golden file, and each scheduled digest goes out once however many
replicas tick."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update

from bot.clock import ManualClock
from connectors.events import Event
from policies.model import Decision, DecisionKind, Route
from storage import ledger
from storage.db import TransactionRunner
from storage.digests import digest_stats
from storage.ledger import Intake, IntakeResult
from storage.models import JobStatus, OutboxJob, Request
from tests.integration.conftest import slack_app
from tests.support import POLICY, event_body

UNTIL = datetime(2026, 11, 23, 9, tzinfo=UTC)  # the digest's scheduled time
SINCE = UNTIL - timedelta(days=1)


def routed(channel: str) -> Decision:
    route = Route.model_validate(
        {"channel": channel, "approvers": [{"users": ["U1"], "min": 1}], "sla": "30m"}
    )
    return Decision(kind=DecisionKind.route, rule="r", route=route)


async def seed(runner: TransactionRunner, sessions, *, channel: str, status: str, **values):
    body = event_body()
    event = Event.model_validate({**body, "delivery_id": f"t:{uuid.uuid4().hex}"})
    [result] = await ledger.record(runner, [Intake(event, routed(channel))])
    assert isinstance(result, IntakeResult) and result.request_id
    async with sessions.begin() as session:
        await session.execute(
            update(Request).where(Request.id == result.request_id).values(status=status, **values)
        )
    return result.request_id


async def test_digest_numbers_are_sql_aggregates_of_one_channel(sessions) -> None:
    runner = TransactionRunner(sessions.kw["bind"])
    now = UNTIL
    try:
        oldest = await seed(
            runner,
            sessions,
            channel="C0FIN",
            status="pending",
            created_at=now - timedelta(hours=5),
            sla_due_at=now - timedelta(hours=4, minutes=30),
            expires_at=now + timedelta(hours=3),
        )
        await seed(
            runner,
            sessions,
            channel="C0FIN",
            status="pending",
            created_at=now - timedelta(minutes=10),
            sla_due_at=now + timedelta(minutes=20),
            expires_at=now + timedelta(days=3),
        )
        # Decided in the period after 10, 20, 30 and 60 minutes: the median is 25 minutes.
        for minutes, status in (
            (10, "approved"),
            (20, "approved"),
            (30, "rejected"),
            (60, "expired"),
        ):
            decided = now - timedelta(hours=2)
            await seed(
                runner,
                sessions,
                channel="C0FIN",
                status=status,
                created_at=decided - timedelta(minutes=minutes),
                decided_at=decided,
            )
        # Not counted: cancelled (not decided by people), decided before the period, another
        # channel.
        await seed(
            runner,
            sessions,
            channel="C0FIN",
            status="cancelled",
            created_at=now - timedelta(hours=3),
            decided_at=now - timedelta(hours=2),
        )
        await seed(
            runner,
            sessions,
            channel="C0FIN",
            status="approved",
            created_at=SINCE - timedelta(hours=2),
            decided_at=SINCE - timedelta(hours=1),
        )
        other = await seed(
            runner,
            sessions,
            channel="C0OTHER",
            status="pending",
            created_at=now - timedelta(days=9),
        )
        dead = await seed(
            runner,
            sessions,
            channel="C0FIN",
            status="approved",
            created_at=SINCE - timedelta(days=2),
            decided_at=SINCE - timedelta(days=2),
        )
        async with sessions.begin() as session:
            session.add(
                OutboxJob(
                    id="j_dead",
                    kind="webhook.callback",
                    request_id=dead,
                    idempotency_key=f"sync-{dead}",
                    payload={},
                    status=JobStatus.dead.value,
                    attempts=8,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                    last_error="HTTP 500",
                )
            )
        async with sessions() as session:
            stats = await session.run_sync(
                lambda s: digest_stats(s, channel="C0FIN", since=SINCE, until=UNTIL, now=now)
            )
    finally:
        runner.close()
    assert stats.pending == 2
    assert stats.oldest is not None and stats.oldest.request_id == oldest
    assert stats.sla_breached == 1
    assert stats.expiring_soon == 1
    assert stats.decided == {"approved": 2, "rejected": 1, "expired": 1, "cancelled": 1}
    assert stats.median_seconds_to_decision == 25 * 60
    assert stats.dead_sync_backs == 1
    assert other != oldest


async def test_each_scheduled_digest_goes_out_once(db_url: str) -> None:
    # 09:05 Paris time on a Monday: the 09:00 digest is due (caught up at the first tick).
    clock = ManualClock(datetime(2026, 11, 23, 8, 5, tzinfo=UTC))
    settings = {
        "SIGNOFF_DIGEST_CRON": "0 9 * * 1-5",
        "SIGNOFF_DIGEST_TIMEZONE": "Europe/Paris",
        "SIGNOFF_POLICY_PATH": str(POLICY),
    }
    async with slack_app(db_url, clock=clock, **settings) as first:
        async with slack_app(db_url, clock=clock, **settings) as second:  # a second replica
            ticks = await asyncio.gather(
                first.services.scheduler.tick(), second.services.scheduler.tick()
            )
            again = await first.services.scheduler.tick()
            sent = [digest for tick in ticks for digest in tick.digests]
            # Either replica's worker may post a digest, each to its own Slack stand-in.
            for _ in range(100):
                async with first.services.sessions() as session:
                    jobs = (
                        await session.execute(
                            select(OutboxJob.status).where(OutboxJob.kind == "slack.digest")
                        )
                    ).all()
                if jobs and all(status == "done" for (status,) in jobs):
                    break
                await asyncio.sleep(0.05)
            digests = [
                call
                for env in (first, second)
                for call in env.slack.calls_to("chat.postMessage")
                if "Approvals digest" in str(call.params.get("text", ""))
            ]
    due = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    # Every channel the policy routes to gets one digest for 09:00 Paris, once.
    assert sorted(sent) == [("C0APPROVALS", due), ("C0FINANCE", due)]
    assert again.digests == []
    assert len(jobs) == 2
    assert sorted(str(call.params["channel"]) for call in digests) == ["C0APPROVALS", "C0FINANCE"]
