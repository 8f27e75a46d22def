"""Votes and quorum: one person one vote, a reject is a veto, approvals are counted per group.

A vote, the decision it completes, and every side effect it causes (card update, thread reply,
the requester's DM, the sync-back) are written in one transaction that first locks the request
row, so two approvers clicking the last needed vote at the same moment are serialised: the
second sees the first's vote, and exactly one `approved` transition and one sync-back happen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from policies.model import Route
from storage.audit import AuditEntry, append_sync
from storage.errors import StorageError
from storage.models import EventRecord, JobStatus, OutboxJob, Request, RequestStatus, Vote, table_of
from storage.outbox import insert_jobs, job_row, request_job, sync_back_job


class Choice(StrEnum):
    approve = "approve"
    reject = "reject"


class Refusal(StrEnum):
    """Why a click changed nothing; the value is what the clicker is told."""

    not_found = "this request no longer exists"
    superseded = "this card shows an older version; a newer version replaced it"
    decided = "this request is already decided"
    not_approver = "you are not one of this request's approvers"
    self_approval = "you started this action, so you may not approve it"
    own_team = "you are on the team that started this action, so you may not approve it"
    already_voted = "you have already voted on this request"
    reason_required = "a reject needs a reason"
    # Who may approve is Slack's to say (user groups, the actor's account); when Slack does not
    # answer (rate limit, outage) the click can be neither counted nor refused for good.
    unverified = "Slack did not answer while checking who may approve; click again in a moment"


class VoteRefused(StorageError):
    def __init__(self, refusal: Refusal, *, status: str | None = None) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal
        self.status = status


@dataclass(frozen=True)
class Ballot:
    """A click, already authenticated (Slack signature) and resolved (which groups the clicker
    belongs to). Authorization against the route happens here, under the row lock."""

    request_id: str
    version: str
    user_id: str
    user_name: str
    choice: Choice
    reason: str
    # Labels (ApproverGroup.label) of the approver entries the clicker belongs to.
    groups: Sequence[str]
    # The clicker is the event's actor / on the actor's team (resolved by the caller).
    is_actor: bool = False
    in_actor_team: bool = False
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # What the voter picked beyond yes or no (`{"silence": "4h"}` on an alert), kept with the
    # vote (`Vote.params`) for the sync-back and audited with it.
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VoteResult:
    vote_id: int
    status: RequestStatus
    # Approvals so far against what each approver entry needs: (label, have, need).
    progress: Sequence[tuple[str, int, int]]
    # Time from the request's creation to this vote, when this vote made it final.
    decided_after: timedelta | None = None


@dataclass(frozen=True)
class SlackJobs:
    """Job kinds for the Slack side effects of a vote (None: Slack not configured)."""

    update_card: str | None = None
    thread_reply: str | None = None
    dm_outcome: str | None = None


def progress(
    route: Route, votes: Sequence[tuple[str, Sequence[str]]]
) -> list[tuple[str, int, int]]:
    """Approvals per approver entry. A vote counts toward every entry its voter belongs to."""
    return [
        (
            entry.label,
            sum(1 for choice, groups in votes if choice == "approve" and entry.label in groups),
            entry.min,
        )
        for entry in route.approvers
    ]


def _snapshot(event: EventRecord) -> dict[str, Any]:
    # What the approver was shown, pinned: the version and a digest of the whole event body.
    digest = hashlib.sha256(
        json.dumps(event.body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return {"version": event.version, "title": event.body.get("title"), "event_sha256": digest}


def cast(session: Session, ballot: Ballot, jobs: SlackJobs) -> VoteResult:
    """Record `ballot` or raise VoteRefused. Runs inside the caller's transaction."""
    # The lock that serialises voters on one request (SQLite's write lock covers it already).
    row = session.execute(
        select(Request, EventRecord)
        .join(EventRecord, EventRecord.id == Request.event_id)
        .where(Request.id == ballot.request_id)
        .with_for_update(of=Request)
    ).one_or_none()
    if row is None:
        raise VoteRefused(Refusal.not_found)
    request, event = row
    if request.status != RequestStatus.pending.value:
        superseded = request.status == RequestStatus.cancelled.value and request.superseded_by
        raise VoteRefused(
            Refusal.superseded if superseded else Refusal.decided, status=request.status
        )
    if request.version != ballot.version:
        raise VoteRefused(Refusal.superseded, status=request.status)
    if request.route is None:
        raise VoteRefused(Refusal.decided, status=request.status)
    route = Route.model_validate(request.route)
    counted = [entry.label for entry in route.approvers if entry.label in ballot.groups]
    if not counted:
        raise VoteRefused(Refusal.not_approver, status=request.status)
    if ballot.choice is Choice.approve and ballot.is_actor and "actor" in route.forbid:
        raise VoteRefused(Refusal.self_approval, status=request.status)
    if ballot.choice is Choice.approve and ballot.in_actor_team and "actor_team" in route.forbid:
        raise VoteRefused(Refusal.own_team, status=request.status)
    if ballot.choice is Choice.reject and len(ballot.reason.strip()) < 3:
        raise VoteRefused(Refusal.reason_required, status=request.status)

    # The row lock makes read-then-insert safe here: no other vote on this request can commit
    # in between. (The unique constraint stays as the last line of defence.)
    votes = session.execute(
        select(Vote.user_id, Vote.choice, Vote.groups).where(Vote.request_id == request.id)
    ).all()
    if any(user_id == ballot.user_id for user_id, _, _ in votes):
        raise VoteRefused(Refusal.already_voted, status=request.status)
    vote_id = session.execute(
        table_of(Vote)
        .insert()
        .values(
            request_id=request.id,
            user_id=ballot.user_id,
            user_name=ballot.user_name,
            choice=ballot.choice.value,
            reason=ballot.reason,
            groups=counted,
            params=dict(ballot.params) or None,
            created_at=ballot.now,
        )
        .returning(table_of(Vote).c.id)
    ).scalar_one()
    tally = progress(
        route,
        [(choice, groups) for _, choice, groups in votes] + [(ballot.choice.value, counted)],
    )
    status = RequestStatus.pending
    if ballot.choice is Choice.reject:
        status = RequestStatus.rejected
    elif all(have >= need for _, have, need in tally):
        status = RequestStatus.approved

    entries = [
        AuditEntry(
            kind="vote.cast",
            actor=f"slack:{ballot.user_id}",
            data={
                "choice": ballot.choice.value,
                "reason": ballot.reason,
                "counted_for": counted,
                "progress": [list(t) for t in tally],
                "shown": _snapshot(event),
                **({"params": dict(ballot.params)} if ballot.params else {}),
            },
            request_id=request.id,
            event_id=event.id,
            at=ballot.now,
        )
    ]
    new_jobs: list[dict[str, Any]] = []
    if jobs.thread_reply:
        new_jobs.append(
            job_row(
                kind=jobs.thread_reply,
                idempotency_key=f"vote-reply-{vote_id}",
                payload={"request_id": request.id, "vote_id": vote_id},
                request_id=request.id,
                now=ballot.now,
            )
        )
    if status is not RequestStatus.pending:
        decided_by = (
            [{"id": ballot.user_id, "name": ballot.user_name}]
            if status is RequestStatus.rejected
            else _approvers(session, request.id)
        )
        reason = (
            ballot.reason
            if status is RequestStatus.rejected
            else _approval_reason(session, request.id)
        )
        changed: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            update(table_of(Request))
            .where(
                table_of(Request).c.id == request.id,
                table_of(Request).c.status == RequestStatus.pending.value,
            )
            .values(
                status=status.value,
                decided_by=decided_by,
                reason=reason,
                decided_at=ballot.now,
            )
        )
        assert changed.rowcount == 1, "the row lock guarantees the request is still pending"
        entries.append(
            AuditEntry(
                kind="request.decided",
                actor=f"slack:{ballot.user_id}",
                data={"status": status.value, "decided_by": decided_by, "reason": reason},
                request_id=request.id,
                at=ballot.now,
            )
        )
        if request.sync_kind:
            new_jobs.append(sync_back_job(request.id, request.sync_kind, ballot.now))
        if jobs.dm_outcome and event.body.get("actor"):
            new_jobs.append(request_job(jobs.dm_outcome, "dm-outcome", request.id, ballot.now))
    # The deciding vote always queues its own update: the outcome must reach the card even if
    # an earlier update, which may still be retrying, ends dead-lettered.
    decided = status is not RequestStatus.pending
    if jobs.update_card and (
        decided or not _update_already_queued(session, request.id, jobs.update_card)
    ):
        new_jobs.append(
            request_job(jobs.update_card, f"card-update-vote-{vote_id}", request.id, ballot.now)
        )
    insert_jobs(session, new_jobs)
    append_sync(session, entries)
    return VoteResult(
        vote_id=vote_id,
        status=status,
        progress=tally,
        decided_after=ballot.now - request.created_at if status.is_final else None,
    )


def _update_already_queued(session: Session, request_id: str, kind: str) -> bool:
    """A card update for this request is queued and not yet claimed: it renders the card from
    the database when it runs, so it will show this vote too, and one more job would only
    repeat it (under a burst of votes, one update per vote is a backlog of identical work).

    The job row is locked until this vote commits, so a worker cannot claim it and render the
    card in between (`SKIP LOCKED` on its side skips it); one a worker holds right now is
    skipped here, and this vote queues its own update. SQLite runs one writer at a time, so
    there the claim cannot come in between anyway.
    """
    pending = (
        select(OutboxJob.id)
        .where(
            OutboxJob.request_id == request_id,
            OutboxJob.kind == kind,
            OutboxJob.status == JobStatus.pending.value,
        )
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    return session.execute(pending).first() is not None


def _approvers(session: Session, request_id: str) -> list[dict[str, str]]:
    rows = session.execute(
        select(Vote.user_id, Vote.user_name)
        .where(Vote.request_id == request_id, Vote.choice == Choice.approve.value)
        .order_by(Vote.created_at, Vote.id)
    ).all()
    return [{"id": user_id, "name": user_name} for user_id, user_name in rows]


def _approval_reason(session: Session, request_id: str) -> str:
    reasons = session.execute(
        select(Vote.user_name, Vote.reason).where(
            Vote.request_id == request_id, Vote.choice == Choice.approve.value, Vote.reason != ""
        )
    ).all()
    return "; ".join(f"{name}: {reason}" for name, reason in reasons) or "approved in Slack"


def refusal_entry(ballot: Ballot, refusal: Refusal, *, detail: str = "") -> AuditEntry:
    """The audit record of a refused click (written by the caller in its own transaction)."""
    return AuditEntry(
        kind="vote.refused",
        actor=f"slack:{ballot.user_id}",
        data={
            "choice": ballot.choice.value,
            "version": ballot.version,
            "refusal": refusal.name,
            "detail": detail,
            **({"params": dict(ballot.params)} if ballot.params else {}),
        },
        request_id=ballot.request_id,
        at=ballot.now,
    )
