"""Outbox jobs: side effects written in the same transaction as the change that causes them.

A job's life: `pending` → (claimed) `running` → `done`, or back to `pending` for a later attempt,
or `dead` once retrying is pointless; an operator may `replay` a dead job, which makes it pending
again under the same idempotency key (the far side dedupes on it).

A claim is a lease: `locked_until` says how long the claiming worker owns the job. A worker that
crashes, hangs or loses the database simply lets the lease run out and another worker claims the
job again. Every state change after a claim is guarded by the claim's `(attempts, locked_until)`
pair, so a worker that outlived its lease cannot overwrite what the newer claim recorded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Integer, Row, Select, and_, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from connectors.redaction import redact_text
from storage.audit import AuditEntry, append, append_sync
from storage.errors import InvalidTransition, NotFound
from storage.models import JobStatus, OutboxJob, Request, RequestStatus, new_id, table_of
from storage.types import UTCDateTime

# Long enough for a status line and a body snippet; an error is a hint, not a log archive.
MAX_ERROR_CHARS = 2000
# Who the audit chain names for changes the worker makes on its own.
OUTBOX_ACTOR = "system:outbox"


def job_row(
    *,
    kind: str,
    idempotency_key: str,
    payload: dict[str, Any],
    now: datetime,
    request_id: str | None = None,
) -> dict[str, Any]:
    """A new pending job as a row for a core `insert(OutboxJob)` (batched with other rows)."""
    return {
        "id": new_id("j"),
        "kind": kind,
        "request_id": request_id,
        "idempotency_key": idempotency_key,
        "payload": payload,
        "status": JobStatus.pending.value,
        "attempts": 0,
        "next_attempt_at": now,
        "locked_until": None,
        "last_error": "",
        "created_at": now,
        "updated_at": now,
        "done_at": None,
    }


def request_job(kind: str, key: str, request_id: str, now: datetime) -> dict[str, Any]:
    """A job about one request whose handler reads the request when it runs; its idempotency
    key is `<key>-<request id>`, so the same side effect is never queued twice."""
    return job_row(
        kind=kind,
        idempotency_key=f"{key}-{request_id}",
        payload={"request_id": request_id},
        request_id=request_id,
        now=now,
    )


def sync_back_job(request_id: str, sync_kind: str, now: datetime) -> dict[str, Any]:
    # One sync-back per request: the key doubles as the delivery id the far side dedupes on.
    return request_job(sync_kind, "sync", request_id, now)


@dataclass(frozen=True)
class ClaimedJob:
    """A job as one worker claimed it. `attempts` is this attempt's number (1 for the first);
    together with `locked_until` it identifies the claim (the lease token)."""

    id: str
    kind: str
    request_id: str | None
    idempotency_key: str
    payload: dict[str, Any]
    attempts: int
    locked_until: datetime
    # When it became due (its `next_attempt_at` when claimed): how long it waited.
    due_at: datetime | None = None
    # What the handler's `prepare` read for this job in the claim's own transaction (bot.worker),
    # or None: the handler then reads for itself.
    prepared: Any = None


@dataclass(frozen=True)
class JobView:
    """A job's whole state, for operators (`signoff requests show`, `signoff replay`)."""

    id: str
    kind: str
    request_id: str | None
    idempotency_key: str
    payload: dict[str, Any]
    status: JobStatus
    attempts: int
    next_attempt_at: datetime
    locked_until: datetime | None
    last_error: str
    created_at: datetime
    updated_at: datetime
    done_at: datetime | None
    # What the far side handed back on success (a silence id...).
    result: dict[str, Any] | None = None


def _view(job: OutboxJob) -> JobView:
    return JobView(
        id=job.id,
        kind=job.kind,
        request_id=job.request_id,
        idempotency_key=job.idempotency_key,
        payload=job.payload,
        status=JobStatus(job.status),
        attempts=job.attempts,
        next_attempt_at=job.next_attempt_at,
        locked_until=job.locked_until,
        last_error=job.last_error,
        created_at=job.created_at,
        updated_at=job.updated_at,
        done_at=job.done_at,
        result=job.result,
    )


def clean_error(error: str) -> str:
    """What may be stored or audited of an error text: secrets masked, length bounded."""
    # Cut before masking too: the masking regexes cost more than linear time on long runs of
    # letters, and an error text may quote whatever a remote server answered. A secret cut at
    # this boundary lies far beyond what is kept below.
    masked = redact_text(error[: MAX_ERROR_CHARS * 4])
    if len(masked) > MAX_ERROR_CHARS:
        masked = masked[: MAX_ERROR_CHARS - 1] + "…"
    return masked


async def enqueue(
    session: AsyncSession,
    *,
    kind: str,
    idempotency_key: str,
    payload: dict[str, Any],
    now: datetime,
    request_id: str | None = None,
) -> str:
    """Add a job in the caller's transaction; returns its id.

    The same idempotency key twice is one job: the second call inserts nothing and returns the
    first job's id (whatever its payload), so a retried intake cannot send a callback twice.
    """
    row = job_row(
        kind=kind, idempotency_key=idempotency_key, payload=payload, now=now, request_id=request_id
    )
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(OutboxJob)
        .values(row)
        .on_conflict_do_nothing(index_elements=[OutboxJob.idempotency_key])
        .returning(OutboxJob.id)
    )
    inserted = (await session.execute(statement)).scalar_one_or_none()
    if inserted is not None:
        return inserted
    # On PostgreSQL a conflicting insert by a concurrent transaction is waited for before
    # ON CONFLICT decides, so by now the other row is committed and visible to this statement.
    existing = await session.scalar(
        select(OutboxJob.id).where(OutboxJob.idempotency_key == idempotency_key)
    )
    assert existing is not None, "ON CONFLICT skipped the insert, so the key must exist"
    return existing


def _due(*, expired_leases: bool) -> ColumnElement[bool]:
    """Pending and past its next attempt; or (`expired_leases`) running past its lease; as of
    the statement's `now` parameter."""
    now = bindparam("now", type_=UTCDateTime())
    if expired_leases:
        return and_(OutboxJob.status == JobStatus.running.value, OutboxJob.locked_until < now)
    return and_(OutboxJob.status == JobStatus.pending.value, OutboxJob.next_attempt_at <= now)


# The worker's statements are built once, with parameters: building and caching a statement
# cost the worker more than SQLite's running it, for every claim.
_ANY_DUE = (
    select(OutboxJob.id).where(or_(_due(expired_leases=False), _due(expired_leases=True))).limit(1)
)


def any_due(session: Session, *, now: datetime) -> bool:
    """A look before claiming, in the claim's own transaction: most polls find nothing, and
    an empty claim would still write.

    The worker's claims are background units of work on SQLite's database thread
    (`storage.writer_thread`): under load they wait for the commits of the requests being
    answered (events, clicks), so side effects yield to those requests and catch up as the
    load eases. This look used to run on a connection of its own and yield by waiting for the
    write lock; but SQLite's busy handler sleeps 1 to 100 ms a try, and the database thread
    waited in it too whenever the look held the lock: the clicks' p99 was ~95 ms."""
    return session.connection().execute(_ANY_DUE, {"now": now}).first() is not None


def _due_ids(*, expired_leases: bool) -> Select[str]:
    """The ids of up to `limit` due jobs of one kind of due, oldest first.

    Each kind is its own query so that each walks `ix_outbox_jobs_due` from its oldest entry
    and stops at `limit`: one query with an OR of both made SQLite collect and sort every due
    job, so a claim cost grew with the backlog (9 ms for 32 of 20,000 here), just when the
    worker most needs to be quick.
    """
    # Expired leases are among the running rows, the jobs in flight on every worker: few,
    # whatever the backlog.
    return (
        select(OutboxJob.id)
        .where(_due(expired_leases=expired_leases))
        .order_by(OutboxJob.next_attempt_at, OutboxJob.id)
        .limit(bindparam("limit", type_=Integer))
        # PostgreSQL: rows another replica is claiming right now are skipped, not waited for,
        # and never handed out twice. SQLite renders no FOR UPDATE; its BEGIN IMMEDIATE
        # transaction (storage.db) already holds the database write lock for the whole claim.
        .with_for_update(skip_locked=True)
    )


def due_ids(now: datetime, *, expired_leases: bool, limit: int) -> Select[str]:
    """`_due_ids` with its parameters bound (to read its query plan)."""
    return _due_ids(expired_leases=expired_leases).params(now=now, limit=limit)


def _claim_statement(*, expired_leases: bool) -> Any:
    # The Core table, not the entity: the ORM's DML path costs more than the claim itself.
    jobs = table_of(OutboxJob)
    return (
        update(jobs)
        .where(jobs.c.id.in_(_due_ids(expired_leases=expired_leases).scalar_subquery()))
        .values(
            status=JobStatus.running.value,
            attempts=jobs.c.attempts + 1,
            locked_until=bindparam("locked_until", type_=UTCDateTime()),
            updated_at=bindparam("now", type_=UTCDateTime()),
        )
        .returning(
            jobs.c.id,
            jobs.c.kind,
            jobs.c.request_id,
            jobs.c.idempotency_key,
            jobs.c.payload,
            jobs.c.attempts,
            jobs.c.next_attempt_at,
        )
    )


# Expired leases first: their jobs were due before their last attempt even started.
_CLAIMS = (_claim_statement(expired_leases=True), _claim_statement(expired_leases=False))


def claim_sync(
    session: Session, *, limit: int, lease: timedelta, now: datetime
) -> list[ClaimedJob]:
    """`claim` as a synchronous unit of work (see `storage.db.TransactionRunner`)."""
    if limit <= 0:
        return []
    locked_until = now + lease
    rows: list[Row[Any]] = []
    for statement in _CLAIMS:
        wanted = limit - len(rows)
        if wanted <= 0:
            break
        parameters = {"now": now, "limit": wanted, "locked_until": locked_until}
        rows.extend(session.connection().execute(statement, parameters).all())
    # RETURNING has no order; hand jobs out oldest-due first as the claim chose them.
    rows = sorted(rows, key=lambda row: (row.next_attempt_at, row.id))
    return [
        ClaimedJob(
            id=row.id,
            kind=row.kind,
            request_id=row.request_id,
            idempotency_key=row.idempotency_key,
            payload=row.payload,
            attempts=row.attempts,
            locked_until=locked_until,
            due_at=row.next_attempt_at,
        )
        for row in rows
    ]


async def claim(
    sessions: async_sessionmaker[AsyncSession],
    *,
    worker: str,
    limit: int,
    lease: timedelta,
    now: datetime,
) -> list[ClaimedJob]:
    """Take up to `limit` due jobs for `worker` and lease them until `now + lease`.

    Due means pending and past `next_attempt_at`, or running with an expired lease (the worker
    that held it is gone). `worker` names the claimant in errors; ownership itself is the lease.
    """
    if limit <= 0:
        return []
    async with sessions() as session:
        if not await session.run_sync(lambda sync: any_due(sync, now=now)):
            return []
    async with sessions.begin() as session:
        return await session.run_sync(
            lambda sync: claim_sync(sync, limit=limit, lease=lease, now=now)
        )


@dataclass(frozen=True)
class Outcome:
    """How one claimed attempt ended: what its row and its audit record will say."""

    job: ClaimedJob
    values: dict[str, Any]
    audit_kind: str
    audit_data: dict[str, Any]

    @classmethod
    def done(
        cls,
        job: ClaimedJob,
        *,
        now: datetime,
        detail: str = "",
        result: dict[str, str] | None = None,
    ) -> Outcome:
        # `last_error` is kept: "delivered on attempt 3" is more useful next to why 1 and 2
        # failed. `result` is what the far side handed back (a silence id...).
        data: dict[str, Any] = {"detail": clean_error(detail)} if detail else {}
        values: dict[str, Any] = {"status": JobStatus.done.value, "done_at": now}
        if result:
            values["result"] = result
            data["result"] = result
        return cls(job, values, "sync.delivered", data)

    @classmethod
    def retry(cls, job: ClaimedJob, *, error: str, next_attempt_at: datetime) -> Outcome:
        error = clean_error(error)
        return cls(
            job,
            {
                "status": JobStatus.pending.value,
                "next_attempt_at": next_attempt_at,
                "last_error": error,
            },
            "sync.attempt_failed",
            {"error": error, "next_attempt_at": next_attempt_at.isoformat()},
        )

    @classmethod
    def dead(cls, job: ClaimedJob, *, error: str) -> Outcome:
        error = clean_error(error)
        return cls(
            job,
            {"status": JobStatus.dead.value, "last_error": error},
            "sync.dead_lettered",
            {"error": error},
        )


_JOBS = table_of(OutboxJob)
_HOLDING = (
    select(_JOBS.c.id, _JOBS.c.attempts, _JOBS.c.locked_until)
    .where(
        _JOBS.c.id.in_(bindparam("ids", expanding=True)),
        _JOBS.c.status == JobStatus.running.value,
    )
    .with_for_update()
)
# An outcome's UPDATE per set of columns it sets (a handful: done, retry, dead...).
_OUTCOME_UPDATES: dict[tuple[str, ...], Any] = {}


def _outcome_update(keys: tuple[str, ...]) -> Any:
    statement = _OUTCOME_UPDATES.get(keys)
    if statement is None:
        statement = _OUTCOME_UPDATES[keys] = (
            update(_JOBS)
            .where(_JOBS.c.id == bindparam("b_id"))
            .values(
                {key: bindparam(f"v_{key}", type_=_JOBS.c[key].type) for key in keys}
                | {"updated_at": bindparam("b_now", type_=UTCDateTime())}
                | {"locked_until": None}
            )
        )
    return statement


def record_outcomes(session: Session, outcomes: Sequence[Outcome], *, now: datetime) -> list[bool]:
    """Write attempts' outcomes and their audit records in the caller's transaction.

    Each applies only if its claim still holds: the job is running under this very claim. Its
    `attempts` alone would not say so: a replay resets it, so after expiry, dead-lettering and a
    replay a new claim can carry the same number; `locked_until` differs between claims. The
    result says which applied.
    Many outcomes share one transaction and a handful of statements: under load the worker
    finishes jobs faster than a commit, or a compiled statement, each would allow.
    """
    if not outcomes:
        return []
    conn = session.connection()  # Core, not the ORM's slower paths
    # Which claims still hold, read under the rows' locks (SQLite: the transaction's write
    # lock; PostgreSQL: FOR UPDATE), so the updates below cannot race another claim.
    holding = {
        (row.id, row.attempts, row.locked_until)
        for row in conn.execute(_HOLDING, {"ids": sorted({outcome.job.id for outcome in outcomes})})
    }
    applied: list[bool] = []
    # Updates of the same shape go in one executemany: a prepared statement run per row.
    updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for outcome in outcomes:
        job = outcome.job
        claim = (job.id, job.attempts, job.locked_until)
        ok = claim in holding
        holding.discard(claim)  # one outcome per claim, whatever the caller passed
        applied.append(ok)
        if ok:
            row = {f"v_{key}": value for key, value in outcome.values.items()}
            updates.setdefault(tuple(sorted(outcome.values)), []).append(
                row | {"b_id": job.id, "b_now": now}
            )
    for keys, rows in updates.items():
        conn.execute(_outcome_update(keys), rows)
    append_sync(
        session,
        [
            AuditEntry(
                kind=outcome.audit_kind,
                actor=OUTBOX_ACTOR,
                data={
                    "job_id": outcome.job.id,
                    "kind": outcome.job.kind,
                    "attempt": outcome.job.attempts,
                }
                | outcome.audit_data,
                request_id=outcome.job.request_id,
                at=now,
            )
            for outcome, ok in zip(outcomes, applied, strict=True)
            if ok
        ],
    )
    return applied


async def _record_one(
    sessions: async_sessionmaker[AsyncSession], outcome: Outcome, now: datetime
) -> bool:
    async with sessions.begin() as session:
        [applied] = await session.run_sync(record_outcomes, [outcome], now=now)
    return applied


async def complete(
    sessions: async_sessionmaker[AsyncSession],
    job: ClaimedJob,
    *,
    now: datetime,
    detail: str = "",
) -> bool:
    """Mark the claimed attempt delivered; False if the claim was lost (nothing changed)."""
    return await _record_one(sessions, Outcome.done(job, now=now, detail=detail), now)


async def retry_later(
    sessions: async_sessionmaker[AsyncSession],
    job: ClaimedJob,
    *,
    error: str,
    next_attempt_at: datetime,
    now: datetime,
) -> bool:
    """Record a failed attempt and make the job due again at `next_attempt_at`."""
    outcome = Outcome.retry(job, error=error, next_attempt_at=next_attempt_at)
    return await _record_one(sessions, outcome, now)


async def dead_letter(
    sessions: async_sessionmaker[AsyncSession],
    job: ClaimedJob,
    *,
    error: str,
    now: datetime,
) -> bool:
    """Stop retrying: the job waits for an operator's `replay`."""
    return await _record_one(sessions, Outcome.dead(job, error=error), now)


async def replay(
    sessions: async_sessionmaker[AsyncSession],
    job_id: str,
    *,
    operator: str,
    now: datetime,
) -> JobView:
    """Make a dead job due now with a fresh attempt budget and the same idempotency key.

    Raises NotFound for an unknown id and InvalidTransition unless the job is dead: replaying a
    pending, running or done job would deliver it twice.
    """
    async with sessions() as session, session.begin():
        # A guarded update rather than read-then-write: two operators replaying at once
        # get one replay and one InvalidTransition.
        replayed = (
            await session.execute(
                update(OutboxJob)
                .where(OutboxJob.id == job_id, OutboxJob.status == JobStatus.dead.value)
                .values(
                    status=JobStatus.pending.value,
                    attempts=0,
                    next_attempt_at=now,
                    locked_until=None,
                    done_at=None,
                    updated_at=now,
                )
                .returning(OutboxJob)
                .execution_options(synchronize_session=False)
            )
        ).scalar_one_or_none()
        if replayed is None:
            current = await session.scalar(select(OutboxJob.status).where(OutboxJob.id == job_id))
            if current is None:
                raise NotFound(f"no outbox job {job_id!r}")
            raise InvalidTransition(
                f"outbox job {job_id} is {current}; only a dead (dead-lettered) job can be replayed"
            )
        await append(
            session,
            [
                AuditEntry(
                    kind="operator.replay",
                    actor=operator,
                    data={
                        "job_id": replayed.id,
                        "kind": replayed.kind,
                        "idempotency_key": replayed.idempotency_key,
                        "last_error": replayed.last_error,
                    },
                    request_id=replayed.request_id,
                    at=now,
                )
            ],
        )
        return _view(replayed)


async def dead_jobs_of(session: AsyncSession, request_id: str) -> list[str]:
    """Ids of a request's dead-lettered jobs, oldest first: what replaying a request replays."""
    return list(
        await session.scalars(
            select(OutboxJob.id)
            .where(OutboxJob.request_id == request_id, OutboxJob.status == JobStatus.dead.value)
            .order_by(OutboxJob.created_at, OutboxJob.id)
        )
    )


async def queue_lost_card(
    sessions: async_sessionmaker[AsyncSession],
    request_id: str,
    *,
    kind: str,
    operator: str,
    now: datetime,
) -> str | None:
    """Queue the post-card job of a pending request whose card was never queued (it arrived
    while chat was not configured, say); returns the new job's id, or None when there is
    nothing to do: the request is decided, its card is posted, or a post-card job exists (a
    dead one is replayed with `replay`, a live one is on its way).

    The key is the intake's (`card-<request id>`), so this can never add a second card.
    """
    key = f"card-{request_id}"
    async with sessions() as session, session.begin():
        # Locking the request orders this against a vote or the intake's own card job.
        request = (
            await session.execute(
                select(Request.status, Request.card_ts)
                .where(Request.id == request_id)
                .with_for_update()
            )
        ).one_or_none()
        if request is None:
            raise NotFound(f"no request {request_id!r}")
        if request.status != RequestStatus.pending.value or request.card_ts:
            return None
        if await session.scalar(select(OutboxJob.id).where(OutboxJob.idempotency_key == key)):
            return None
        job_id = await enqueue(
            session,
            kind=kind,
            idempotency_key=key,
            payload={"request_id": request_id},
            now=now,
            request_id=request_id,
        )
        await append(
            session,
            [
                AuditEntry(
                    kind="operator.repost_card",
                    actor=operator,
                    data={"job_id": job_id, "kind": kind, "idempotency_key": key},
                    request_id=request_id,
                    at=now,
                )
            ],
        )
        return job_id


async def get_job(session: AsyncSession, job_id: str) -> JobView | None:
    job = await session.get(OutboxJob, job_id, populate_existing=True)
    return None if job is None else _view(job)


async def list_jobs_for_request(session: AsyncSession, request_id: str) -> Sequence[JobView]:
    """The request's jobs, oldest first."""
    jobs = await session.scalars(
        select(OutboxJob)
        .where(OutboxJob.request_id == request_id)
        .order_by(OutboxJob.created_at, OutboxJob.id)
    )
    return [_view(job) for job in jobs]


def insert_jobs(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Add job rows (from `job_row`) in a synchronous unit of work; a key already queued is
    skipped, so a unit of work retried after a conflict cannot queue a side effect twice."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        insert(table_of(OutboxJob)).on_conflict_do_nothing(index_elements=["idempotency_key"]),
        list(rows),
    )
