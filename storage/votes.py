"""Votes and quorum: one person one vote, a reject is a veto, approvals are counted per group.

A vote, the decision it completes, and every side effect it causes (card update, thread reply,
the requester's DM, the sync-back) are written in one transaction that first locks the request
row, so two approvers clicking the last needed vote at the same moment are serialised: the
second sees the first's vote, and exactly one `approved` transition and one sync-back happen.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, CursorResult, bindparam, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from policies.model import Route
from storage.audit import AuditEntry, append_sync
from storage.db import TransactionRunner
from storage.errors import StorageError
from storage.groupcommit import GroupCommit
from storage.models import EventRecord, JobStatus, OutboxJob, Request, RequestStatus, Vote, table_of
from storage.outbox import insert_jobs, job_row, request_job, sync_back_job

log = logging.getLogger(__name__)


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


def _snapshot(version: str, body: Mapping[str, Any]) -> dict[str, Any]:
    # What the approver was shown, pinned: the version and a digest of the whole event body.
    digest = hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    return {"version": version, "title": body.get("title"), "event_sha256": digest}


# At most this many votes share one thread reply, so a reply stays a few short lines.
REPLY_MAX_VOTES = 10


@dataclass(frozen=True)
class _Fixed:
    """What a vote needs of its request that never changes once the request exists: its route,
    what it was created from, where its decision goes. Read once per request, then cached."""

    route: Route | None
    event_id: str
    shown: Mapping[str, Any]
    has_actor: bool
    created_at: datetime
    sync_kind: str | None


@dataclass(frozen=True)
class _Tally:
    """The votes of one request up to vote `last_id`: who voted, and how many approving votes
    each approver entry has. Votes are never changed or deleted, and a request's votes are
    inserted under its row lock, so their ids grow: the votes after `last_id` are all a tally
    needs to catch up, instead of every vote of the request for every click."""

    last_id: int = 0
    voters: frozenset[str] = frozenset()
    approvals: Mapping[str, int] = field(default_factory=dict)

    def add(self, vote_id: int, user_id: str, choice: str, groups: Sequence[str]) -> _Tally:
        approvals = dict(self.approvals)
        if choice == Choice.approve.value:
            for label in groups:
                approvals[label] = approvals.get(label, 0) + 1
        return _Tally(max(self.last_id, vote_id), self.voters | {user_id}, approvals)


class RequestFacts:
    """What votes need to know of requests, kept by whoever casts votes repeatedly: the facts
    that never change (`_Fixed`), and each request's tally as of the last commit. The digest of
    the event body, the parsed route and reading every earlier vote each cost more than the
    rest of a vote. Bounded; tallies change only once the transaction that made them commits."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._facts: dict[str, _Fixed] = {}
        self._tallies: dict[str, _Tally] = {}

    def get(self, session: Session, request_id: str) -> _Fixed | None:
        fixed = self._facts.get(request_id)
        if fixed is not None:
            return fixed
        row = session.execute(
            select(
                Request.route,
                Request.created_at,
                Request.sync_kind,
                EventRecord.id,
                EventRecord.version,
                EventRecord.body,
            )
            .join(EventRecord, EventRecord.id == Request.event_id)
            .where(Request.id == request_id)
        ).one_or_none()
        if row is None:
            return None
        fixed = _Fixed(
            route=Route.model_validate(row.route) if row.route else None,
            event_id=row.id,
            shown=_snapshot(row.version, row.body),
            has_actor=bool(row.body.get("actor")),
            created_at=row.created_at,
            sync_kind=row.sync_kind,
        )
        if len(self._facts) >= self._limit:
            self._facts.clear()
        self._facts[request_id] = fixed
        return fixed

    def tallies(self, conn: Connection, request_ids: Collection[str]) -> dict[str, _Tally]:
        """The requests' tallies now (under their row locks): the last committed ones, caught
        up with the votes after them, in at most two queries for the whole batch (requests
        never seen before read all their votes; the others, the votes after the oldest of
        their tallies)."""
        tallies = {r: self._tallies.get(r) or _Tally() for r in request_ids}
        cold = sorted(r for r, tally in tallies.items() if not tally.last_id)
        warm = sorted(r for r, tally in tallies.items() if tally.last_id)
        for ids in (cold, warm):
            if not ids:
                continue
            after = min(tallies[r].last_id for r in ids)
            for vote_id, request_id, user_id, choice, groups in conn.execute(
                _VOTES_AFTER, {"request_ids": ids, "after": after}
            ):
                tally = tallies[request_id]
                if vote_id > tally.last_id:  # a later tally than `after` has it already
                    tallies[request_id] = tally.add(vote_id, user_id, choice, groups)
        return tallies

    def committed(self, tallies: Mapping[str, _Tally]) -> None:
        if len(self._tallies) + len(tallies) > self._limit:
            self._tallies.clear()
        self._tallies.update(tallies)


# The statements of every vote, built once and on Core tables: building a statement and the
# ORM's handling of it cost more than SQLite's running it.
_VOTES = table_of(Vote)
_JOBS = table_of(OutboxJob)
_REQUESTS = table_of(Request)
_VOTES_AFTER = (
    select(_VOTES.c.id, _VOTES.c.request_id, _VOTES.c.user_id, _VOTES.c.choice, _VOTES.c.groups)
    .where(
        _VOTES.c.request_id.in_(bindparam("request_ids", expanding=True)),
        _VOTES.c.id > bindparam("after"),
    )
    .order_by(_VOTES.c.id)
)
_PENDING_EFFECTS = (
    select(_JOBS.c.id, _JOBS.c.request_id, _JOBS.c.kind, _JOBS.c.payload, _JOBS.c.attempts)
    .where(
        _JOBS.c.request_id.in_(bindparam("request_ids", expanding=True)),
        _JOBS.c.kind.in_(bindparam("kinds", expanding=True)),
        _JOBS.c.status == JobStatus.pending.value,
    )
    .with_for_update(skip_locked=True)
)
_GROW_REPLY = (
    update(_JOBS)
    .where(_JOBS.c.id == bindparam("job_id"))
    .values(payload=bindparam("grown_payload"))
)


@dataclass
class _RequestRow:
    """A request's columns a ballot is judged on, read under the request's lock."""

    status: str
    version: str
    superseded_by: str | None


@dataclass
class _Queued:
    """The side effects of one request that this transaction may still add votes to."""

    update: bool  # a card update nobody has claimed yet: it will show every vote before it runs
    reply: dict[str, Any] | None  # a thread reply nobody has attempted yet: its payload
    reply_job: str | None  # that reply's job id when it was queued before this transaction


@dataclass
class _Batch:
    """What the ballots of one transaction add up to; jobs and audit records are written once,
    at the end, in ballot order. What the ballots need to read (their requests' rows, tallies
    and open side effects) is read up front for all of them, a query each, not per ballot."""

    jobs: SlackJobs
    conn: Connection
    entries: list[AuditEntry] = field(default_factory=list)
    # The batch's requests as they are now: locked, and kept current as ballots decide them.
    rows: dict[str, _RequestRow] = field(default_factory=dict)
    # Each request's tally as of the ballots judged so far, for `RequestFacts.committed` once
    # the transaction has committed.
    tallies: dict[str, _Tally] = field(default_factory=dict)
    new_jobs: list[dict[str, Any]] = field(default_factory=list)
    queued: dict[str, _Queued] = field(default_factory=dict)
    grown: dict[str, dict[str, Any]] = field(default_factory=dict)

    def read(self, request_ids: Collection[str], facts: RequestFacts) -> None:
        """Lock the requests and read what their ballots need.

        The requests are locked in id order: locked as the ballots come, two replicas'
        batches (a double click reaches both) could each hold one request and wait for the
        other's, a deadlock, and PostgreSQL fails one batch. Every transaction that locks
        several requests takes them in this order. (SQLite has one writer at a time.)

        The open side effects are the card update and thread reply of each request that more
        votes may still join. Their rows stay locked until this transaction commits, so a
        worker cannot claim them and render in between (`SKIP LOCKED` on its side skips them);
        one a worker holds right now is skipped here, and a vote queues its own. SQLite runs
        one writer at a time, so there a claim cannot come in between anyway. A reply already
        attempted is closed: a retry must send what the failed attempt sent, never more.
        """
        ids = sorted(request_ids)
        if not ids:
            return
        for row in self.conn.execute(_LOCK_REQUESTS, {"request_ids": ids}):
            self.rows[row.id] = _RequestRow(row.status, row.version, row.superseded_by)
        self.tallies = facts.tallies(self.conn, list(self.rows))
        kinds = [kind for kind in (self.jobs.update_card, self.jobs.thread_reply) if kind]
        if not kinds:
            return
        self.queued = {request_id: _Queued(False, None, None) for request_id in self.rows}
        for job in self.conn.execute(_PENDING_EFFECTS, {"request_ids": ids, "kinds": kinds}):
            queued = self.queued[job.request_id]
            if job.kind == self.jobs.update_card:
                queued.update = True
            elif (
                queued.reply is None
                and job.attempts == 0
                and len(reply_votes(job.payload)) < REPLY_MAX_VOTES
            ):
                queued.reply, queued.reply_job = dict(job.payload), job.id

    def queue_reply(self, request_id: str, vote_id: int, now: datetime) -> None:
        """One thread reply per vote, except under a burst: a vote cast while an earlier vote's
        reply is still waiting for a worker joins that reply (up to REPLY_MAX_VOTES), so a
        burst of votes is a few replies listing them instead of a backlog of one each."""
        assert self.jobs.thread_reply is not None
        queued = self.queued[request_id]
        reply = queued.reply
        if reply is not None and len(reply_votes(reply)) < REPLY_MAX_VOTES:
            reply["vote_ids"] = [*reply_votes(reply), vote_id]
            if queued.reply_job is not None:
                self.grown[queued.reply_job] = reply
            return
        row = job_row(
            kind=self.jobs.thread_reply,
            idempotency_key=f"vote-reply-{vote_id}",
            payload={"request_id": request_id, "vote_id": vote_id, "vote_ids": [vote_id]},
            request_id=request_id,
            now=now,
        )
        self.new_jobs.append(row)
        # The row's payload is inserted at the end of the transaction: votes after this one
        # in the same transaction still join it.
        queued.reply, queued.reply_job = row["payload"], None

    def write(self, session: Session) -> None:
        insert_jobs(session, self.new_jobs)
        if self.grown:
            self.conn.execute(
                _GROW_REPLY,
                [{"job_id": job, "grown_payload": payload} for job, payload in self.grown.items()],
            )
        append_sync(session, self.entries)


def reply_votes(payload: Mapping[str, Any]) -> list[int]:
    """The votes a thread-reply job is about, oldest first (jobs queued before replies were
    shared name one)."""
    votes = payload.get("vote_ids")
    return [int(v) for v in votes] if isinstance(votes, list) else [int(payload["vote_id"])]


@dataclass(frozen=True)
class Refused:
    """A click refused before it reached storage (unknown request, Slack unreachable): only
    its audit record is written."""

    ballot: Ballot
    refusal: Refusal
    detail: str = ""


def cast(session: Session, ballot: Ballot, jobs: SlackJobs) -> VoteResult:
    """Record `ballot` or raise VoteRefused, writing nothing then (the caller audits it). Runs
    inside the caller's transaction."""
    [outcome] = cast_many(session, [ballot], jobs, audit_refusals=False)
    if isinstance(outcome, VoteRefused):
        raise outcome
    assert outcome is not None
    return outcome


def cast_many(
    session: Session,
    items: Sequence[Ballot | Refused],
    jobs: SlackJobs,
    *,
    audit_refusals: bool = True,
) -> list[VoteResult | VoteRefused | None]:
    """Record several clicks in the caller's transaction, in order, each judged after the ones
    before it (two ballots of one person: the second is `already_voted`). Per item: the vote's
    result, or the VoteRefused it got (audited, with nothing else written for it), or None for
    a `Refused` (audited)."""
    return _cast_batch(session, items, jobs, RequestFacts(), audit_refusals=audit_refusals)[0]


def _cast_batch(
    session: Session,
    items: Sequence[Ballot | Refused],
    jobs: SlackJobs,
    facts: RequestFacts,
    *,
    audit_refusals: bool = True,
) -> tuple[list[VoteResult | VoteRefused | None], dict[str, _Tally]]:
    """`cast_many` with the caller's cache; also returns the tallies to keep once committed."""
    batch = _Batch(jobs, session.connection())
    outcomes: list[VoteResult | VoteRefused | None] = []
    batch.read({i.request_id for i in items if isinstance(i, Ballot)}, facts)
    for item in items:
        if isinstance(item, Refused):
            batch.entries.append(refusal_entry(item.ballot, item.refusal, detail=item.detail))
            outcomes.append(None)
            continue
        try:
            outcomes.append(_cast_one(session, item, batch, facts))
        except VoteRefused as refused:
            # Raised before this ballot wrote anything: the transaction goes on for the others.
            if audit_refusals:
                batch.entries.append(refusal_entry(item, refused.refusal))
            outcomes.append(refused)
    batch.write(session)
    return outcomes, batch.tallies


# The locks that serialise voters on one request (SQLite's write lock covers them already), taken
# in id order (`_Batch.read`). Plain columns, not ORM objects: a ballot sees its request as the
# ballots before it in the transaction left it (`_Batch.rows`).
_LOCK_REQUESTS = (
    select(_REQUESTS.c.id, _REQUESTS.c.status, _REQUESTS.c.version, _REQUESTS.c.superseded_by)
    .where(_REQUESTS.c.id.in_(bindparam("request_ids", expanding=True)))
    .order_by(_REQUESTS.c.id)
    .with_for_update()
)


def _cast_one(session: Session, ballot: Ballot, batch: _Batch, facts: RequestFacts) -> VoteResult:
    """Judge and record one ballot; raises VoteRefused before writing anything."""
    jobs = batch.jobs
    row = batch.rows.get(ballot.request_id)
    fixed = facts.get(session, ballot.request_id) if row is not None else None
    if row is None or fixed is None:
        raise VoteRefused(Refusal.not_found)
    request_id = ballot.request_id
    if row.status != RequestStatus.pending.value:
        superseded = row.status == RequestStatus.cancelled.value and row.superseded_by
        raise VoteRefused(Refusal.superseded if superseded else Refusal.decided, status=row.status)
    if row.version != ballot.version:
        raise VoteRefused(Refusal.superseded, status=row.status)
    route = fixed.route
    if route is None:
        raise VoteRefused(Refusal.decided, status=row.status)
    counted = [entry.label for entry in route.approvers if entry.label in ballot.groups]
    if not counted:
        raise VoteRefused(Refusal.not_approver, status=row.status)
    if ballot.choice is Choice.approve and ballot.is_actor and "actor" in route.forbid:
        raise VoteRefused(Refusal.self_approval, status=row.status)
    if ballot.choice is Choice.approve and ballot.in_actor_team and "actor_team" in route.forbid:
        raise VoteRefused(Refusal.own_team, status=row.status)
    if ballot.choice is Choice.reject and len(ballot.reason.strip()) < 3:
        raise VoteRefused(Refusal.reason_required, status=row.status)

    # The row lock makes read-then-insert safe here: no other vote on this request can commit
    # in between. (The unique constraint stays as the last line of defence.)
    tally = batch.tallies[request_id]
    if ballot.user_id in tally.voters:
        raise VoteRefused(Refusal.already_voted, status=row.status)
    vote_id = batch.conn.execute(
        _INSERT_VOTE,
        {
            "request_id": request_id,
            "user_id": ballot.user_id,
            "user_name": ballot.user_name,
            "choice": ballot.choice.value,
            "reason": ballot.reason,
            "groups": counted,
            "params": dict(ballot.params) or None,
            "created_at": ballot.now,
        },
    ).scalar_one()
    tally = batch.tallies[request_id] = tally.add(
        vote_id, ballot.user_id, ballot.choice.value, counted
    )
    progress = [
        (entry.label, tally.approvals.get(entry.label, 0), entry.min) for entry in route.approvers
    ]
    status = RequestStatus.pending
    if ballot.choice is Choice.reject:
        status = RequestStatus.rejected
    elif all(have >= need for _, have, need in progress):
        status = RequestStatus.approved

    batch.entries.append(
        AuditEntry(
            kind="vote.cast",
            actor=f"slack:{ballot.user_id}",
            data={
                "choice": ballot.choice.value,
                "reason": ballot.reason,
                "counted_for": counted,
                "progress": [list(t) for t in progress],
                "shown": dict(fixed.shown),
                **({"params": dict(ballot.params)} if ballot.params else {}),
            },
            request_id=request_id,
            event_id=fixed.event_id,
            at=ballot.now,
        )
    )
    if jobs.thread_reply:
        batch.queue_reply(request_id, vote_id, ballot.now)
    decided = status is not RequestStatus.pending
    if decided:
        _decide(session, ballot, batch, fixed, status)
    # The deciding vote always queues its own update: the outcome must reach the card even if
    # an earlier update, which may still be retrying, ends dead-lettered. Otherwise a queued
    # update nobody has claimed yet renders the card from the database when it runs, so it
    # will show this vote too, and one more job would only repeat it.
    if jobs.update_card:
        queued = batch.queued[request_id]
        if decided or not queued.update:
            batch.new_jobs.append(
                request_job(jobs.update_card, f"card-update-vote-{vote_id}", request_id, ballot.now)
            )
            queued.update = True
    return VoteResult(
        vote_id=vote_id,
        status=status,
        progress=progress,
        decided_after=ballot.now - fixed.created_at if status.is_final else None,
    )


_INSERT_VOTE = _VOTES.insert().returning(_VOTES.c.id)


def _decide(
    session: Session, ballot: Ballot, batch: _Batch, fixed: _Fixed, status: RequestStatus
) -> None:
    """The request's decision by this vote, with the side effects only a decision has."""
    request_id = ballot.request_id
    decided_by = (
        [{"id": ballot.user_id, "name": ballot.user_name}]
        if status is RequestStatus.rejected
        else _approvers(session, request_id)
    )
    reason = (
        ballot.reason if status is RequestStatus.rejected else _approval_reason(session, request_id)
    )
    changed: CursorResult[Any] = session.execute(  # type: ignore[assignment]
        update(table_of(Request))
        .where(
            table_of(Request).c.id == request_id,
            table_of(Request).c.status == RequestStatus.pending.value,
        )
        .values(status=status.value, decided_by=decided_by, reason=reason, decided_at=ballot.now)
    )
    assert changed.rowcount == 1, "the row lock guarantees the request is still pending"
    batch.rows[request_id].status = status.value  # the next ballots on it are refused
    batch.entries.append(
        AuditEntry(
            kind="request.decided",
            actor=f"slack:{ballot.user_id}",
            data={"status": status.value, "decided_by": decided_by, "reason": reason},
            request_id=request_id,
            at=ballot.now,
        )
    )
    if fixed.sync_kind:
        batch.new_jobs.append(sync_back_job(request_id, fixed.sync_kind, ballot.now))
    if batch.jobs.dm_outcome and fixed.has_actor:
        batch.new_jobs.append(
            request_job(batch.jobs.dm_outcome, "dm-outcome", request_id, ballot.now)
        )


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


_Item = tuple[Ballot | Refused, "asyncio.Future[VoteResult | VoteRefused | None]"]
# Event-loop passes a batch waits for clicks already being handled to join it: under a steady
# load the clicks of one batch are acked together and the next ones arrive together.
_LINGER_PASSES = 8
# What makes a whole transaction fail rather than one ballot: the database itself.
_DATABASE_TROUBLE = (OperationalError, InterfaceError, OSError)


class VoteWriter(GroupCommit[Ballot | Refused, VoteResult | VoteRefused | None]):
    """Group commit for clicks: every click that arrives while the previous transaction is
    committing goes into the next one.

    One transaction per vote capped clicks at what one commit costs (about 7 ms each with a
    busy event loop, so ~140 clicks/s at any concurrency). Sharing it changes nothing a voter
    can see: each ballot is judged after the ones before it in the same transaction, under the
    same row lock, and its click is acked only once the transaction has committed. A lone
    click is written at once, without waiting for a timer.
    """

    def __init__(self, runner: TransactionRunner, jobs: SlackJobs, *, max_batch: int = 256) -> None:
        super().__init__(max_batch=max_batch, linger_passes=_LINGER_PASSES)
        self._runner = runner
        self._jobs = jobs
        self._facts = RequestFacts()

    async def cast(self, ballot: Ballot) -> VoteResult | VoteRefused:
        """The vote, committed; or why it was refused (audited)."""
        outcome = await self._submit(ballot)
        assert outcome is not None
        return outcome

    async def refuse(self, refused: Refused) -> None:
        """Audit a click refused before it reached storage."""
        await self._submit(refused)

    async def _write(self, batch: list[_Item]) -> None:
        items = [item for item, _ in batch]
        try:
            outcomes, tallies = await self._runner.run(
                lambda session: _cast_batch(session, items, self._jobs, self._facts)
            )
        except Exception as exc:
            # Not swallowed: each click gets the error (Slack shows the clicker a failure and
            # nothing was recorded). But one ballot's bug must not fail the clicks that merely
            # shared its transaction: unless the database itself is the trouble, each is tried
            # again on its own.
            if len(batch) > 1 and not isinstance(exc, _DATABASE_TROUBLE):
                log.warning(
                    "a transaction of %d clicks failed; writing them one by one", len(batch)
                )
                for one in batch:
                    await self._write([one])
                return
            self._fail(batch, exc)
            return
        self._facts.committed(tallies)
        self._succeed(batch, outcomes)
