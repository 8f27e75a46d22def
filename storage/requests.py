"""Reading requests, and the one guarded way to decide one."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from connectors.base import FinalDecision, Voter
from storage import audit
from storage.audit import AuditEntry
from storage.errors import InvalidTransition, NotFound
from storage.models import EventRecord, OutboxJob, Request, RequestStatus, Vote, table_of
from storage.outbox import sync_back_job


class VoteView(NamedTuple):
    """A vote as views of its request show it: plain values, not an ORM object. A card is
    rendered again on every vote and lists every vote, and building entities took most of
    that read's time."""

    id: int
    user_id: str
    user_name: str
    choice: str
    reason: str
    groups: list[str] | None
    params: dict[str, Any] | None
    created_at: datetime


@dataclass(frozen=True)
class RequestView:
    """A request with everything needed to explain it: votes, decision trace, sync-back state."""

    request: Request
    event: EventRecord
    votes: Sequence[VoteView]
    jobs: Sequence[OutboxJob]

    def as_json(self) -> dict[str, Any]:
        r = self.request
        decision = self.event.decision
        return {
            "id": r.id,
            "status": r.status,
            "decision": r.decision_kind,
            "rule": r.rule,
            "source": r.source,
            "kind": r.kind,
            "subject": r.subject,
            "version": r.version,
            "title": r.title,
            "actor_id": r.actor_id,
            "created_at": r.created_at.isoformat(),
            "expires_at": r.expires_at.isoformat() if r.expires_at else None,
            "decided_at": r.decided_at.isoformat() if r.decided_at else None,
            "decided_by": r.decided_by,
            "reason": r.reason,
            "superseded_by": r.superseded_by,
            "route": r.route,
            "votes": [
                {
                    "user_id": v.user_id,
                    "user_name": v.user_name,
                    "choice": v.choice,
                    "reason": v.reason,
                    "params": v.params or {},
                    "at": v.created_at.isoformat(),
                }
                for v in self.votes
            ],
            "trace": decision.get("trace", []),
            "shadow": decision.get("shadow", []),
            "failed_closed": decision.get("failed_closed", False),
            "sync": [
                {
                    "job_id": j.id,
                    "kind": j.kind,
                    "status": j.status,
                    "attempts": j.attempts,
                    "next_attempt_at": j.next_attempt_at.isoformat(),
                    "last_error": j.last_error,
                    "result": j.result or {},
                }
                for j in self.jobs
            ],
        }


async def get_request(session: AsyncSession, request_id: str) -> RequestView:
    return await session.run_sync(read_request, request_id)


class EventCache:
    """Recorded events, kept by whoever reads the same requests again and again (the Slack
    jobs render a card on every vote). An event never changes once recorded, and reading it
    (its JSON body parsed, an entity built) was the larger part of such a read. Bounded; its
    entities are detached, read-only copies: each leaves its session as soon as it is read,
    so that a transaction that fails afterwards (a dropped connection) cannot expire it, which
    would leave the cache a copy that no later read can use."""

    def __init__(self, limit: int = 2_000) -> None:
        self._limit = limit
        self._events: dict[str, EventRecord] = {}

    def read(self, session: Session, event_id: str) -> EventRecord | None:
        event = self._events.get(event_id)
        if event is None:
            event = session.get(EventRecord, event_id)
            if event is None:
                return None
            session.expunge(event)
            if len(self._events) >= self._limit:
                self._events.clear()
            self._events[event_id] = event
        return event


_REQUEST = select(Request).where(Request.id == bindparam("request_id"))
_VOTES = table_of(Vote)
_VOTES_OF_REQUEST = (
    select(*(_VOTES.c[name] for name in VoteView._fields))
    .where(_VOTES.c.request_id == bindparam("request_id"))
    .order_by(_VOTES.c.created_at, _VOTES.c.id)
)
_VOTES_AFTER = (
    select(*(_VOTES.c[name] for name in VoteView._fields))
    .where(_VOTES.c.request_id == bindparam("request_id"), _VOTES.c.id > bindparam("after"))
    .order_by(_VOTES.c.id)
)


def _in_order(vote: VoteView) -> tuple[datetime, int]:
    return (vote.created_at, vote.id)


class VoteCache:
    """Requests' votes, kept by whoever reads the same requests again and again (the Slack
    jobs read every vote for each card update and thread reply: reading them all, their JSON
    columns parsed, was most of a busy request's side effects). Votes are never changed or
    deleted, and one request's votes are inserted under its row lock (storage.votes), so their
    ids grow in commit order: what the cached votes of a request lack is exactly the votes
    after its highest cached id. Bounded in requests and in votes."""

    def __init__(self, limit: int = 2_000, max_votes: int = 200_000) -> None:
        self._limit = limit
        self._max_votes = max_votes
        self._held = 0
        self._votes: dict[str, tuple[tuple[VoteView, ...], int]] = {}

    def read(self, session: Session, request_id: str) -> Sequence[VoteView]:
        votes, last = self._votes.get(request_id, ((), 0))
        newer = [
            VoteView._make(row)
            for row in session.connection().execute(
                _VOTES_AFTER, {"request_id": request_id, "after": last}
            )
        ]
        if not newer:
            return votes
        votes = tuple(sorted((*votes, *newer), key=_in_order))
        if len(self._votes) >= self._limit or self._held + len(newer) > self._max_votes:
            self._votes.clear()
            self._held = len(votes)
        else:
            self._held += len(newer)
        self._votes[request_id] = (votes, newer[-1].id)  # newer: after `last`, by id
        return votes


def read_request(
    session: Session,
    request_id: str,
    *,
    jobs: bool = True,
    events: EventCache | None = None,
    votes: VoteCache | None = None,
) -> RequestView:
    """`get_request` for a synchronous unit of work (`storage.db.TransactionRunner`: one hop
    for all three queries); without `jobs` when only the request and its votes are needed
    (a card, a thread reply); with `events` and `votes` when the caller keeps the events and
    votes it has read."""
    if events is None:
        row = session.execute(
            select(Request, EventRecord)
            .join(EventRecord, EventRecord.id == Request.event_id)
            .where(Request.id == request_id)
        ).one_or_none()
        request, event = row if row is not None else (None, None)
    else:
        request = session.execute(_REQUEST, {"request_id": request_id}).scalar_one_or_none()
        event = events.read(session, request.event_id) if request is not None else None
    if request is None or event is None:
        raise NotFound(f"no request {request_id!r}")
    if votes is not None:
        cast: Sequence[VoteView] = votes.read(session, request_id)
    else:
        cast = [
            VoteView._make(row)
            for row in session.connection().execute(_VOTES_OF_REQUEST, {"request_id": request_id})
        ]
    outbox: Sequence[OutboxJob] = ()
    if jobs:
        outbox = session.scalars(
            select(OutboxJob)
            .where(OutboxJob.request_id == request_id)
            .order_by(OutboxJob.created_at)
        ).all()
    return RequestView(request, event, cast, outbox)


def read_decision(session: Session, request_id: str, *, idempotency_key: str) -> FinalDecision:
    """What a sync-back needs: the request's decision, its votes and the event it was for
    (synchronous, for `storage.db.TransactionRunner`: one hop for both queries)."""
    decision = read_decisions(session, {request_id: idempotency_key}).get(request_id)
    if decision is None:
        raise NotFound(f"no request {request_id!r}")
    return decision


# What a sync-back reads, built once (the outbox worker reads it for every batch of callbacks).
_DECISIONS = (
    select(
        Request.id,
        Request.subject,
        Request.version,
        Request.status,
        Request.decided_by,
        Request.reason,
        Request.decided_at,
        EventRecord.body,
    )
    .join(EventRecord, EventRecord.id == Request.event_id)
    .where(Request.id.in_(bindparam("ids", expanding=True)))
)
_VOTERS = (
    select(Vote.request_id, Vote.user_id, Vote.user_name, Vote.choice, Vote.reason, Vote.params)
    .where(Vote.request_id.in_(bindparam("ids", expanding=True)))
    .order_by(Vote.id)
)


def read_decisions(session: Session, keys: Mapping[str, str]) -> dict[str, FinalDecision]:
    """`read_decision` for several requests at once (request id -> idempotency key), in two
    queries whatever their number; requests that do not exist are left out."""
    if not keys:
        return {}
    ids = sorted(keys)
    conn = session.connection()
    rows = conn.execute(_DECISIONS, {"ids": ids}).all()
    if not rows:
        return {}
    votes: dict[str, list[Voter]] = defaultdict(list)
    for v in conn.execute(_VOTERS, {"ids": ids}):
        votes[v.request_id].append(
            Voter(
                id=v.user_id,
                name=v.user_name,
                choice=v.choice,
                reason=v.reason,
                params=v.params or {},
            )
        )
    return {
        row.id: FinalDecision(
            request_id=row.id,
            subject=row.subject,
            version=row.version,
            status=row.status,
            decided_by=row.decided_by or [],
            reason=row.reason or "",
            decided_at=row.decided_at,
            event=row.body,
            votes=votes.get(row.id, []),
            idempotency_key=keys[row.id],
        )
        for row in rows
    }


async def get_decision(
    session: AsyncSession, request_id: str, *, idempotency_key: str
) -> FinalDecision:
    """`read_decision` on an async session."""
    return await session.run_sync(
        lambda sync: read_decision(sync, request_id, idempotency_key=idempotency_key)
    )


async def get_status(session: AsyncSession, request_id: str) -> str | None:
    return await session.scalar(select(Request.status).where(Request.id == request_id))


async def list_requests(
    session: AsyncSession, *, status: str | None = None, limit: int = 50
) -> Sequence[Request]:
    query = select(Request).order_by(Request.created_at.desc(), Request.id).limit(limit)
    if status is not None:
        query = query.where(Request.status == status)
    return (await session.scalars(query)).all()


async def decide(
    sessions: async_sessionmaker[AsyncSession],
    request_id: str,
    *,
    status: RequestStatus,
    decided_by: list[dict[str, str]],
    reason: str,
    actor: str,
    now: datetime,
) -> bool:
    """Move a pending request to a final status, once. Returns False if it was already final.

    The `WHERE status = 'pending'` guard makes this exactly-once under concurrent callers on any
    backend: only one UPDATE can match, and only its transaction enqueues the sync-back job.
    """
    if not status.is_final:
        raise InvalidTransition("a request can only be decided to a final status")
    async with sessions.begin() as session:
        changed = await session.execute(
            update(Request)
            .where(Request.id == request_id, Request.status == RequestStatus.pending.value)
            .values(status=status.value, decided_by=decided_by, reason=reason, decided_at=now)
            .returning(Request.sync_kind)
        )
        row = changed.one_or_none()
        if row is None:
            if await get_status(session, request_id) is None:
                raise NotFound(f"no request {request_id!r}")
            return False
        if row.sync_kind:
            await session.execute(
                insert(OutboxJob), [sync_back_job(request_id, row.sync_kind, now)]
            )
        await audit.append(
            session,
            [
                AuditEntry(
                    kind="request.decided",
                    actor=actor,
                    data={"status": status.value, "decided_by": decided_by, "reason": reason},
                    request_id=request_id,
                    at=now,
                )
            ],
        )
    return True


class StatusWatch:
    """Wakes long polls in this process when a request changes. Other replicas' changes are
    seen by the poller's periodic re-read, so a missed wake-up costs latency, never a result."""

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, request_ids: Sequence[str | None]) -> None:
        for request_id in request_ids:
            if request_id is None:
                continue
            for waiter in self._waiters.pop(request_id, ()):
                waiter.set()

    async def wait(self, request_id: str, timeout: float) -> None:
        waiter = asyncio.Event()
        self._waiters[request_id].add(waiter)
        try:
            await asyncio.wait_for(waiter.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(request_id)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[request_id]
