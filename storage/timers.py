"""What falls due for a pending request, and when: SLA reminder, escalation levels, the expiry
warning and the expiry itself (issue: "nothing waits silently").

Due work lives in the database, not in a scheduler's memory: each pending request stores its
progress along the ladder (`escalation_level`, `sla_reminded`, `expiry_warned`) and the earliest
moment anything is next due (`next_due_at`, indexed). A sweep (`sweep`) takes what is due, and
claims each request with an UPDATE guarded by the progress it read: with several replicas only
one UPDATE matches, and only its transaction queues the notices. A restart catches up on
whatever came due meanwhile, because the rows still say it is due.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from policies.model import OnExpiry, Route, format_duration
from storage.audit import AuditEntry, append_sync
from storage.models import Request, RequestStatus, table_of
from storage.outbox import insert_jobs, job_row, request_job, sync_back_job


@dataclass(frozen=True)
class Progress:
    """How far along its ladder a pending request is."""

    escalation_level: int = 0
    sla_reminded: bool = False
    expiry_warned: bool = False


def next_due(
    route: Route, *, created_at: datetime, expires_at: datetime | None, progress: Progress
) -> datetime | None:
    """The earliest moment something is still due for the request, or None."""
    moments: list[datetime] = []
    if route.sla is not None and not progress.sla_reminded:
        moments.append(created_at + route.sla)
    if progress.escalation_level < len(route.escalate):
        moments.append(created_at + route.escalate[progress.escalation_level].after)
    if expires_at is not None:
        warning = route.expiry_warning
        if not progress.expiry_warned and warning is not None:
            moments.append(max(expires_at - warning, created_at))
        moments.append(expires_at)
    return min(moments) if moments else None


class NoticeKind(StrEnum):
    sla_breached = "sla_breached"
    escalation = "escalation"
    expiry_warning = "expiry_warning"


@dataclass(frozen=True)
class TimerJobs:
    """Job kinds for what a sweep queues (None: not configured, e.g. no Slack)."""

    # Posts a notice in the card's thread (and pings whom it names).
    notice: str | None = None
    # DMs one notify target (a user, or each member of a user group) about a notice.
    notice_dm: str | None = None
    update_card: str | None = None
    dm_outcome: str | None = None


@dataclass(frozen=True)
class Fired:
    """What one sweep did to one request."""

    request_id: str
    notices: tuple[tuple[NoticeKind, int], ...] = ()
    expired_to: RequestStatus | None = None
    # Time from the request's creation to its expiry, when it expired.
    decided_after: timedelta | None = None


_EXPIRY_STATUS = {
    OnExpiry.expire: RequestStatus.expired,
    OnExpiry.approve: RequestStatus.approved,
    OnExpiry.reject: RequestStatus.rejected,
}
_EXPIRY_ACTOR = {"id": "signoff:expiry", "name": "expiry"}


def sweep(
    session: Session,
    *,
    now: datetime,
    jobs: TimerJobs,
    limit: int = 200,
    jobs_at: datetime | None = None,
) -> list[Fired]:
    """Fire what is due at `now` for up to `limit` requests, in the caller's transaction.
    The jobs it queues are due at `jobs_at` (default `now`).

    Each request is claimed by an UPDATE guarded by the progress this sweep read (and by
    `status = 'pending'`, so a vote that decided it meanwhile wins): another replica sweeping
    the same rows finds nothing left to match and queues nothing.
    """
    queue_at = jobs_at or now
    table = table_of(Request)
    rows = session.execute(
        select(
            table.c.id,
            table.c.route,
            table.c.created_at,
            table.c.expires_at,
            table.c.escalation_level,
            table.c.sla_reminded,
            table.c.expiry_warned,
            table.c.sync_kind,
        )
        .where(table.c.status == RequestStatus.pending.value, table.c.next_due_at <= now)
        .order_by(table.c.next_due_at)
        .limit(limit)
    ).all()
    fired: list[Fired] = []
    new_jobs: list[dict[str, Any]] = []
    entries: list[AuditEntry] = []
    # Claimed in id order, as every transaction locks requests (see storage.votes).
    for row in sorted(rows, key=lambda row: row.id):
        before = Progress(row.escalation_level, row.sla_reminded, row.expiry_warned)
        guard = (
            (table.c.id == row.id)
            & (table.c.status == RequestStatus.pending.value)
            & (table.c.escalation_level == before.escalation_level)
            & (table.c.sla_reminded == before.sla_reminded)
            & (table.c.expiry_warned == before.expiry_warned)
        )
        route = Route.model_validate(row.route) if row.route else None
        if route is None:  # nothing can be due without a route
            session.execute(update(table).where(guard).values(next_due_at=None))
            continue
        created = row.created_at
        if row.expires_at is not None and now >= row.expires_at:
            status = _EXPIRY_STATUS[route.on_expiry]
            reason = _expiry_reason(route)
            claimed = session.execute(
                update(table)
                .where(guard)
                .values(
                    status=status.value,
                    decided_at=now,
                    decided_by=[_EXPIRY_ACTOR],
                    reason=reason,
                    next_due_at=None,
                )
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                continue
            entries.append(
                AuditEntry(
                    kind="request.expired",
                    actor="signoff:expiry",
                    data={
                        "status": status.value,
                        "on_expiry": route.on_expiry.value,
                        "reason": reason,
                    },
                    request_id=row.id,
                    at=now,
                )
            )
            if row.sync_kind:
                new_jobs.append(sync_back_job(row.id, row.sync_kind, queue_at))
            if jobs.dm_outcome:
                new_jobs.append(request_job(jobs.dm_outcome, "dm-outcome", row.id, queue_at))
            if jobs.update_card:
                new_jobs.append(request_job(jobs.update_card, "card-expired", row.id, queue_at))
            fired.append(Fired(row.id, expired_to=status, decided_after=now - created))
            continue

        notices: list[tuple[NoticeKind, int]] = []
        level, reminded, warned = before.escalation_level, before.sla_reminded, before.expiry_warned
        if route.sla is not None and not reminded and now >= created + route.sla:
            notices.append((NoticeKind.sla_breached, 0))
            reminded = True
        # After downtime several levels may be due: each is announced, in order.
        while level < len(route.escalate) and now >= created + route.escalate[level].after:
            level += 1
            notices.append((NoticeKind.escalation, level))
        warning = route.expiry_warning
        if (
            row.expires_at is not None
            and warning is not None
            and not warned
            and now >= row.expires_at - warning
        ):
            notices.append((NoticeKind.expiry_warning, 0))
            warned = True
        after = Progress(level, reminded, warned)
        claimed = session.execute(
            update(table)
            .where(guard)
            .values(
                escalation_level=level,
                sla_reminded=reminded,
                expiry_warned=warned,
                next_due_at=next_due(
                    route, created_at=created, expires_at=row.expires_at, progress=after
                ),
            )
        )
        if claimed.rowcount != 1 or not notices:  # type: ignore[attr-defined]
            continue
        for kind, number in notices:
            new_jobs.extend(_notice_jobs(row.id, route, kind, number, jobs, queue_at))
            entries.append(
                AuditEntry(
                    kind=f"request.{kind.value}",
                    actor="signoff:timer",
                    data={"level": number} if kind is NoticeKind.escalation else {},
                    request_id=row.id,
                    at=now,
                )
            )
        if jobs.update_card:
            # One update shows every notice of this sweep; the key names the progress reached.
            key = f"card-timer-{level}-{int(reminded)}-{int(warned)}"
            new_jobs.append(request_job(jobs.update_card, key, row.id, queue_at))
        fired.append(Fired(row.id, notices=tuple(notices)))
    insert_jobs(session, new_jobs)
    append_sync(session, entries)
    return fired


def _expiry_reason(route: Route) -> str:
    waited = format_duration(route.expires_after) if route.expires_after else "its time"
    if route.on_expiry is OnExpiry.expire:
        return f"expired: no decision within {waited}"
    return f"expired after {waited}; the route says on_expiry: {route.on_expiry.value}"


def _notice_jobs(
    request_id: str,
    route: Route,
    kind: NoticeKind,
    level: int,
    jobs: TimerJobs,
    now: datetime,
) -> list[dict[str, Any]]:
    """The thread notice, and one DM job per target (so a failing DM retries alone)."""
    out: list[dict[str, Any]] = []
    name = f"{kind.value}-{level}" if kind is NoticeKind.escalation else kind.value
    payload = {"request_id": request_id, "notice": kind.value, "level": level}
    if jobs.notice:
        out.append(
            job_row(
                kind=jobs.notice,
                idempotency_key=f"notice-{name}-{request_id}",
                payload=payload,
                request_id=request_id,
                now=now,
            )
        )
    if not jobs.notice_dm:
        return out
    if kind is NoticeKind.escalation:
        targets = list(route.escalate[level - 1].notify)
    elif kind is NoticeKind.sla_breached:
        # The reminder goes to the approvers (the handler skips whoever has voted meanwhile).
        targets = [
            target
            for entry in route.approvers
            for target in ([entry.group] if entry.group else entry.users or [])
        ]
    else:
        targets = []
    for target in dict.fromkeys(targets):
        out.append(
            job_row(
                kind=jobs.notice_dm,
                idempotency_key=f"notice-dm-{name}-{target}-{request_id}"[:200],
                payload={**payload, "target": target},
                request_id=request_id,
                now=now,
            )
        )
    return out
