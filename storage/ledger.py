"""Recording accepted events: event, decision, request, audit and outbox rows in one transaction.

Built for throughput: a batch of deliveries is written with a handful of statements (one
`SELECT` for duplicates, one for pending subjects, one multi-row `INSERT` per table), so the
cost of a commit is shared by every delivery in the batch. `storage.batcher` forms the batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from connectors.base import Cancellation
from connectors.events import Event
from connectors.redaction import redact_url
from policies.anomaly import BaselineId, BaselineState, Measurement
from policies.model import Decision, DecisionKind
from storage import audit, baselines
from storage.audit import AuditEntry
from storage.db import TransactionRunner
from storage.models import EventRecord, OutboxJob, Request, RequestStatus, new_id, table_of
from storage.outbox import request_job, sync_back_job
from storage.timers import Progress, next_due

_AUTO_STATUS = {
    DecisionKind.auto_approve: RequestStatus.approved,
    DecisionKind.auto_reject: RequestStatus.rejected,
}


@dataclass(frozen=True)
class Intake:
    """An accepted delivery and what the policy decided about it."""

    event: Event
    decision: Decision
    # Outbox job kind that applies a final decision back to the source, or None.
    sync_kind: str | None = None
    # Outbox job kinds that post a routed request's card and update a superseded one's (None:
    # no chat configured).
    card_kind: str | None = None
    card_update_kind: str | None = None
    # The event's value for its anomaly baseline, learned in this transaction (policies.anomaly).
    measurement: Measurement | None = None


@dataclass(frozen=True)
class Cancel:
    """The source withdrew a subject (a resolved alert): cancel its pending request, if any."""

    cancellation: Cancellation
    # Outbox job kind that updates the card to say so (None: no chat configured).
    card_update_kind: str | None = None


@dataclass(frozen=True)
class CancelResult:
    request_id: str | None  # the request cancelled, None if nothing was pending
    queued_jobs: bool = False


@dataclass(frozen=True)
class Refusal:
    """A refused delivery: nothing is stored but this audit record."""

    source: str
    reason: str
    detail: str
    delivery_id: str | None = None
    remote: str | None = None


@dataclass(frozen=True)
class IntakeResult:
    event_id: str
    request_id: str | None
    decision: str
    status: str | None
    rule: str
    duplicate: bool = False
    # This delivery queued outbox jobs (a sync-back, a card): the worker has work.
    queued_jobs: bool = False
    # Baselines as they stand after this batch learned from it, for the scoring cache.
    learned: Mapping[BaselineId, BaselineState] | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "decision": self.decision,
            "status": self.status,
            "rule": self.rule,
        }


def _event_audit_data(body: dict[str, Any]) -> dict[str, Any]:
    """What the audit keeps of an event: all but the connector's private sync-back data."""
    data = {key: value for key, value in body.items() if key not in ("sync", "callback_url")}
    if body.get("callback_url"):
        data["callback_url"] = redact_url(body["callback_url"])
    return data


def _request_row(
    request_id: str,
    event_id: str,
    intake: Intake,
    status: RequestStatus,
    now: datetime,
    route_json: dict[str, Any] | None,
) -> dict[str, Any]:
    event, decision, route = intake.event, intake.decision, intake.decision.route
    final = status.is_final
    expires_at = now + route.expires_after if route and route.expires_after else None
    due = (
        next_due(route, created_at=now, expires_at=expires_at, progress=Progress())
        if route is not None and not final
        else None
    )
    return {
        "id": request_id,
        "event_id": event_id,
        "source": event.source,
        "kind": event.kind,
        "subject": event.subject,
        "version": event.version,
        "title": event.title,
        "actor_id": event.actor.id if event.actor else None,
        "status": status.value,
        "decision_kind": decision.kind.value,
        "rule": decision.rule,
        "route": route_json,
        "created_at": now,
        "expires_at": expires_at,
        "decided_at": now if final else None,
        "decided_by": (
            [{"id": f"policy:{decision.rule}", "name": f"policy rule {decision.rule}"}]
            if final
            else []
        ),
        "reason": f"{status.value} by policy rule {decision.rule}" if final else "",
        "superseded_by": None,
        "sync_kind": intake.sync_kind,
        "channel": route.channel if route is not None else None,
        "sla_due_at": now + route.sla if route is not None and route.sla else None,
        "next_due_at": due,
        "escalation_level": 0,
        "sla_reminded": False,
        "expiry_warned": False,
    }


# The intake's statements, built once and run on the session's connection: building them and
# the ORM's handling of each cost more than SQLite's running them, for every batch.
_EVENTS = table_of(EventRecord)
_REQUESTS = table_of(Request)
_KNOWN = select(_EVENTS.c.delivery_id).where(
    _EVENTS.c.delivery_id.in_(bindparam("ids", expanding=True))
)
_ANSWERS = (
    select(
        _EVENTS.c.delivery_id,
        _EVENTS.c.id,
        _EVENTS.c.request_id,
        _EVENTS.c.decision_kind,
        _EVENTS.c.rule,
        _REQUESTS.c.status,
    )
    .outerjoin(_REQUESTS, _REQUESTS.c.id == _EVENTS.c.request_id)
    .where(_EVENTS.c.delivery_id.in_(bindparam("ids", expanding=True)))
)
_PENDING = select(
    _REQUESTS.c.source, _REQUESTS.c.subject, _REQUESTS.c.id, _REQUESTS.c.version
).where(
    _REQUESTS.c.status == RequestStatus.pending.value,
    tuple_(_REQUESTS.c.source, _REQUESTS.c.subject).in_(bindparam("subjects", expanding=True)),
)
# Core table, not the ORM entity: with a list of parameters the ORM would switch to its "bulk
# UPDATE by primary key" mode, which ignores the status guard.
_SUPERSEDE = (
    update(_REQUESTS)
    .where(_REQUESTS.c.id == bindparam("b_id"), _REQUESTS.c.status == RequestStatus.pending.value)
    .values(
        status=bindparam("b_status"),
        superseded_by=bindparam("b_superseded_by"),
        reason=bindparam("b_reason"),
        decided_at=bindparam("b_decided_at"),
    )
)
_INSERT_EVENTS = _EVENTS.insert()
_INSERT_REQUESTS = _REQUESTS.insert()
_INSERT_JOBS = table_of(OutboxJob).insert()


def _existing_answers(session: Session, delivery_ids: Sequence[str]) -> dict[str, IntakeResult]:
    # Duplicates are rare: a lookup on the unique index first, the join only when one is found.
    conn = session.connection()
    known = conn.execute(_KNOWN, {"ids": list(delivery_ids)}).scalars().all()
    if not known:
        return {}
    return {
        row.delivery_id: IntakeResult(
            event_id=row.id,
            request_id=row.request_id,
            decision=row.decision_kind,
            status=row.status,
            rule=row.rule,
            duplicate=True,
        )
        for row in conn.execute(_ANSWERS, {"ids": list(known)})
    }


def _pending_by_subject(
    session: Session, subjects: set[tuple[str, str]]
) -> dict[tuple[str, str], tuple[str, str]]:
    """(source, subject) -> (request id, version) of the pending request, if any."""
    if not subjects:
        return {}
    rows = session.connection().execute(_PENDING, {"subjects": sorted(subjects)})
    return {(r.source, r.subject): (r.id, r.version) for r in rows}


def _subject(item: Intake | Cancel) -> tuple[str, str]:
    if isinstance(item, Cancel):
        return (item.cancellation.source, item.cancellation.subject)
    return (item.event.source, item.event.subject)


def write_batch(
    session: Session, items: Sequence[Intake | Cancel], refusals: Sequence[Refusal]
) -> list[IntakeResult | CancelResult]:
    """Items are applied in order, so "firing, then resolved" in one batch ends cancelled."""
    now = datetime.now(UTC)
    intakes = [item for item in items if isinstance(item, Intake)]
    answers = _existing_answers(session, [i.event.delivery_id for i in intakes])
    pending = _pending_by_subject(session, {_subject(item) for item in items})
    events: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    superseded: list[dict[str, Any]] = []
    entries: list[AuditEntry] = [
        AuditEntry(
            kind="event.refused",
            actor=f"source:{refusal.source}",
            data={
                "reason": refusal.reason,
                "detail": refusal.detail,
                "delivery_id": refusal.delivery_id,
                "remote": refusal.remote,
            },
            at=now,
        )
        for refusal in refusals
    ]
    new_requests: dict[str, dict[str, Any]] = {}
    measured: list[tuple[int, Measurement]] = []
    results: list[IntakeResult | CancelResult] = []
    for intake in items:
        if isinstance(intake, Cancel):
            results.append(_cancel(intake, pending, new_requests, superseded, jobs, entries, now))
            continue
        event, decision = intake.event, intake.decision
        known = answers.get(event.delivery_id)
        if known is not None:
            results.append(known)
            continue
        event_id = new_id("e")
        key = (event.source, event.subject)
        if intake.measurement is not None:  # learned once: a duplicate never got this far
            measured.append((len(results), intake.measurement))
        # Serialised once and shared by the event row, the request row and the audit records.
        body = event.model_dump(mode="json")
        decision_json = decision.model_dump(mode="json")
        current = pending.get(key)
        jobs_before = len(jobs)
        entries.append(
            AuditEntry(
                kind="event.received",
                actor=f"source:{event.source}",
                data=_event_audit_data(body),
                event_id=event_id,
                at=now,
            )
        )
        request_id: str | None = None
        status: RequestStatus | None = None
        if current is not None and current[1] == event.version:
            # The same content again under a new delivery id: it is the same request.
            request_id, status = current[0], RequestStatus.pending
        else:
            if decision.kind is not DecisionKind.ignore:
                request_id = new_id("r")
                status = _AUTO_STATUS.get(decision.kind, RequestStatus.pending)
                row = _request_row(
                    request_id, event_id, intake, status, now, decision_json["route"]
                )
                requests.append(row)
                new_requests[request_id] = row
                if status.is_final and intake.sync_kind:
                    jobs.append(sync_back_job(request_id, intake.sync_kind, now))
                if not status.is_final and intake.card_kind:
                    jobs.append(request_job(intake.card_kind, "card", request_id, now))
            if current is not None:
                cancel = {
                    "status": RequestStatus.cancelled.value,
                    "superseded_by": request_id,
                    "reason": f"superseded by version {event.version}",
                    "decided_at": now,
                }
                if current[0] in new_requests:  # created earlier in this very batch
                    new_requests[current[0]].update(cancel)
                else:
                    superseded.append(
                        {f"b_{k}": v for k, v in cancel.items()} | {"b_id": current[0]}
                    )
                    if intake.card_update_kind:
                        # Its card must stop offering buttons for a version that is gone.
                        jobs.append(
                            request_job(intake.card_update_kind, "card-superseded", current[0], now)
                        )
                entries.append(
                    AuditEntry(
                        kind="request.superseded",
                        actor=f"source:{event.source}",
                        data={"by": request_id, "version": event.version},
                        request_id=current[0],
                        event_id=event_id,
                        at=now,
                    )
                )
                del pending[key]
            if status is RequestStatus.pending and request_id is not None:
                pending[key] = (request_id, event.version)
        entries.append(
            AuditEntry(
                kind="decision.made",
                actor="policy",
                data={
                    "decision": decision.kind.value,
                    "rule": decision.rule,
                    "failed_closed": decision.failed_closed,
                    "shadow": decision_json["shadow"],
                    "trace": decision_json["trace"],
                },
                request_id=request_id,
                event_id=event_id,
                at=now,
            )
        )
        events.append(
            {
                "id": event_id,
                "delivery_id": event.delivery_id,
                "source": event.source,
                "kind": event.kind,
                "subject": event.subject,
                "version": event.version,
                "body": body,
                "decision": decision_json,
                "decision_kind": decision.kind.value,
                "rule": decision.rule,
                "request_id": request_id,
                "received_at": event.received_at,
            }
        )
        result = IntakeResult(
            event_id=event_id,
            request_id=request_id,
            decision=decision.kind.value,
            status=status.value if status else None,
            rule=decision.rule,
            queued_jobs=len(jobs) > jobs_before,
        )
        results.append(result)
        # A later duplicate in this same batch gets the same answer.
        answers[event.delivery_id] = dataclasses.replace(result, duplicate=True, queued_jobs=False)

    if measured:
        learned = baselines.learn(session, [m for _, m in measured], now=now)
        for index, _ in measured:
            measured_result = results[index]
            assert isinstance(measured_result, IntakeResult)
            results[index] = dataclasses.replace(measured_result, learned=learned)
    conn = session.connection()
    if superseded:
        # In id order, as every transaction locks requests (see storage.votes).
        conn.execute(_SUPERSEDE, sorted(superseded, key=lambda row: row["b_id"]))
    if events:
        conn.execute(_INSERT_EVENTS, events)
    if requests:
        conn.execute(_INSERT_REQUESTS, requests)
    if jobs:
        conn.execute(_INSERT_JOBS, jobs)
    audit.append_sync(session, entries)
    return results


def _cancel(
    item: Cancel,
    pending: dict[tuple[str, str], tuple[str, str]],
    new_requests: dict[str, dict[str, Any]],
    superseded: list[dict[str, Any]],
    jobs: list[dict[str, Any]],
    entries: list[AuditEntry],
    now: datetime,
) -> CancelResult:
    cancellation = item.cancellation
    current = pending.pop(_subject(item), None)
    if current is None:
        return CancelResult(None)  # nothing pending (already decided, or never routed)
    request_id = current[0]
    cancel = {
        "status": RequestStatus.cancelled.value,
        "superseded_by": None,
        "reason": cancellation.reason,
        "decided_at": now,
    }
    queued = False
    if request_id in new_requests:  # created earlier in this very batch
        new_requests[request_id].update(cancel)
    else:
        superseded.append({f"b_{k}": v for k, v in cancel.items()} | {"b_id": request_id})
        if item.card_update_kind:
            jobs.append(request_job(item.card_update_kind, "card-cancelled", request_id, now))
            queued = True
    entries.append(
        AuditEntry(
            kind="request.cancelled",
            actor=f"source:{cancellation.source}",
            data={"reason": cancellation.reason, "delivery_id": cancellation.delivery_id},
            request_id=request_id,
            at=now,
        )
    )
    return CancelResult(request_id, queued_jobs=queued)


async def record(
    runner: TransactionRunner,
    intakes: Sequence[Intake | Cancel],
    refusals: Sequence[Refusal] = (),
) -> list[IntakeResult | CancelResult]:
    """Write a batch in one transaction. Results are in the order of `intakes`.

    If another replica wrote a conflicting row meanwhile (same delivery id, or a pending request
    for the same subject), the batch is retried one delivery per transaction: the loser of the
    race then sees the winner's row and answers as a duplicate or supersedes it.
    """
    try:
        return await runner.run(lambda session: write_batch(session, intakes, refusals))
    except IntegrityError:
        if len(intakes) + len(refusals) <= 1:
            # Retry once: the conflicting row is committed now, so this pass sees it.
            return await runner.run(lambda session: write_batch(session, intakes, refusals))
    if refusals:
        await runner.run(lambda session: write_batch(session, (), refusals))
    results: list[IntakeResult | CancelResult] = []
    for intake in intakes:
        results.extend(await record(runner, [intake]))
    return results
