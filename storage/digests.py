"""Digests: who sends one (claimed once per channel and scheduled time) and what it says
(SQL aggregates over the channel's requests, never a load of every row)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Float, and_, cast, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import DigestRun, EventRecord, JobStatus, OutboxJob, Request, RequestStatus
from storage.outbox import insert_jobs, job_row

# "Expiring soon" means within this long of the digest.
EXPIRING_WITHIN = timedelta(hours=24)


def claim_digest(
    session: Session,
    *,
    channel: str,
    due_at: datetime,
    since: datetime,
    kind: str,
    now: datetime,
    jobs_at: datetime | None = None,
) -> bool:
    """Record that the digest of `channel` for `due_at` goes out, and queue it; False if some
    replica (or an earlier run of this one) already did. One row per (channel, due_at)."""
    values = {"channel": channel, "due_at": due_at, "created_at": now}
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    claimed = session.execute(insert(DigestRun).values(values).on_conflict_do_nothing())
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        return False
    insert_jobs(
        session,
        [
            job_row(
                kind=kind,
                idempotency_key=f"digest-{channel}-{due_at.isoformat()}",
                payload={
                    "channel": channel,
                    "since": since.isoformat(),
                    "until": due_at.isoformat(),
                },
                request_id=None,
                now=jobs_at or now,
            )
        ],
    )
    return True


@dataclass(frozen=True)
class Waiting:
    request_id: str
    title: str
    created_at: datetime


@dataclass(frozen=True)
class DigestStats:
    channel: str
    since: datetime
    until: datetime
    pending: int
    oldest: Waiting | None
    expiring_soon: int
    sla_breached: int
    # Requests of this channel decided in the period, by final status.
    decided: dict[str, int] = field(default_factory=dict)
    # Across every source: share of events in the period that policy auto-approved.
    auto_approved: int = 0
    events: int = 0
    median_seconds_to_decision: float | None = None
    dead_sync_backs: int = 0

    @property
    def auto_approve_rate(self) -> float | None:
        return self.auto_approved / self.events if self.events else None


def _seconds(later: Any, earlier: Any, dialect: str) -> ColumnElement[Any]:
    """`later - earlier` in seconds, in SQL."""
    if dialect == "postgresql":
        return func.extract("epoch", later - earlier)
    # SQLite stores these as ISO text; julianday() reads it.
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def digest_stats(
    session: Session, *, channel: str, since: datetime, until: datetime, now: datetime
) -> DigestStats:
    dialect = session.get_bind().dialect.name
    pending = and_(Request.channel == channel, Request.status == RequestStatus.pending.value)
    counts = session.execute(
        select(
            func.count(),
            func.count().filter(Request.expires_at <= now + EXPIRING_WITHIN),
            func.count().filter(Request.sla_due_at < now),
        ).where(pending)
    ).one()
    oldest_row = session.execute(
        select(Request.id, Request.title, Request.created_at)
        .where(pending)
        .order_by(Request.created_at, Request.id)
        .limit(1)
    ).one_or_none()
    in_period = and_(
        Request.channel == channel,
        Request.decided_at >= since,
        Request.decided_at < until,
        Request.status != RequestStatus.pending.value,
    )
    decided = dict(
        session.execute(
            select(Request.status, func.count()).where(in_period).group_by(Request.status)
        ).all()
    )
    # Median time to decision by people (cancelled ones were never decided): the middle row
    # by duration, found by the database with ORDER BY ... OFFSET on both backends.
    by_people = and_(
        in_period,
        Request.status.in_(
            [
                RequestStatus.approved.value,
                RequestStatus.rejected.value,
                RequestStatus.expired.value,
            ]
        ),
    )
    decided_count = session.scalar(select(func.count()).where(by_people)) or 0
    median = None
    if decided_count:
        duration = cast(_seconds(Request.decided_at, Request.created_at, dialect), Float)
        ordered = select(duration).where(by_people).order_by(duration)
        middle = session.scalars(
            ordered.offset((decided_count - 1) // 2).limit(2 - decided_count % 2)
        ).all()
        # To the second: SQLite's julianday() arithmetic carries float noise below that.
        median = float(round(sum(float(v) for v in middle) / len(middle)))
    events = session.execute(
        select(
            func.count(),
            func.count().filter(EventRecord.decision_kind == "auto_approve"),
        ).where(EventRecord.received_at >= since, EventRecord.received_at < until)
    ).one()
    dead = session.scalar(
        select(func.count())
        .select_from(OutboxJob)
        .join(Request, Request.id == OutboxJob.request_id)
        .where(
            Request.channel == channel,
            OutboxJob.status == JobStatus.dead.value,
            OutboxJob.idempotency_key.like("sync-%"),
        )
    )
    return DigestStats(
        channel=channel,
        since=since,
        until=until,
        pending=counts[0],
        oldest=Waiting(*oldest_row) if oldest_row else None,
        expiring_soon=counts[1],
        sla_breached=counts[2],
        decided={str(k): int(v) for k, v in decided.items()},
        auto_approved=events[1],
        events=events[0],
        median_seconds_to_decision=median,
        dead_sync_backs=int(dead or 0),
    )
