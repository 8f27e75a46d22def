"""A source withdrawing a subject (a resolved alert): its pending request is cancelled once,
its card is queued for an update, and the cancellation is audited, in delivery order."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from connectors.base import Cancellation
from connectors.events import Event
from policies.model import Decision, DecisionKind, Route
from storage import ledger
from storage.db import TransactionRunner
from storage.ledger import Cancel, CancelResult, Intake, IntakeResult
from storage.models import AuditRecord, OutboxJob, Request
from tests.support import event_body

ROUTE = Route.model_validate({"channel": "C1", "approvers": [{"users": ["U1"], "min": 1}]})
ROUTED = Decision(kind=DecisionKind.route, rule="r", route=ROUTE)


def event(subject: str, version: str = "1") -> Event:
    body = event_body(subject=subject, version=version)
    return Event.model_validate({**body, "delivery_id": f"t:{uuid.uuid4().hex}"})


def cancel(subject: str) -> Cancel:
    withdrawn = Cancellation(
        source="payments", subject=subject, reason="alert resolved", delivery_id="t:resolved"
    )
    return Cancel(withdrawn, card_update_kind="slack.update_card")


async def test_cancelling_a_pending_request(sessions) -> None:
    runner = TransactionRunner(sessions.kw["bind"])
    try:
        [created] = await ledger.record(runner, [Intake(event("a/1"), ROUTED)])
        assert isinstance(created, IntakeResult)
        [first] = await ledger.record(runner, [cancel("a/1")])
        [again] = await ledger.record(runner, [cancel("a/1")])
    finally:
        runner.close()

    assert first == CancelResult(created.request_id, queued_jobs=True)
    assert again == CancelResult(None)  # nothing pending any more: nothing happens twice
    async with sessions() as session:
        request = await session.get(Request, created.request_id)
        jobs = (await session.scalars(select(OutboxJob.idempotency_key))).all()
        kinds = (await session.scalars(select(AuditRecord.kind).order_by(AuditRecord.seq))).all()
    assert request is not None
    assert (request.status, request.reason) == ("cancelled", "alert resolved")
    assert request.decided_at is not None
    assert f"card-cancelled-{created.request_id}" in jobs
    assert kinds.count("request.cancelled") == 1


async def test_order_within_one_batch_is_kept(sessions) -> None:
    runner = TransactionRunner(sessions.kw["bind"])
    try:
        # Firing then resolved: ends cancelled. Resolved then firing again: ends pending.
        results = await ledger.record(
            runner,
            [
                Intake(event("b/1"), ROUTED),
                cancel("b/1"),
                cancel("c/1"),
                Intake(event("c/1"), ROUTED),
            ],
        )
    finally:
        runner.close()

    b_created, b_cancel, c_cancel, c_created = results
    assert isinstance(b_created, IntakeResult) and isinstance(c_created, IntakeResult)
    assert b_cancel == CancelResult(b_created.request_id)  # no card yet: no update queued
    assert c_cancel == CancelResult(None)
    async with sessions() as session:
        statuses = dict((await session.execute(select(Request.subject, Request.status))).all())
    assert statuses == {"b/1": "cancelled", "c/1": "pending"}
