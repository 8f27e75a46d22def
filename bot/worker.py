"""The outbox worker: claims due jobs, runs their handlers, records each outcome.

Delivery is at least once. A job is recorded `done` only after its handler returned, so a crash
between the far side accepting and the record being written repeats the delivery; the
idempotency key (sent as e.g. `webhook-id`) lets the far side drop the repeat. Any number of
workers, in one process or in several replicas, may run against one database: claims are
leases (see `storage.outbox`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol, runtime_checkable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from bot import logs
from bot.metrics import Metrics
from bot.retry import retry_delay
from connectors.base import SyncReceipt
from connectors.errors import RetryableSyncError, TerminalSyncError
from storage.db import TransactionRunner
from storage.groupcommit import GroupCommit
from storage.outbox import (
    ClaimedJob,
    Outcome,
    any_due,
    claim_sync,
    clean_error,
    record_outcomes,
)

logger = logging.getLogger(__name__)

# How often an outcome that could not be written (the database is away) is tried again.
OUTCOME_RETRY = timedelta(seconds=0.5)


class Handler(Protocol):
    """Performs one job's side effect. Returning means done (with a receipt worth keeping, or
    None); raise RetryableSyncError or TerminalSyncError to say how it failed."""

    async def __call__(self, *, job: ClaimedJob) -> SyncReceipt | None: ...


@runtime_checkable
class PreparingHandler(Handler, Protocol):
    """A handler that reads what its jobs need in the claim's own transaction, for the whole
    claimed batch at once (job id -> `ClaimedJob.prepared`), instead of a read per job."""

    def prepare(self, session: Session, jobs: Sequence[ClaimedJob]) -> Mapping[str, Any]: ...


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _default_name() -> str:
    # Only for logs: ownership of a job is its lease, not this name.
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True)
class _Outcome:
    """What one attempt came to, decided before anything is written."""

    kind: Literal["done", "retry", "dead"]
    error: str = ""
    retry_after: float | None = None
    receipt: SyncReceipt | None = None


class _OutcomeWriter(GroupCommit[Outcome, bool]):
    """Writes finished attempts' outcomes together: whatever finished while the previous write
    was committing goes into the next transaction (the intake's group commit, for the outbox)."""

    def __init__(self, write: Callable[[list[Outcome]], Awaitable[list[bool]]]) -> None:
        super().__init__()
        self._write_outcomes = write

    async def submit(self, outcome: Outcome) -> bool:
        return await self._submit(outcome)

    async def _write(self, batch: list[tuple[Outcome, asyncio.Future[bool]]]) -> None:
        try:
            applied = await self._write_outcomes([outcome for outcome, _ in batch])
        except (SQLAlchemyError, OSError) as exc:
            # The database is away: each caller retries while its claim lasts (`_record`).
            self._fail(batch, exc)
            return
        self._succeed(batch, applied)


class OutboxWorker:
    """Runs outbox jobs with at most `concurrency` handlers at a time.

    `await run()` until `await stop(grace)`. `wake()` after committing a job skips the rest of
    the poll interval. All methods must be called from the event loop the worker runs on.

    Side effects yield to requests: on SQLite, before each claim the worker waits (up to
    `yield_for` seconds) for a lull in the units that answer requests, so under a burst the
    sources and clickers get their answers first, and side effects batch up and catch up as it
    eases. Once the oldest job claimed has waited `max_lag`, it stops waiting until it has
    caught up: a steady load cannot hold side effects back for longer than about that.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        handlers: Mapping[str, Handler],
        *,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
        poll_interval: float = 0.5,
        lease: timedelta = timedelta(seconds=60),
        batch: int = 32,
        concurrency: int = 32,
        clock: Callable[[], datetime] = _utcnow,
        name: str | None = None,
        runner: TransactionRunner | None = None,
        metrics: Metrics | None = None,
        yield_for: float = 0.25,
        max_lag: timedelta = timedelta(seconds=5),
    ) -> None:
        if max_attempts < 1 or concurrency < 1 or batch < 1:
            raise ValueError("max_attempts, concurrency and batch must be at least 1")
        self._sessions = sessions
        # With a runner (the service shares the intake's), claims and outcomes each take one
        # hop to the database; without one they go through the async sessions.
        self._runner = runner
        self._yield_for = yield_for
        self._max_lag = max_lag
        self._lag_since = clock()  # the due time of the oldest job of the last claim
        self._outcomes = _OutcomeWriter(self._write_outcomes)
        self._metrics = metrics or Metrics()
        self._handlers = dict(handlers)
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._poll_interval = poll_interval
        self._lease = lease
        self._batch = batch
        self._concurrency = concurrency
        self._clock = clock
        self.name = name or _default_name()
        self._wake = asyncio.Event()
        self._stopping = False
        self._loop_done = asyncio.Event()
        self._loop_done.set()  # not running yet
        self._inflight: set[asyncio.Task[None]] = set()
        # True while the last claim came back full: more jobs are probably due, so a freed
        # slot should claim again at once rather than at the next poll.
        self._backlog = False
        # Under a backlog, the slots freed to claim again: half of them. Refilled as each job
        # finished, claims averaged ~10 jobs under load, and a claim and its outcomes cost the
        # database thread about as much per unit whatever its size. A poll interval after the
        # last claim, any free slot claims (slow jobs hold the rest; new ones must not wait).
        self._refill_at = max(1, concurrency // 2)
        self._last_claim = float("-inf")  # event-loop time

    def wake(self) -> None:
        """Claim now instead of at the next poll (a job was just enqueued and committed)."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def run(self) -> None:
        """Claim and run jobs until `stop()`."""
        if not self._loop_done.is_set():
            raise RuntimeError(f"outbox worker {self.name} is already running")
        self._loop_done.clear()
        try:
            while not self._stopping:
                # Cleared before claiming: a wake() during the claim makes the pause below
                # return at once instead of being lost.
                self._wake.clear()
                capacity = self._concurrency - len(self._inflight)
                if capacity > 0 and self._may_claim(capacity):
                    wanted = min(self._batch, capacity)
                    self._last_claim = asyncio.get_running_loop().time()
                    jobs = await self._claim(wanted)
                    self._backlog = len(jobs) == wanted
                    for job in jobs:
                        self._start(job)
                    if self._backlog and self._concurrency - len(self._inflight) >= self._refill_at:
                        continue
                await self._pause()
        except asyncio.CancelledError:
            # Cancelled instead of stopped: do not leave handlers running unowned. Their jobs
            # keep their leases and are retried when the leases expire.
            await self._cancel_inflight()
            raise
        finally:
            self._loop_done.set()

    def _may_claim(self, capacity: int) -> bool:
        if not self._backlog or capacity >= self._refill_at:
            return True
        return asyncio.get_running_loop().time() - self._last_claim >= self._poll_interval

    async def stop(self, grace: float) -> None:
        """Stop claiming; give in-flight jobs `grace` seconds, then cancel the rest.

        A cancelled job records nothing: it keeps its lease and is claimed again once the lease
        expires (the far side dedupes the repeat by its idempotency key). A job whose handler
        already finished always gets its outcome written.
        """
        self._stopping = True
        self._wake.set()
        await self._loop_done.wait()
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=grace)
        if self._inflight:
            logger.warning(
                "outbox worker %s stopping: %d job(s) did not finish within %.1fs; "
                "they will be retried after their leases expire",
                self.name,
                len(self._inflight),
                grace,
            )
            await self._cancel_inflight()

    async def _cancel_inflight(self) -> None:
        tasks = set(self._inflight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _pause(self) -> None:
        try:
            async with asyncio.timeout(self._poll_interval):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _claim(self, limit: int) -> list[ClaimedJob]:
        if self._runner is not None and self._clock() - self._lag_since < self._max_lag:
            await self._runner.quiet(self._yield_for)
        now = self._clock()

        def claim_and_prepare(session: Session) -> list[ClaimedJob]:
            if not any_due(session, now=now):
                return []
            return self._prepare(
                session, claim_sync(session, limit=limit, lease=self._lease, now=now)
            )

        try:
            if self._runner is not None:
                jobs = await self._runner.run(claim_and_prepare, background=True)
                # Claimed oldest-due first: how long the oldest has waited.
                self._lag_since = (jobs[0].due_at or now) if jobs else now
                return jobs
            async with self._sessions.begin() as session:
                return await session.run_sync(claim_and_prepare)
        except (SQLAlchemyError, OSError):
            # The loop must outlive a database outage or failover: log, wait a poll interval,
            # try again. Nothing was claimed, so nothing is lost.
            logger.exception("outbox worker %s could not claim jobs", self.name)
            return []

    def _prepare(self, session: Session, jobs: list[ClaimedJob]) -> list[ClaimedJob]:
        """Let each preparing handler read for its claimed jobs, in the claim's transaction."""
        by_kind: dict[str, list[ClaimedJob]] = {}
        for job in jobs:
            by_kind.setdefault(job.kind, []).append(job)
        prepared: dict[str, Any] = {}
        for kind, batch in by_kind.items():
            handler = self._handlers.get(kind)
            if not isinstance(handler, PreparingHandler):
                continue
            try:
                prepared.update(handler.prepare(session, batch))
            except SQLAlchemyError:
                raise  # the claim is rolled back with it and tried again at the next poll
            except Exception:
                # A bug in a prepare step must not stop the claims of every other job: its jobs
                # run unprepared, and their handlers read (and fail) on their own.
                logger.exception("outbox: preparing %d %s job(s) failed", len(batch), kind)
        return [
            replace(job, prepared=prepared[job.id]) if job.id in prepared else job for job in jobs
        ]

    def _start(self, job: ClaimedJob) -> None:
        task = asyncio.create_task(self._process(job), name=f"outbox:{job.id}")
        self._inflight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # _process handles every failure it expects; this is a bug in the worker itself.
            # The job keeps its lease and is retried when it expires.
            logger.error("outbox task %s crashed", task.get_name(), exc_info=exc)
        if self._backlog and self._concurrency - len(self._inflight) >= self._refill_at:
            self._wake.set()

    async def _process(self, job: ClaimedJob) -> None:
        # This task's lines (the handler's too) carry the request's correlation id, whichever
        # process took the event in (bot.logs); a job of no request (a digest) has its own.
        logs.bind(job.request_id or job.id)
        outcome = await self._attempt(job)
        # Once the handler has finished its side effect happened (or failed): record that even
        # if stop() cancels us now, or the next worker would repeat a finished delivery.
        record = asyncio.ensure_future(self._record(job, outcome))
        try:
            await asyncio.shield(record)
        except asyncio.CancelledError:
            await record
            raise

    async def _attempt(self, job: ClaimedJob) -> _Outcome:
        if job.attempts > self._max_attempts:
            # Only claims of expired leases get here: earlier attempts crashed or hung the
            # worker running them. Running it yet again could crash this one too.
            return _Outcome(
                "dead",
                f"gave up after {job.attempts - 1} attempts that did not finish "
                "(worker crashed, hung or was stopped before recording an outcome)",
            )
        handler = self._handlers.get(job.kind)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            return _Outcome(
                "dead", f"no handler for outbox job kind {job.kind!r} (known kinds: {known})"
            )
        try:
            receipt = await handler(job=job)
        except RetryableSyncError as exc:
            return _Outcome("retry", str(exc), exc.retry_after)
        except TerminalSyncError as exc:
            return _Outcome("dead", str(exc))
        except Exception as exc:
            # A handler bug must not kill the loop that runs every other job, nor silently drop
            # this one: log it with its traceback and retry it like a transient failure, so the
            # attempt budget dead-letters it (visibly, replayably) if the bug persists.
            logger.exception(
                "outbox job %s (%s, attempt %d) failed unexpectedly", job.id, job.kind, job.attempts
            )
            return _Outcome("retry", f"unexpected {type(exc).__name__} in handler: {exc}")
        return _Outcome("done", receipt=receipt)

    async def _write_outcomes(self, outcomes: list[Outcome]) -> list[bool]:
        now = self._clock()
        if self._runner is not None:
            return await self._runner.run(
                lambda session: record_outcomes(session, outcomes, now=now), background=True
            )
        async with self._sessions.begin() as session:
            return await session.run_sync(record_outcomes, outcomes, now=now)

    async def _record(self, job: ClaimedJob, outcome: _Outcome) -> None:
        now = self._clock()
        if outcome.kind == "done":
            logger.info(
                "outbox job %s (%s) done at attempt %d",
                job.id,
                job.kind,
                job.attempts,
                extra={"job_kind": job.kind, "outcome": "done"},
            )
            self._metrics.outbox.labels(job.kind, "done").inc()
            receipt = outcome.receipt
            stored = Outcome.done(
                job,
                now=now,
                detail=receipt.detail if receipt else "",
                result=dict(receipt.refs) if receipt and receipt.refs else None,
            )
        elif outcome.kind == "retry" and job.attempts < self._max_attempts:
            delay = retry_delay(
                job.attempts,
                base=self._backoff_base,
                cap=self._backoff_max,
                retry_after=outcome.retry_after,
            )
            logger.info(
                "outbox job %s (%s) attempt %d failed, retrying in %.1fs: %s",
                job.id,
                job.kind,
                job.attempts,
                delay,
                clean_error(outcome.error),
                extra={"job_kind": job.kind, "outcome": "retry"},
            )
            self._metrics.outbox.labels(job.kind, "retry").inc()
            stored = Outcome.retry(
                job, error=outcome.error, next_attempt_at=now + timedelta(seconds=delay)
            )
        else:
            error = outcome.error
            if outcome.kind == "retry":
                error = f"gave up after {job.attempts} attempts; last error: {error}"
            logger.warning(
                "outbox job %s (%s) dead-lettered: %s",
                job.id,
                job.kind,
                clean_error(error),
                extra={"job_kind": job.kind, "outcome": "dead"},
            )
            self._metrics.outbox.labels(job.kind, "dead").inc()
            stored = Outcome.dead(job, error=error)
        while True:
            try:
                applied = await self._outcomes.submit(stored)
                break
            except (SQLAlchemyError, OSError):
                # The far side has seen this attempt. An outcome left unwritten makes the job
                # run again when its lease expires: a repeat that a callback receiver has to
                # dedupe and that Slack cannot (a second card). A database restart or failover
                # is over in seconds, so keep trying while the claim is still ours; past the
                # lease (or when stopping) the outcome is lost, not the job: it is attempted
                # again. The loop keeps going for the other jobs meanwhile.
                retry_at = self._clock() + OUTCOME_RETRY
                if self._stopping or retry_at >= job.locked_until:
                    logger.exception(
                        "outbox job %s: could not record the outcome of attempt %d",
                        job.id,
                        job.attempts,
                    )
                    return
                logger.warning(
                    "outbox job %s: could not record the outcome of attempt %d yet, retrying",
                    job.id,
                    job.attempts,
                )
                await asyncio.sleep(OUTCOME_RETRY.total_seconds())
        if not applied:
            logger.warning(
                "outbox job %s: attempt %d finished after its lease was taken over; "
                "its outcome (%s) was not recorded",
                job.id,
                job.attempts,
                outcome.kind,
            )
