"""Scheduled work: the timer sweep (SLA reminders, escalations, expiry warnings, expiries) and
channel digests.

APScheduler runs `tick` every `interval` seconds; `tick` works out from the database what is
due at the clock's now and claims each item there (`storage.timers.sweep`, and one
`digest_runs` row per channel and scheduled time), so a restart catches up on what came due
meanwhile and several replicas send each notice and digest once. Tests drive `tick` with a
`ManualClock` and never sleep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy.exc import SQLAlchemyError

from bot.clock import Clock
from bot.metrics import Metrics
from bot.schedule import last_fire
from storage.db import TransactionRunner
from storage.digests import claim_digest
from storage.timers import Fired, TimerJobs, sweep

log = logging.getLogger(__name__)

# Requests fired per transaction. Small: in an HTTP process whose transactions run inline
# (storage.db.TransactionRunner), a batch holds the event loop while it runs, and a catch-up
# after downtime (hundreds due at once) must not hold clicks for long (measured: ~0.4 ms a
# request fired).
SWEEP_BATCH = 50
# How far back `since` is looked for when the schedule fired long ago (a weekly digest...).
_PERIOD_LOOKBACK = timedelta(days=35)


@dataclass(frozen=True)
class DigestPlan:
    channels: Sequence[str]
    trigger: CronTrigger
    # A scheduled digest missed by more than this (the service was down) is skipped.
    catch_up: timedelta
    kind: str


@dataclass(frozen=True)
class TickResult:
    fired: Sequence[Fired]
    digests: Sequence[tuple[str, datetime]]


class Scheduler:
    def __init__(
        self,
        runner: TransactionRunner,
        *,
        clock: Clock,
        jobs: TimerJobs,
        interval: float,
        digests: DigestPlan | None = None,
        on_queued: Callable[[Sequence[str]], None] = lambda request_ids: None,
        metrics: Metrics | None = None,
    ) -> None:
        self._runner = runner
        self._clock = clock
        self._jobs = jobs
        self._interval = interval
        self._digests = digests
        self._on_queued = on_queued
        self._metrics = metrics or Metrics()
        # Digests this process already claimed or saw claimed: no write to ask again.
        self._settled: set[tuple[str, datetime]] = set()
        self._apscheduler: AsyncIOScheduler | None = None

    def start(self) -> None:
        scheduler = AsyncIOScheduler(timezone="UTC")
        scheduler.add_job(
            self._tick_logged,
            IntervalTrigger(seconds=self._interval),
            id="signoff-tick",
            max_instances=1,  # a slow sweep is never overlapped by the next
            coalesce=True,
            next_run_time=self._clock.now(),  # catch up at start-up, before the first interval
        )
        scheduler.start()
        self._apscheduler = scheduler

    async def stop(self) -> None:
        if self._apscheduler is not None:
            # An in-flight tick finishes its transaction; claims are atomic either way.
            self._apscheduler.shutdown(wait=False)
            self._apscheduler = None

    async def _tick_logged(self) -> None:
        try:
            await self.tick()
        except (SQLAlchemyError, OSError):
            # The database is away: nothing was claimed, so the next tick does it all.
            log.exception("scheduled work could not run; retrying at the next tick")

    async def tick(self) -> TickResult:
        now = self._clock.now()
        # What a tick queues is due at once for the outbox worker, which runs on the wall
        # clock: never later than now, even when a test's clock is ahead of it.
        jobs_at = min(now, datetime.now(UTC))
        fired: list[Fired] = []
        while True:
            batch = await self._runner.run(
                lambda session: sweep(
                    session, now=now, jobs=self._jobs, limit=SWEEP_BATCH, jobs_at=jobs_at
                ),
                background=True,
            )
            fired.extend(batch)
            if len(batch) < SWEEP_BATCH:
                break
        digests = await self._send_digests(now, jobs_at)
        if fired or digests:
            self._on_queued([f.request_id for f in fired])
        for item in fired:
            what = (
                f"expired ({item.expired_to.value})"
                if item.expired_to
                else ", ".join(f"{kind.value}{level or ''}" for kind, level in item.notices)
            )
            log.info(
                "request %s: %s", item.request_id, what, extra={"correlation_id": item.request_id}
            )
            if item.decided_after is not None:
                self._metrics.decided("expiry", item.decided_after)
        return TickResult(fired, digests)

    async def _send_digests(self, now: datetime, jobs_at: datetime) -> list[tuple[str, datetime]]:
        plan = self._digests
        if plan is None:
            return []
        due = last_fire(plan.trigger, now, within=plan.catch_up)
        if due is None:
            return []
        since = last_fire(
            plan.trigger, due - timedelta(microseconds=1), within=_PERIOD_LOOKBACK
        ) or (due - timedelta(days=1))
        sent = []
        for channel in plan.channels:
            if (channel, due) in self._settled:
                continue
            claimed = await self._runner.run(
                lambda session, channel=channel: claim_digest(  # type: ignore[misc]
                    session,
                    channel=channel,
                    due_at=due,
                    since=since,
                    kind=plan.kind,
                    now=now,
                    jobs_at=jobs_at,
                ),
                background=True,
            )
            self._settled.add((channel, due))
            if claimed:
                sent.append((channel, due))
                log.info("digest for %s (scheduled %s) queued", channel, due.isoformat())
        return sent
