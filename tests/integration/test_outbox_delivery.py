"""Callbacks through the real worker to a real local receiver that verifies Standard Webhooks
signatures and answers whatever each test scripts (500, 429, 404, slow...)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from standardwebhooks import Webhook, WebhookVerificationError

from bot.worker import OutboxWorker
from connectors.base import FinalDecision, Voter
from connectors.errors import RetryableSyncError, TerminalSyncError
from connectors.outbound import Outbound
from connectors.webhook.callback import callback_payload, deliver_callback
from storage import audit
from storage.models import AuditRecord, JobStatus, OutboxJob
from storage.outbox import ClaimedJob, JobView, enqueue, get_job, replay

Sessions = async_sessionmaker[AsyncSession]
SECRET = "whsec_" + base64.b64encode(b"outbox-delivery-test-key-32byte").decode()
KIND = "webhook.callback"
BODY = {
    "request_id": "r_1",
    "subject": "refund/re_123",
    "version": "1",
    "status": "approved",
    "decided_by": [{"id": "U1", "name": "Dana"}],
    "reason": "",
    "decided_at": "2025-03-01T12:00:00+00:00",
}


@dataclass
class Seen:
    webhook_id: str
    timestamp: int
    body: dict[str, Any]
    at: float  # time.time() on arrival


@dataclass
class Receiver:
    """Answers each request with the next scripted behaviour, then with `default`.

    Behaviours: "ok", "500", "404", "slow" (answer 200 after `slow_for` seconds: too late),
    "429:<Retry-After value>".
    """

    script: list[str] = field(default_factory=list)
    default: str = "ok"
    slow_for: float = 0.6
    url: str = ""
    requests: list[Seen] = field(default_factory=list)
    accepted: list[Seen] = field(default_factory=list)
    bad_signatures: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            Webhook(SECRET).verify(raw, dict(request.headers))
        except WebhookVerificationError:
            self.bad_signatures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        seen = Seen(
            request.headers["webhook-id"],
            int(request.headers["webhook-timestamp"]),
            json.loads(raw),
            time.time(),
        )
        self.requests.append(seen)
        behaviour = self.script.pop(0) if self.script else self.default
        if behaviour == "ok":
            self.accepted.append(seen)
            return web.json_response({"ok": True})
        if behaviour == "slow":
            await asyncio.sleep(self.slow_for)
            return web.json_response({"ok": True})
        if behaviour.startswith("429:"):
            return web.json_response(
                {"error": "slow down"}, status=429, headers={"Retry-After": behaviour[4:]}
            )
        # Error bodies quote a credential: it must not reach our records.
        return web.Response(
            status=int(behaviour), text="failing on purpose\nleaked xoxb-1234567890-abcdefghijk"
        )


@pytest.fixture
async def receiver():
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    rec.url = str(server.make_url("/hook"))
    try:
        yield rec
    finally:
        await server.close()
    assert rec.bad_signatures == 0


@pytest.fixture
async def http():
    # The product's client: these tests pin how its failures are classified.
    async with Outbound() as client:
        yield client


class CallbackHandler:
    """Stands in for the service's callback handler: payload carries the URL and the body."""

    def __init__(self, client: Outbound, *, timeout: float = 2.0) -> None:
        self.client = client
        self.timeout = timeout

    async def __call__(self, *, job: ClaimedJob) -> None:
        await deliver_callback(
            self.client,
            url=job.payload["url"],
            payload=job.payload["body"],
            webhook_id=job.idempotency_key,
            secret=SECRET,
            timeout=self.timeout,
        )


@contextlib.asynccontextmanager
async def running(
    sessions: Sessions,
    handlers: dict[str, Any],
    *,
    max_attempts: int = 5,
    poll_interval: float = 0.05,
    **options: Any,
) -> AsyncIterator[OutboxWorker]:
    worker = OutboxWorker(
        sessions,
        handlers,
        max_attempts=max_attempts,
        backoff_base=0.01,
        backoff_max=0.05,
        poll_interval=poll_interval,
        **options,
    )
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        await worker.stop(grace=5)
        await task


async def _enqueue(
    sessions: Sessions, url: str, key: str = "cb:r_1:approved", *, kind: str = KIND
) -> str:
    async with sessions() as session, session.begin():
        return await enqueue(
            session,
            kind=kind,
            idempotency_key=key,
            payload={"url": url, "body": BODY},
            request_id="r_1",
            now=datetime.now(UTC),
        )


async def _until(
    sessions: Sessions,
    job_id: str,
    *statuses: JobStatus,
    timeout: float = 10.0,
    attempts: int | None = None,
) -> JobView:
    deadline = time.monotonic() + timeout
    while True:
        async with sessions() as session:
            job = await get_job(session, job_id)
        assert job is not None
        if job.status in statuses and (attempts is None or job.attempts >= attempts):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job stayed {job.status} (attempts {job.attempts})")
        await asyncio.sleep(0.02)


async def _audit(sessions: Sessions) -> Sequence[AuditRecord]:
    async with sessions() as session:
        records = (await session.scalars(select(AuditRecord).order_by(AuditRecord.seq))).all()
        result = await audit.verify(session)
    assert result.ok, result.problem
    return records


async def test_delivered_on_first_try(sessions, receiver, http):
    job_id = await _enqueue(sessions, receiver.url)
    async with running(sessions, {KIND: CallbackHandler(http)}) as worker:
        worker.wake()
        job = await _until(sessions, job_id, JobStatus.done, JobStatus.dead)

    assert job.status is JobStatus.done
    assert job.attempts == 1
    assert [seen.webhook_id for seen in receiver.accepted] == ["cb:r_1:approved"]
    assert receiver.accepted[0].body == BODY
    records = await _audit(sessions)
    assert [(r.kind, r.data["job_id"], r.data["attempt"]) for r in records] == [
        ("sync.delivered", job_id, 1)
    ]


async def test_server_errors_are_retried_with_the_same_webhook_id(sessions, receiver, http):
    receiver.script = ["500", "500"]
    job_id = await _enqueue(sessions, receiver.url)
    async with running(sessions, {KIND: CallbackHandler(http)}):
        job = await _until(sessions, job_id, JobStatus.done, JobStatus.dead)

    assert job.status is JobStatus.done
    assert job.attempts == 3
    assert len(receiver.requests) == 3
    assert {seen.webhook_id for seen in receiver.requests} == {"cb:r_1:approved"}
    assert len(receiver.accepted) == 1
    assert "HTTP 500" in job.last_error
    records = await _audit(sessions)
    assert [r.kind for r in records] == [
        "sync.attempt_failed",
        "sync.attempt_failed",
        "sync.delivered",
    ]
    assert [r.data["attempt"] for r in records] == [1, 2, 3]


async def test_429_retry_after_seconds_is_honoured(sessions, receiver, http):
    receiver.script = ["429:1"]
    job_id = await _enqueue(sessions, receiver.url)
    async with running(sessions, {KIND: CallbackHandler(http)}):
        job = await _until(sessions, job_id, JobStatus.done, JobStatus.dead)

    assert job.status is JobStatus.done
    first, second = receiver.requests
    # The worker's own backoff here is at most 50 ms; only Retry-After explains a 1 s wait.
    assert second.at - first.at >= 1.0
    [failed] = [r for r in await _audit(sessions) if r.kind == "sync.attempt_failed"]
    assert "HTTP 429" in failed.data["error"]
    due = datetime.fromisoformat(failed.data["next_attempt_at"])
    assert due >= datetime.fromtimestamp(first.at, UTC) + timedelta(seconds=1) - timedelta(
        milliseconds=50
    )


async def test_429_retry_after_http_date_is_honoured(sessions, receiver, http):
    wanted = (datetime.now(UTC) + timedelta(seconds=3)).replace(microsecond=0)
    receiver.script = ["429:" + format_datetime(wanted, usegmt=True)]
    job_id = await _enqueue(sessions, receiver.url)
    async with running(sessions, {KIND: CallbackHandler(http)}):
        job = await _until(sessions, job_id, JobStatus.pending, JobStatus.dead, attempts=1)

    assert job.status is JobStatus.pending
    assert job.attempts == 1
    assert job.next_attempt_at >= wanted
    assert len(receiver.requests) == 1


async def test_404_is_dead_at_once(sessions, receiver, http):
    receiver.default = "404"
    job_id = await _enqueue(sessions, receiver.url)
    async with running(sessions, {KIND: CallbackHandler(http)}):
        job = await _until(sessions, job_id, JobStatus.dead, JobStatus.done)

    assert job.status is JobStatus.dead
    assert job.attempts == 1
    assert "HTTP 404: failing on purpose leaked [redacted]" in job.last_error
    assert "xoxb-" not in job.last_error
    assert len(receiver.requests) == 1
    records = await _audit(sessions)
    assert [r.kind for r in records] == ["sync.dead_lettered"]
    assert records[0].data["error"] == job.last_error


async def test_attempts_exhausted_is_dead_with_the_last_error(sessions, receiver, http):
    receiver.default = "500"
    job_id = await _enqueue(sessions, receiver.url)
    async with running(sessions, {KIND: CallbackHandler(http)}, max_attempts=3):
        job = await _until(sessions, job_id, JobStatus.dead, JobStatus.done)

    assert job.attempts == 3
    assert job.last_error.startswith("gave up after 3 attempts; last error: callback to")
    assert "HTTP 500" in job.last_error
    assert len(receiver.requests) == 3
    assert receiver.accepted == []
    kinds = [r.kind for r in await _audit(sessions)]
    assert kinds == ["sync.attempt_failed", "sync.attempt_failed", "sync.dead_lettered"]


async def test_replayed_dead_job_is_delivered_exactly_once(sessions, receiver, http):
    receiver.script = ["404"]
    job_id = await _enqueue(sessions, receiver.url)
    async with running(sessions, {KIND: CallbackHandler(http)}) as worker:
        dead = await _until(sessions, job_id, JobStatus.dead, JobStatus.done)
        assert dead.status is JobStatus.dead
        assert receiver.accepted == []

        replayed = await replay(sessions, job_id, operator="U0OPS", now=datetime.now(UTC))
        worker.wake()
        job = await _until(sessions, job_id, JobStatus.done, JobStatus.dead)
        # A few more polls: nothing else goes out.
        await asyncio.sleep(0.3)

    assert replayed.idempotency_key == "cb:r_1:approved"
    assert job.status is JobStatus.done
    assert job.attempts == 1
    assert [seen.webhook_id for seen in receiver.accepted] == ["cb:r_1:approved"]
    assert [seen.webhook_id for seen in receiver.requests] == ["cb:r_1:approved"] * 2
    records = await _audit(sessions)
    assert [(r.kind, r.actor) for r in records] == [
        ("sync.dead_lettered", "system:outbox"),
        ("operator.replay", "U0OPS"),
        ("sync.delivered", "system:outbox"),
    ]


async def test_timeout_is_retried(sessions, receiver, http):
    receiver.script = ["slow"]
    job_id = await _enqueue(sessions, receiver.url)
    async with running(sessions, {KIND: CallbackHandler(http, timeout=0.2)}):
        job = await _until(sessions, job_id, JobStatus.done, JobStatus.dead)

    assert job.status is JobStatus.done
    assert job.attempts == 2
    [failed] = [r for r in await _audit(sessions) if r.kind == "sync.attempt_failed"]
    assert "timed out after 0.2s" in failed.data["error"]
    # Both attempts carried the same id: the late answer to the first is the far side's to dedupe.
    assert {seen.webhook_id for seen in receiver.requests} == {"cb:r_1:approved"}


async def test_callback_url_secrets_never_reach_records(sessions, receiver, http):
    receiver.script = ["500"]
    job_id = await _enqueue(sessions, receiver.url + "?token=supersecretvalue&x=1")
    async with running(sessions, {KIND: CallbackHandler(http)}):
        job = await _until(sessions, job_id, JobStatus.done, JobStatus.dead)

    assert job.status is JobStatus.done
    records = await _audit(sessions)
    stored = job.last_error + json.dumps([r.data for r in records])
    assert "HTTP 500" in stored
    assert "supersecretvalue" not in stored
    assert "xoxb-" not in stored


async def test_unreachable_receiver_is_retryable(http):
    # A port that was just free: nothing listens there.
    server = TestServer(web.Application(), host="127.0.0.1")
    await server.start_server()
    url = str(server.make_url("/hook?sig=abcdef123"))
    await server.close()

    with pytest.raises(RetryableSyncError) as raised:
        await deliver_callback(
            http, url=url, payload=BODY, webhook_id="k", secret=SECRET, timeout=2.0
        )
    assert "abcdef123" not in str(raised.value)
    assert "ClientConnectorError" in str(raised.value)


async def test_redirect_and_bad_url_are_terminal(http, receiver):
    with pytest.raises(TerminalSyncError, match="cannot be used"):
        await deliver_callback(
            http, url="ftp://example.com/x", payload=BODY, webhook_id="k", secret=SECRET, timeout=1
        )
    # 3xx is not followed: whoever answers has to be the configured receiver.
    receiver.default = "302"
    with pytest.raises(TerminalSyncError, match="HTTP 302"):
        await deliver_callback(
            http, url=receiver.url, payload=BODY, webhook_id="k", secret=SECRET, timeout=1
        )


def test_callback_payload_is_the_documented_wire_format():
    request = FinalDecision(
        request_id="r_1",
        subject="refund/re_123",
        version="2",
        status="rejected",
        decided_by=[{"id": "U1", "name": "Dana", "email": "dana@example.com"}],
        reason="too big",
        decided_at=datetime(2025, 3, 1, 12, tzinfo=UTC),
        event={"callback_url": "http://127.0.0.1:9/x", "title": "Refund"},
        votes=[Voter(id="U1", name="Dana", choice="reject", reason="too big")],
        idempotency_key="sync-r_1",
    )
    assert callback_payload(request) == {
        "request_id": "r_1",
        "subject": "refund/re_123",
        "version": "2",
        "status": "rejected",
        "decided_by": [{"id": "U1", "name": "Dana"}],
        "reason": "too big",
        "decided_at": "2025-03-01T12:00:00+00:00",
    }


# The worker itself: kinds, bugs, concurrency, wake-up and shutdown.


async def test_unknown_kind_is_dead_lettered(sessions, http):
    job_id = await _enqueue(sessions, "http://127.0.0.1:9/x", kind="carrier.pigeon")
    async with running(sessions, {KIND: CallbackHandler(http)}):
        job = await _until(sessions, job_id, JobStatus.dead, JobStatus.done)

    assert job.attempts == 1
    assert job.last_error == (
        "no handler for outbox job kind 'carrier.pigeon' (known kinds: webhook.callback)"
    )


async def test_a_handler_bug_is_retried_and_the_loop_survives(sessions):
    calls: list[str] = []

    async def buggy(*, job: ClaimedJob) -> None:
        calls.append(job.id)
        if len(calls) == 1:
            raise KeyError("callback_url")

    first = await _enqueue(sessions, "u", "k1")
    async with running(sessions, {KIND: buggy}):
        job = await _until(sessions, first, JobStatus.done, JobStatus.dead)
        second = await _enqueue(sessions, "u", "k2")
        other = await _until(sessions, second, JobStatus.done, JobStatus.dead)

    assert job.status is JobStatus.done
    assert job.attempts == 2
    assert job.last_error == "unexpected KeyError in handler: 'callback_url'"
    assert other.status is JobStatus.done
    assert calls == [first, first, second]


async def test_concurrency_is_bounded(sessions):
    running_now = 0
    peak = 0

    async def slow(*, job: ClaimedJob) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.05)
        running_now -= 1

    ids = [await _enqueue(sessions, "u", f"k{i}") for i in range(10)]
    # storage.audit.append cannot yet serialise the very first appends to an empty chain on
    # PostgreSQL (no head row to lock: both take seq 1); start from a non-empty chain so this
    # test measures the worker, not that race (reported to the lead).
    async with sessions() as session, session.begin():
        await audit.append(session, [audit.AuditEntry(kind="test.start", actor="test")])
    async with running(sessions, {KIND: slow}, concurrency=3, batch=2):
        for job_id in ids:
            await _until(sessions, job_id, JobStatus.done)

    assert peak == 3


async def test_under_a_backlog_the_worker_claims_again_once_half_its_slots_are_free(sessions):
    """A claim and its outcomes cost the database about as much whatever their size: refilled
    as each job finished, claims under load were ~10 jobs. With a backlog, the worker waits
    until half its slots are free and claims that many at once."""
    gates: dict[str, asyncio.Event] = {}
    started: list[str] = []

    async def gated(*, job: ClaimedJob) -> None:
        started.append(job.id)
        await gates.setdefault(job.id, asyncio.Event()).wait()

    async def settle() -> None:
        await asyncio.sleep(0.3)

    ids = [await _enqueue(sessions, "u", f"k{i}") for i in range(10)]
    async with running(sessions, {KIND: gated}, concurrency=4, batch=4, poll_interval=60):
        await settle()
        assert len(started) == 4
        gates.setdefault(started[0], asyncio.Event()).set()
        await settle()
        assert len(started) == 4  # one slot free of four: not yet
        gates.setdefault(started[1], asyncio.Event()).set()
        await settle()
        assert len(started) == 6  # two free: both refilled in one claim
        for job_id in ids:
            gates.setdefault(job_id, asyncio.Event()).set()
        for job_id in ids:
            await _until(sessions, job_id, JobStatus.done)
    assert sorted(set(started)) == sorted(ids)


async def test_under_a_backlog_a_lone_free_slot_still_claims_within_a_poll_interval(sessions):
    """Slow jobs may hold half the slots for long: a job that becomes due meanwhile waits at
    most a poll interval for a free slot."""
    gates: dict[str, asyncio.Event] = {}
    started: list[str] = []

    async def gated(*, job: ClaimedJob) -> None:
        started.append(job.id)
        await gates.setdefault(job.id, asyncio.Event()).wait()

    ids = [await _enqueue(sessions, "u", f"k{i}") for i in range(5)]
    async with running(sessions, {KIND: gated}, concurrency=4, batch=4, poll_interval=0.2):
        await asyncio.sleep(0.1)
        assert len(started) == 4
        gates.setdefault(started[0], asyncio.Event()).set()
        await asyncio.sleep(0.5)
        assert len(started) == 5  # one slot of four, claimed by the poll
        for job_id in ids:
            gates.setdefault(job_id, asyncio.Event()).set()
        for job_id in ids:
            await _until(sessions, job_id, JobStatus.done)


async def test_wake_claims_without_waiting_for_the_poll(sessions, receiver, http):
    async with running(sessions, {KIND: CallbackHandler(http)}, poll_interval=60) as worker:
        await asyncio.sleep(0.1)  # the first, empty claim is done; the worker is waiting
        job_id = await _enqueue(sessions, receiver.url)
        worker.wake()
        # Far less than the 60 s poll interval: only wake() can have started it.
        job = await _until(sessions, job_id, JobStatus.done, timeout=5)

    assert job.attempts == 1
    assert len(receiver.accepted) == 1


async def test_stop_finishes_quick_jobs_and_leaves_slow_ones_leased(sessions):
    release = asyncio.Event()
    started: list[str] = []

    async def handler(*, job: ClaimedJob) -> None:
        started.append(job.idempotency_key)
        if job.idempotency_key == "slow":
            await asyncio.sleep(30)
        else:
            await release.wait()

    quick = await _enqueue(sessions, "u", "quick")
    slow = await _enqueue(sessions, "u", "slow")
    worker = OutboxWorker(
        sessions, {KIND: handler}, max_attempts=3, backoff_base=0.01, backoff_max=0.05
    )
    task = asyncio.create_task(worker.run())
    while len(started) < 2:
        await asyncio.sleep(0.01)

    stopping = asyncio.create_task(worker.stop(grace=0.3))
    await asyncio.sleep(0.05)
    release.set()  # the quick job finishes inside the grace period
    await stopping
    await task

    assert worker.in_flight == 0
    async with sessions() as session:
        quick_job = await get_job(session, quick)
        slow_job = await get_job(session, slow)
    assert quick_job is not None
    assert slow_job is not None
    assert quick_job.status is JobStatus.done
    # Not failed, not retried yet: it keeps its lease until a worker may safely take it over.
    assert slow_job.status is JobStatus.running
    assert slow_job.locked_until is not None
    assert slow_job.locked_until > datetime.now(UTC)
    assert [r.kind for r in await _audit(sessions)] == ["sync.delivered"]


class Preparing:
    """A preparing handler: reads each claimed job's row in the claim's transaction, and sees
    the claim's own update there (so the read really is inside that transaction)."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.prepare_calls: list[list[str]] = []
        self.seen: dict[str, Any] = {}

    def prepare(self, session: Any, jobs: Sequence[ClaimedJob]) -> dict[str, Any]:
        self.prepare_calls.append(sorted(job.id for job in jobs))
        if self.fail:
            raise ValueError("bug in prepare")
        rows = session.execute(
            select(OutboxJob.id, OutboxJob.status).where(OutboxJob.id.in_([j.id for j in jobs]))
        )
        return {row.id: {"status_in_claim": row.status} for row in rows}

    async def __call__(self, *, job: ClaimedJob) -> None:
        self.seen[job.id] = job.prepared


async def test_a_preparing_handler_reads_for_the_whole_claim_in_its_transaction(sessions):
    ids = [await _enqueue(sessions, "u", f"k{i}") for i in range(5)]
    handler = Preparing()
    async with running(sessions, {KIND: handler}, batch=16, concurrency=16):
        for job_id in ids:
            await _until(sessions, job_id, JobStatus.done)

    # One prepare for the claimed batch, not one per job; each job got its own row's read,
    # taken after the claim marked it running (same transaction).
    assert handler.prepare_calls == [sorted(ids)]
    assert handler.seen == {job_id: {"status_in_claim": "running"} for job_id in ids}


async def test_a_failing_prepare_leaves_its_jobs_to_run_unprepared(sessions):
    job_id = await _enqueue(sessions, "u", "k")
    handler = Preparing(fail=True)
    async with running(sessions, {KIND: handler}):
        job = await _until(sessions, job_id, JobStatus.done, JobStatus.dead)

    assert job.status is JobStatus.done
    assert job.attempts == 1
    assert handler.seen == {job_id: None}
