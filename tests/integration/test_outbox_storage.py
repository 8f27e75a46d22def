"""The outbox state machine on SQLite and PostgreSQL: claims, leases, guarded outcomes, replay."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from storage import audit
from storage.db import create_engine, sessionmaker
from storage.errors import InvalidTransition, NotFound
from storage.models import AuditRecord, JobStatus, OutboxJob
from storage.outbox import (
    JobView,
    claim,
    complete,
    dead_letter,
    due_ids,
    enqueue,
    get_job,
    list_jobs_for_request,
    replay,
    retry_later,
)
from storage.schema import upgrade

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
Sessions = async_sessionmaker[AsyncSession]


async def _enqueue(
    sessions: Sessions,
    key: str = "cb:r_1:approved",
    *,
    request_id: str | None = "r_1",
    now: datetime = T0,
    kind: str = "callback",
) -> str:
    async with sessions() as session, session.begin():
        return await enqueue(
            session,
            kind=kind,
            idempotency_key=key,
            payload={"url": "http://127.0.0.1:1/x", "body": {"status": "approved"}},
            request_id=request_id,
            now=now,
        )


async def _job(sessions: Sessions, job_id: str) -> JobView:
    async with sessions() as session:
        job = await get_job(session, job_id)
    assert job is not None
    return job


async def _audit_kinds(sessions: Sessions) -> list[tuple[str, dict[str, Any]]]:
    async with sessions() as session:
        records = (await session.scalars(select(AuditRecord).order_by(AuditRecord.seq))).all()
    return [(record.kind, record.data) for record in records]


async def _verify(sessions: Sessions) -> audit.VerifyResult:
    async with sessions() as session:
        result = await audit.verify(session)
    assert result.ok, result.problem
    return result


async def test_same_idempotency_key_is_one_job(sessions):
    first = await _enqueue(sessions)
    second = await _enqueue(sessions)
    other = await _enqueue(sessions, "cb:r_1:other", now=T0 + timedelta(seconds=1))

    assert first == second
    assert other != first
    async with sessions() as session:
        count = await session.scalar(select(func.count()).select_from(OutboxJob))
        jobs = await list_jobs_for_request(session, "r_1")
    assert count == 2
    assert [job.id for job in jobs] == [first, other]
    assert jobs[0].status is JobStatus.pending
    assert jobs[0].payload == {"url": "http://127.0.0.1:1/x", "body": {"status": "approved"}}


async def test_enqueue_rolls_back_with_its_transaction(sessions):
    # The outbox promise: no state change, no side effect.
    with pytest.raises(RuntimeError):
        async with sessions() as session, session.begin():
            await enqueue(
                session, kind="callback", idempotency_key="k", payload={}, request_id=None, now=T0
            )
            raise RuntimeError("the state change failed")
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(OutboxJob)) == 0


async def test_claim_leases_due_jobs_only(sessions):
    due = await _enqueue(sessions, "due", now=T0)
    later = await _enqueue(sessions, "later", now=T0 + timedelta(seconds=30))

    claimed = await claim(sessions, worker="w1", limit=10, lease=LEASE, now=T0)

    assert [job.id for job in claimed] == [due]
    job = claimed[0]
    assert (job.kind, job.request_id, job.idempotency_key, job.attempts) == (
        "callback",
        "r_1",
        "due",
        1,
    )
    assert job.locked_until == T0 + LEASE
    stored = await _job(sessions, due)
    assert stored.status is JobStatus.running
    assert stored.attempts == 1
    assert stored.locked_until == T0 + LEASE
    assert (await _job(sessions, later)).status is JobStatus.pending
    # Leased: nobody else gets it while the lease runs, even once the other job is due.
    again = await claim(
        sessions, worker="w2", limit=10, lease=LEASE, now=T0 + timedelta(seconds=30)
    )
    assert [job.id for job in again] == [later]


async def test_claim_respects_limit_in_due_order(sessions):
    ids = [await _enqueue(sessions, f"k{i}", now=T0 + timedelta(seconds=i)) for i in range(5)]
    now = T0 + timedelta(minutes=1)

    first = await claim(sessions, worker="w", limit=2, lease=LEASE, now=now)
    rest = await claim(sessions, worker="w", limit=10, lease=LEASE, now=now)

    assert [job.id for job in first] == ids[:2]
    assert [job.id for job in rest] == ids[2:]
    assert await claim(sessions, worker="w", limit=10, lease=LEASE, now=now) == []


async def test_complete_marks_done_and_audits(sessions):
    job_id = await _enqueue(sessions)
    [job] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0)

    assert await complete(sessions, job, now=T0 + timedelta(seconds=1), detail="HTTP 200")

    stored = await _job(sessions, job_id)
    assert stored.status is JobStatus.done
    assert stored.done_at == T0 + timedelta(seconds=1)
    assert stored.locked_until is None
    assert await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0 + LEASE * 10) == []
    # A second outcome for the same claim is refused: the job is no longer running.
    assert not await complete(sessions, job, now=T0 + timedelta(seconds=2))
    kinds = await _audit_kinds(sessions)
    assert kinds == [
        (
            "sync.delivered",
            {"job_id": job_id, "kind": "callback", "attempt": 1, "detail": "HTTP 200"},
        )
    ]
    await _verify(sessions)


async def test_retry_later_then_claim_again(sessions):
    job_id = await _enqueue(sessions)
    [first] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0)
    retry_at = T0 + timedelta(seconds=30)

    assert await retry_later(
        sessions, first, error="HTTP 503: busy", next_attempt_at=retry_at, now=T0
    )

    stored = await _job(sessions, job_id)
    assert (stored.status, stored.attempts, stored.last_error) == (
        JobStatus.pending,
        1,
        "HTTP 503: busy",
    )
    assert stored.next_attempt_at == retry_at
    assert (
        await claim(sessions, worker="w", limit=1, lease=LEASE, now=retry_at - timedelta(seconds=1))
        == []
    )
    [second] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=retry_at)
    assert second.id == job_id
    assert second.attempts == 2
    assert second.idempotency_key == first.idempotency_key
    kinds = await _audit_kinds(sessions)
    assert kinds[0][0] == "sync.attempt_failed"
    assert kinds[0][1]["error"] == "HTTP 503: busy"
    assert kinds[0][1]["attempt"] == 1


async def test_expired_lease_is_reclaimed_and_the_stale_worker_is_refused(sessions):
    job_id = await _enqueue(sessions)
    [stale] = await claim(sessions, worker="crashed", limit=1, lease=LEASE, now=T0)
    # Lease still running: nothing to claim.
    assert await claim(sessions, worker="w2", limit=1, lease=LEASE, now=T0 + LEASE) == []

    later = T0 + LEASE + timedelta(seconds=1)
    [fresh] = await claim(sessions, worker="w2", limit=1, lease=LEASE, now=later)
    assert fresh.id == job_id
    assert fresh.attempts == 2

    # The first worker wakes up and reports: every outcome of its lost claim is refused.
    assert not await complete(sessions, stale, now=later)
    assert not await retry_later(sessions, stale, error="x", next_attempt_at=later, now=later)
    assert not await dead_letter(sessions, stale, error="x", now=later)
    stored = await _job(sessions, job_id)
    assert (stored.status, stored.attempts) == (JobStatus.running, 2)
    assert await _audit_kinds(sessions) == []

    assert await complete(sessions, fresh, now=later)
    assert (await _job(sessions, job_id)).status is JobStatus.done


@pytest.mark.parametrize("expired_leases", [True, False])
async def test_a_claim_walks_the_due_index_instead_of_sorting_the_backlog(
    sqlite_url: str, expired_leases: bool
):
    """What keeps a claim's cost flat however many jobs wait: SQLite's plan searches
    `ix_outbox_jobs_due` in due order and stops at the limit. (One query with an OR of both
    kinds of due made it gather and sort every due job: 9 ms a claim at 20,000 here.)"""
    engine = create_engine(sqlite_url)
    await upgrade(engine)
    statement = due_ids(T0, expired_leases=expired_leases, limit=32)
    sql = str(statement.compile(engine.sync_engine, compile_kwargs={"literal_binds": True}))
    async with engine.connect() as connection:
        plan = [row[3] for row in await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")]
    await engine.dispose()

    assert any("USING INDEX ix_outbox_jobs_due" in step for step in plan), plan
    # Ties on next_attempt_at are ordered by id ("right part"); the whole set is never sorted.
    assert "USE TEMP B-TREE FOR ORDER BY" not in plan, plan


async def test_an_expired_lease_is_claimed_before_a_backlog_of_pending_jobs(sessions):
    """Expired leases and pending jobs are found by separate bounded queries (a claim's cost
    must not grow with the backlog); one claim still takes both kinds, expired leases first,
    and hands the batch out oldest-due first."""
    crashed_id = await _enqueue(sessions, "crashed", now=T0 + timedelta(seconds=5))
    [_] = await claim(
        sessions, worker="crashed", limit=1, lease=LEASE, now=T0 + timedelta(seconds=5)
    )
    backlog = [await _enqueue(sessions, f"b{i}", now=T0 + timedelta(seconds=i)) for i in range(6)]
    later = T0 + timedelta(seconds=5) + LEASE + timedelta(seconds=1)

    first = await claim(sessions, worker="w", limit=3, lease=LEASE, now=later)

    # The expired lease is in, although five pending jobs were due before it; the batch is
    # still handed out in due order.
    assert [job.id for job in first] == [backlog[0], backlog[1], crashed_id]
    assert [job.attempts for job in first if job.id == crashed_id] == [2]
    rest = await claim(sessions, worker="w", limit=10, lease=LEASE, now=later)
    assert [job.id for job in rest] == backlog[2:]


async def test_stale_claim_cannot_touch_a_replayed_job_with_the_same_attempt_number(sessions):
    # Attempt numbers repeat after a replay; the lease must still tell the claims apart.
    job_id = await _enqueue(sessions)
    [stale] = await claim(sessions, worker="a", limit=1, lease=LEASE, now=T0)
    t1 = T0 + LEASE + timedelta(seconds=1)
    [second] = await claim(sessions, worker="b", limit=1, lease=LEASE, now=t1)
    assert await dead_letter(sessions, second, error="HTTP 404", now=t1)
    await replay(sessions, job_id, operator="U0OPS", now=t1)
    [third] = await claim(sessions, worker="c", limit=1, lease=LEASE, now=t1)
    assert third.attempts == stale.attempts == 1

    assert not await complete(sessions, stale, now=t1)
    assert (await _job(sessions, job_id)).status is JobStatus.running
    assert await complete(sessions, third, now=t1)


async def test_dead_letter_and_replay(sessions):
    job_id = await _enqueue(sessions)
    [job] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0)
    assert await dead_letter(sessions, job, error="HTTP 404: no such hook", now=T0)

    dead = await _job(sessions, job_id)
    assert (dead.status, dead.last_error) == (JobStatus.dead, "HTTP 404: no such hook")
    # Dead jobs are never claimed, however long one waits.
    assert (
        await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0 + timedelta(days=30)) == []
    )

    t1 = T0 + timedelta(hours=1)
    replayed = await replay(sessions, job_id, operator="U0OPS", now=t1)

    assert replayed.id == job_id
    assert replayed.status is JobStatus.pending
    assert replayed.attempts == 0
    assert replayed.next_attempt_at == t1
    assert replayed.idempotency_key == job.idempotency_key
    [again] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=t1)
    assert (again.id, again.attempts, again.idempotency_key) == (job_id, 1, job.idempotency_key)
    assert await complete(sessions, again, now=t1)

    kinds = await _audit_kinds(sessions)
    assert [kind for kind, _ in kinds] == [
        "sync.dead_lettered",
        "operator.replay",
        "sync.delivered",
    ]
    async with sessions() as session:
        replay_record = await session.scalar(
            select(AuditRecord).where(AuditRecord.kind == "operator.replay")
        )
    assert replay_record is not None
    assert replay_record.actor == "U0OPS"
    assert replay_record.request_id == "r_1"
    assert replay_record.data["job_id"] == job_id
    result = await _verify(sessions)
    assert result.checked == 3


async def test_replay_refuses_unknown_and_live_jobs(sessions):
    job_id = await _enqueue(sessions)
    with pytest.raises(NotFound, match="j_nope"):
        await replay(sessions, "j_nope", operator="U0OPS", now=T0)
    with pytest.raises(InvalidTransition, match="is pending; only a dead"):
        await replay(sessions, job_id, operator="U0OPS", now=T0)
    [job] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0)
    with pytest.raises(InvalidTransition, match="is running"):
        await replay(sessions, job_id, operator="U0OPS", now=T0)
    await complete(sessions, job, now=T0)
    with pytest.raises(InvalidTransition, match="is done"):
        await replay(sessions, job_id, operator="U0OPS", now=T0)
    # Refusals change nothing and audit nothing.
    assert [kind for kind, _ in await _audit_kinds(sessions)] == ["sync.delivered"]


async def test_concurrent_replays_replay_once(sessions):
    job_id = await _enqueue(sessions)
    [job] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0)
    await dead_letter(sessions, job, error="HTTP 410", now=T0)

    results = await asyncio.gather(
        *(replay(sessions, job_id, operator=f"U{i}", now=T0) for i in range(4)),
        return_exceptions=True,
    )

    assert sum(not isinstance(result, BaseException) for result in results) == 1
    assert all(
        isinstance(result, InvalidTransition)
        for result in results
        if isinstance(result, BaseException)
    )
    kinds = [kind for kind, _ in await _audit_kinds(sessions)]
    assert kinds.count("operator.replay") == 1


async def test_errors_are_redacted_before_storage_and_audit(sessions):
    job_id = await _enqueue(sessions)
    [job] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0)
    token = "xoxb-1234567890-abcdefghij"
    error = f"HTTP 500 from http://127.0.0.1/hook?token=s3cr3tvalue: bad {token}"

    assert await retry_later(sessions, job, error=error, next_attempt_at=T0, now=T0)

    stored = await _job(sessions, job_id)
    assert "s3cr3tvalue" not in stored.last_error
    assert token not in stored.last_error
    assert "HTTP 500" in stored.last_error
    [(kind, data)] = await _audit_kinds(sessions)
    assert kind == "sync.attempt_failed"
    assert "s3cr3tvalue" not in data["error"]
    assert token not in data["error"]


async def test_long_errors_are_bounded(sessions):
    job_id = await _enqueue(sessions)
    [job] = await claim(sessions, worker="w", limit=1, lease=LEASE, now=T0)
    assert await dead_letter(sessions, job, error="x" * 50_000, now=T0)
    assert len((await _job(sessions, job_id)).last_error) <= 2000


async def test_get_job_unknown_is_none(sessions):
    async with sessions() as session:
        assert await get_job(session, "j_missing") is None
        assert await list_jobs_for_request(session, "r_missing") == []


async def test_concurrent_claims_never_share_a_job(db_url, engine):
    """Several workers, each on its own engine (as separate replicas would be), race to claim."""
    sessions = sessionmaker(engine)
    total = 60
    async with sessions() as session, session.begin():
        for i in range(total):
            await enqueue(
                session, kind="callback", idempotency_key=f"k{i}", payload={"i": i}, now=T0
            )
    engines = [create_engine(db_url) for _ in range(4)]
    try:
        # Every engine opens its connection before the race starts, so claims really overlap.
        for other in engines:
            async with other.connect():
                pass

        async def worker(name: str, worker_sessions: Sessions) -> list[str]:
            mine: list[str] = []
            while batch := await claim(
                worker_sessions, worker=name, limit=3, lease=LEASE, now=T0 + timedelta(seconds=1)
            ):
                mine.extend(job.id for job in batch)
                # Long enough for a claimant asleep in SQLite's busy handler (1, 2, 5 ms...) to
                # get its turn: with no pause one worker could take every batch on a busy machine.
                await asyncio.sleep(0.01)
            return mine

        results = await asyncio.gather(
            *(worker(f"w{i}", sessionmaker(other)) for i, other in enumerate(engines))
        )
    finally:
        for other in engines:
            await other.dispose()

    claimed = [job_id for result in results for job_id in result]
    assert len(claimed) == total
    assert len(set(claimed)) == total
    # More than one worker got work: the claims did run side by side.
    assert sum(1 for result in results if result) >= 2
    async with sessions() as session:
        attempts = (await session.scalars(select(OutboxJob.attempts))).all()
    assert set(attempts) == {1}


async def test_a_batch_of_outcomes_applies_each_only_under_its_own_claim(sessions):
    from storage.outbox import Outcome, record_outcomes

    taken_over = await _enqueue(sessions, "k0")
    [stale] = await claim(sessions, worker="w1", limit=1, lease=LEASE, now=T0)
    # Its lease runs out and the next claim takes it again, with three new jobs: the stale
    # claim and the current one finish in the same batch.
    later = T0 + LEASE + timedelta(seconds=1)
    first, second, failing = [await _enqueue(sessions, k, now=later) for k in ("k1", "k2", "k3")]
    claimed = {j.id: j for j in await claim(sessions, worker="w2", limit=4, lease=LEASE, now=later)}
    assert set(claimed) == {taken_over, first, second, failing}
    current = claimed[taken_over]
    outcomes = [
        Outcome.done(claimed[first], now=later),
        Outcome.done(stale, now=later),
        Outcome.retry(claimed[failing], error="HTTP 503", next_attempt_at=later + LEASE),
        Outcome.done(claimed[second], now=later, result={"silence_id": "s-1"}),
        Outcome.done(current, now=later),
    ]
    async with sessions() as session, session.begin():
        applied = await session.run_sync(lambda sync: record_outcomes(sync, outcomes, now=later))

    assert applied == [True, False, True, True, True]
    states = {job_id: await _job(sessions, job_id) for job_id in (first, second, failing)}
    assert [(states[j].status, states[j].result) for j in (first, second)] == [
        (JobStatus.done, None),
        (JobStatus.done, {"silence_id": "s-1"}),
    ]
    assert (states[failing].status, states[failing].last_error) == (JobStatus.pending, "HTTP 503")
    assert (await _job(sessions, taken_over)).status is JobStatus.done
    # One audit record per applied outcome, in the batch's order; none for the stale claim.
    assert [
        (kind, data["job_id"], data["attempt"]) for kind, data in await _audit_kinds(sessions)
    ] == [
        ("sync.delivered", first, 1),
        ("sync.attempt_failed", failing, 1),
        ("sync.delivered", second, 1),
        ("sync.delivered", taken_over, 2),
    ]
    await _verify(sessions)
