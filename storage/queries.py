"""Lists of pending requests for people in chat (`/signoff pending`, `/signoff mine`).

Each list is one bounded query (plus a count), so an answer costs the same with ten pending
requests or ten thousand, and stays well inside Slack's three seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import EventRecord, Request, RequestStatus, Vote


@dataclass(frozen=True)
class PendingItem:
    """What a line in a list of pending requests shows."""

    id: str
    title: str
    channel: str | None
    created_at: datetime
    sla_due_at: datetime | None
    expires_at: datetime | None


@dataclass(frozen=True)
class Page:
    items: Sequence[PendingItem]
    # Matching requests in all, of which `items` are the first.
    total: int


_COLUMNS = (
    Request.id,
    Request.title,
    Request.channel,
    Request.created_at,
    Request.sla_due_at,
    Request.expires_at,
)


def _item(row: Any) -> PendingItem:
    return PendingItem(
        id=row.id,
        title=row.title,
        channel=row.channel,
        created_at=row.created_at,
        sla_due_at=row.sla_due_at,
        expires_at=row.expires_at,
    )


async def pending_in_channel(session: AsyncSession, channel: str, *, limit: int) -> Page:
    """Pending requests routed to `channel`, oldest first (ix_requests_channel_status)."""
    where = (Request.channel == channel, Request.status == RequestStatus.pending.value)
    rows = (
        await session.execute(
            select(*_COLUMNS).where(*where).order_by(Request.created_at, Request.id).limit(limit)
        )
    ).all()
    total = len(rows)
    if total == limit:
        total = int(
            await session.scalar(select(func.count()).select_from(Request).where(*where)) or 0
        )
    return Page(items=[_item(row) for row in rows], total=total)


@dataclass(frozen=True)
class Candidate:
    """A pending request someone has not voted on, with what deciding "may they approve?"
    needs: the route and the event's actor."""

    item: PendingItem
    route: dict[str, Any]
    actor_id: str
    actor_email: str


async def unvoted_pending(session: AsyncSession, user_id: str) -> list[Candidate]:
    """Pending routed requests `user_id` has not voted on, oldest first.

    Who may approve lives in each request's route (JSON), and group membership lives in Slack,
    so the caller filters these; what the database can rule out (decided requests, requests
    without a route, requests already voted on) it rules out here.
    """
    voted = exists().where(Vote.request_id == Request.id, Vote.user_id == user_id)
    rows = (
        await session.execute(
            select(
                *_COLUMNS,
                Request.route,
                Request.actor_id,
                EventRecord.body["actor"]["email"].as_string().label("actor_email"),
            )
            .join(EventRecord, EventRecord.id == Request.event_id)
            .where(
                Request.status == RequestStatus.pending.value,
                Request.route.is_not(None),
                ~voted,
            )
            .order_by(Request.created_at, Request.id)
        )
    ).all()
    return [
        Candidate(
            item=_item(row),
            route=row.route,
            actor_id=row.actor_id or "",
            actor_email=row.actor_email or "",
        )
        for row in rows
        if isinstance(row.route, dict)
    ]


async def count_pending(session: AsyncSession) -> int:
    """Requests waiting for a decision, all channels: one COUNT on the (status, created_at)
    index, cheap enough to run at every metrics scrape."""
    total = await session.scalar(
        select(func.count())
        .select_from(Request)
        .where(Request.status == RequestStatus.pending.value)
    )
    return int(total or 0)
