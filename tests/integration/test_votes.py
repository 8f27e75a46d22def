"""Quorum, veto and authorization in storage, and concurrent last votes from two "replicas"
(separate engines, so separate connections and transactions) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update

from connectors.events import Event
from policies.model import Decision, DecisionKind, Route
from storage import ledger
from storage.db import TransactionRunner, create_engine
from storage.errors import NotFound
from storage.ledger import Intake
from storage.models import AuditRecord, OutboxJob, Request, Vote
from storage.requests import EventCache, VoteCache, read_request
from storage.schema import upgrade
from storage.votes import (
    REPLY_MAX_VOTES,
    Ballot,
    Choice,
    Refusal,
    Refused,
    SlackJobs,
    VoteRefused,
    VoteResult,
    VoteWriter,
    cast,
    cast_many,
)
from tests.support import event_body, wait_for_a_lock_wait

ROUTE = Route.model_validate(
    {
        "channel": "C1",
        "approvers": [{"group": "leads", "min": 2}, {"users": ["UCFO"], "min": 1}],
        "forbid": ["actor", "actor_team"],
    }
)
JOBS = SlackJobs(update_card="slack.update_card", thread_reply="slack.thread_reply")


async def new_request(runner: TransactionRunner, route: Route = ROUTE, version: str = "1") -> str:
    body = event_body(version=version, callback_url="http://127.0.0.1:9/cb")
    event = Event.model_validate(
        {
            **body,
            "delivery_id": f"t:{body['subject']}:{version}",
            "sync": {"callback_url": body["callback_url"]},
        }
    )
    decision = Decision(kind=DecisionKind.route, rule="r", route=route)
    [result] = await ledger.record(runner, [Intake(event, decision, sync_kind="webhook.callback")])
    assert result.request_id is not None
    return result.request_id


def ballot(
    request_id: str, user: str, groups: list[str], choice: Choice = Choice.approve, **kw
) -> Ballot:
    return Ballot(
        request_id=request_id,
        version=kw.pop("version", "1"),
        user_id=user,
        user_name=user.lower(),
        choice=choice,
        reason=kw.pop("reason", ""),
        groups=groups,
        now=datetime.now(UTC),
        **kw,
    )


async def vote(runner: TransactionRunner, b: Ballot):
    return await runner.run(lambda session: cast(session, b, JOBS))


@pytest.fixture
async def runner(engine):
    r = TransactionRunner(engine)
    yield r
    r.close()


async def test_quorum_is_counted_per_group(runner: TransactionRunner) -> None:
    request_id = await new_request(runner)
    first = await vote(runner, ballot(request_id, "U1", ["leads"]))
    assert first.status.value == "pending"
    assert list(first.progress) == [("leads", 1, 2), ("UCFO", 0, 1)]
    cfo = await vote(runner, ballot(request_id, "UCFO", ["UCFO"]))
    assert cfo.status.value == "pending", "leads still need a second approval"
    last = await vote(runner, ballot(request_id, "U2", ["leads"]))
    assert last.status.value == "approved"
    assert list(last.progress) == [("leads", 2, 2), ("UCFO", 1, 1)]


async def test_votes_share_a_card_update_that_is_not_claimed_yet(
    runner: TransactionRunner, engine
) -> None:
    """The queued update renders the card when it runs, so it covers every vote before it;
    once a worker holds it, the next vote queues its own."""
    request_id = await new_request(runner)

    async def updates() -> list[str]:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(OutboxJob.status).where(
                    OutboxJob.request_id == request_id, OutboxJob.kind == JOBS.update_card
                )
            )
            return [status for (status,) in rows]

    await vote(runner, ballot(request_id, "U1", ["leads"]))
    await vote(runner, ballot(request_id, "UCFO", ["UCFO"]))
    assert await updates() == ["pending"]
    async with engine.begin() as conn:  # a worker claims it
        await conn.execute(
            update(OutboxJob)
            .where(OutboxJob.request_id == request_id, OutboxJob.kind == JOBS.update_card)
            .values(status="running")
        )
    last = await vote(runner, ballot(request_id, "U2", ["leads"]))
    assert last.status.value == "approved"
    assert sorted(await updates()) == ["pending", "running"]


async def test_a_voter_in_two_groups_counts_for_both(runner: TransactionRunner) -> None:
    route = Route.model_validate(
        {"channel": "C1", "approvers": [{"group": "a", "min": 1}, {"group": "b", "min": 1}]}
    )
    request_id = await new_request(runner, route)
    result = await vote(runner, ballot(request_id, "U1", ["a", "b"]))
    assert result.status.value == "approved"


@pytest.mark.parametrize(
    ("make", "refusal"),
    [
        (lambda r: ballot(r, "UX", []), Refusal.not_approver),
        (lambda r: ballot(r, "UX", ["nope"]), Refusal.not_approver),
        (lambda r: ballot(r, "U1", ["leads"], is_actor=True), Refusal.self_approval),
        (lambda r: ballot(r, "U1", ["leads"], in_actor_team=True), Refusal.own_team),
        (lambda r: ballot(r, "U1", ["leads"], version="0"), Refusal.superseded),
        (lambda r: ballot(r, "U1", ["leads"], Choice.reject, reason=""), Refusal.reason_required),
        (lambda r: ballot("r_missing", "U1", ["leads"]), Refusal.not_found),
    ],
)
async def test_refusals_change_nothing(runner: TransactionRunner, engine, make, refusal) -> None:
    request_id = await new_request(runner)
    with pytest.raises(VoteRefused) as caught:
        await vote(runner, make(request_id))
    assert caught.value.refusal is refusal
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(OutboxJob)) == 0
        kinds = list(await conn.scalars(select(AuditRecord.kind)))
    assert "vote.cast" not in kinds


async def test_one_vote_per_person_and_reject_is_a_veto(runner: TransactionRunner, engine) -> None:
    request_id = await new_request(runner)
    await vote(runner, ballot(request_id, "U1", ["leads"]))
    with pytest.raises(VoteRefused) as again:
        await vote(runner, ballot(request_id, "U1", ["leads"]))
    assert again.value.refusal is Refusal.already_voted
    vetoed = await vote(
        runner, ballot(request_id, "U2", ["leads"], Choice.reject, reason="wrong customer")
    )
    assert vetoed.status.value == "rejected"
    with pytest.raises(VoteRefused) as late:
        await vote(runner, ballot(request_id, "UCFO", ["UCFO"]))
    assert late.value.refusal is Refusal.decided
    async with engine.connect() as conn:
        request = (await conn.execute(select(Request).where(Request.id == request_id))).one()
    assert request.reason == "wrong customer"
    assert request.decided_by == [{"id": "U2", "name": "u2"}]


async def test_concurrent_last_votes_from_two_replicas(db_url: str, engine) -> None:
    """Each round: a request one approval short; two replicas cast the last vote at once."""
    replicas = [TransactionRunner(create_engine(db_url)) for _ in range(2)]
    route = Route.model_validate({"channel": "C1", "approvers": [{"group": "g", "min": 2}]})
    try:
        for _ in range(8):
            request_id = await new_request(replicas[0], route)
            await vote(replicas[0], ballot(request_id, "U0", ["g"]))
            outcomes = await asyncio.gather(
                vote(replicas[0], ballot(request_id, "U1", ["g"])),
                vote(replicas[1], ballot(request_id, "U2", ["g"])),
                return_exceptions=True,
            )
            # One vote completes the quorum; the other arrives at a decided request.
            approved = [o for o in outcomes if not isinstance(o, BaseException)]
            refused = [o for o in outcomes if isinstance(o, VoteRefused)]
            assert [o.status.value for o in approved] == ["approved"]
            assert [r.refusal for r in refused] == [Refusal.decided]
            async with engine.connect() as conn:
                sync_jobs = await conn.scalar(
                    select(func.count())
                    .select_from(OutboxJob)
                    .where(OutboxJob.request_id == request_id, OutboxJob.kind == "webhook.callback")
                )
                decided = await conn.scalar(
                    select(func.count())
                    .select_from(AuditRecord)
                    .where(
                        AuditRecord.request_id == request_id, AuditRecord.kind == "request.decided"
                    )
                )
            assert (sync_jobs, decided) == (1, 1)
    finally:
        for replica in replicas:
            replica.close()
            await replica._engine.dispose()


async def test_what_a_voter_picked_is_kept_audited_and_reaches_the_sync_back(
    runner: TransactionRunner, sessions
) -> None:
    from storage.models import Vote
    from storage.requests import get_decision

    request_id = await new_request(runner)
    await vote(runner, ballot(request_id, "U1", ["leads"], params={"silence": "4h"}, reason="ok"))
    await vote(runner, ballot(request_id, "U2", ["leads"]))
    async with sessions() as session:
        params = dict((await session.execute(select(Vote.user_id, Vote.params))).all())
        audited = [
            record.data
            for record in await session.scalars(
                select(AuditRecord).where(AuditRecord.kind == "vote.cast").order_by(AuditRecord.seq)
            )
        ]
        decision = await get_decision(session, request_id, idempotency_key="k")
    assert params == {"U1": {"silence": "4h"}, "U2": None}
    assert [data.get("params") for data in audited] == [{"silence": "4h"}, None]
    assert [dict(v.params) for v in decision.votes] == [{"silence": "4h"}, {}]


async def test_decisions_are_read_together_each_with_its_own_votes(
    runner: TransactionRunner,
) -> None:
    from storage.requests import read_decision, read_decisions

    first, second = await new_request(runner), await new_request(runner)
    await vote(runner, ballot(first, "U1", ["leads"], reason="fine"))
    await vote(runner, ballot(second, "U2", ["leads"], reason="looks right"))
    await vote(runner, ballot(second, "U3", ["leads"]))

    keys = {first: "k1", second: "k2", "r_missing": "k3"}
    together = await runner.run(lambda session: read_decisions(session, keys))
    one_by_one = {
        request_id: await runner.run(
            lambda session, request_id=request_id: read_decision(
                session, request_id, idempotency_key=keys[request_id]
            )
        )
        for request_id in (first, second)
    }

    assert together == one_by_one  # the missing request is left out, not an error
    assert [(v.id, v.choice, v.reason) for v in together[second].votes] == [
        ("U2", "approve", "looks right"),
        ("U3", "approve", ""),
    ]
    assert [v.id for v in together[first].votes] == ["U1"]
    assert (together[first].idempotency_key, together[second].idempotency_key) == ("k1", "k2")


async def reply_jobs(engine, request_id: str) -> list[tuple[str, list[int]]]:
    """(status, votes it replies to) of each thread-reply job of the request, oldest first."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(OutboxJob.status, OutboxJob.payload)
            .where(OutboxJob.request_id == request_id, OutboxJob.kind == JOBS.thread_reply)
            .order_by(OutboxJob.created_at, OutboxJob.id)
        )
        return [(status, payload["vote_ids"]) for status, payload in rows]


async def test_votes_share_a_thread_reply_nobody_has_attempted_yet(
    runner: TransactionRunner, engine
) -> None:
    """A burst of votes is a few replies listing them, not one reply each; a reply a worker
    holds or has tried once is closed, so a retry never sends more than its first attempt."""
    route = Route.model_validate({"channel": "C1", "approvers": [{"group": "g", "min": 99}]})
    request_id = await new_request(runner, route)
    first = await vote(runner, ballot(request_id, "U1", ["g"]))
    second = await vote(runner, ballot(request_id, "U2", ["g"]))
    assert await reply_jobs(engine, request_id) == [("pending", [first.vote_id, second.vote_id])]

    async with engine.begin() as conn:  # a worker tried it once: it waits for a retry
        await conn.execute(
            update(OutboxJob)
            .where(OutboxJob.request_id == request_id, OutboxJob.kind == JOBS.thread_reply)
            .values(attempts=1)
        )
    third = await vote(runner, ballot(request_id, "U3", ["g"]))
    assert [votes for _, votes in await reply_jobs(engine, request_id)] == [
        [first.vote_id, second.vote_id],
        [third.vote_id],
    ]

    later = [await vote(runner, ballot(request_id, f"UB{n}", ["g"])) for n in range(12)]
    replies = [votes for _, votes in await reply_jobs(engine, request_id)]
    # At most REPLY_MAX_VOTES votes a reply; every vote in exactly one reply.
    assert [len(votes) for votes in replies] == [2, REPLY_MAX_VOTES, 3]
    assert sorted(v for votes in replies for v in votes) == sorted(
        r.vote_id for r in (first, second, third, *later)
    )


async def test_clicks_at_once_share_a_transaction_and_each_gets_its_own_outcome(
    runner: TransactionRunner, engine
) -> None:
    """Group commit: ballots cast together are judged in order in one transaction; a refused
    one is audited and changes nothing, the others count."""
    route = Route.model_validate({"channel": "C1", "approvers": [{"group": "g", "min": 3}]})
    request_id = await new_request(runner, route)
    writer = VoteWriter(runner, JOBS)
    outcomes = await asyncio.gather(
        writer.cast(ballot(request_id, "U1", ["g"])),
        writer.cast(ballot(request_id, "U1", ["g"])),  # a double click
        writer.cast(ballot(request_id, "UX", [])),
        writer.cast(ballot(request_id, "U2", ["g"])),
        writer.refuse(Refused(ballot(request_id, "UY", []), Refusal.unverified, "timeout")),
        writer.cast(ballot(request_id, "U3", ["g"])),
        writer.cast(ballot(request_id, "U4", ["g"])),  # after the quorum
    )
    refusals = [o.refusal if isinstance(o, VoteRefused) else o for o in outcomes]
    assert refusals[1:3] == [Refusal.already_voted, Refusal.not_approver]
    assert refusals[4:] == [None, outcomes[5], Refusal.decided]
    assert [o.status.value for o in (outcomes[0], outcomes[3], outcomes[5])] == [
        "pending",
        "pending",
        "approved",
    ]
    async with engine.connect() as conn:
        kinds = list(
            await conn.scalars(
                select(AuditRecord.kind)
                .where(AuditRecord.kind.in_(["vote.cast", "vote.refused", "request.decided"]))
                .order_by(AuditRecord.seq)
            )
        )
        syncs = await conn.scalar(select(func.count()).where(OutboxJob.kind == "webhook.callback"))
    assert kinds == [
        "vote.cast",
        "vote.refused",
        "vote.refused",
        "vote.cast",
        "vote.refused",
        "vote.cast",
        "request.decided",
        "vote.refused",
    ]
    assert syncs == 1


async def test_a_writer_sees_votes_another_replica_cast_since_its_last(
    db_url: str, runner: TransactionRunner
) -> None:
    """The writer keeps each request's tally between clicks; votes another replica commits in
    between are caught up under the row lock, so quorum and double votes stay exact."""
    route = Route.model_validate({"channel": "C1", "approvers": [{"group": "g", "min": 3}]})
    request_id = await new_request(runner, route)
    writer = VoteWriter(runner, JOBS)
    other = TransactionRunner(create_engine(db_url))
    try:
        assert not isinstance(await writer.cast(ballot(request_id, "U1", ["g"])), VoteRefused)
        await vote(other, ballot(request_id, "U2", ["g"]))
        # Clicked together: one batch, its requests' tallies read together, this request's
        # caught up from the writer's last and a new request's read whole.
        fresh = await new_request(runner, route)
        await vote(other, ballot(fresh, "U2", ["g"]))
        again, first = await asyncio.gather(
            writer.cast(ballot(request_id, "U2", ["g"])), writer.cast(ballot(fresh, "U1", ["g"]))
        )
        assert isinstance(again, VoteRefused) and again.refusal is Refusal.already_voted
        assert not isinstance(first, VoteRefused) and list(first.progress) == [("g", 2, 3)]
        last = await writer.cast(ballot(request_id, "U3", ["g"]))
        assert not isinstance(last, VoteRefused)
        assert last.status.value == "approved"
        assert list(last.progress) == [("g", 3, 3)]
    finally:
        other.close()
        await other._engine.dispose()


async def test_a_ballot_that_fails_does_not_fail_the_clicks_it_shared_a_transaction_with(
    runner: TransactionRunner, engine
) -> None:
    """A ballot whose vote cannot be written (here: groups that are not JSON) fails alone:
    the batch is written again one ballot at a time."""
    route = Route.model_validate({"channel": "C1", "approvers": [{"group": "g", "min": 9}]})
    request_id = await new_request(runner, route)
    writer = VoteWriter(runner, JOBS)
    bad = ballot(request_id, "U2", ["g"], params={"when": object()})
    outcomes = await asyncio.gather(
        writer.cast(ballot(request_id, "U1", ["g"])),
        writer.cast(bad),
        writer.cast(ballot(request_id, "U3", ["g"])),
        return_exceptions=True,
    )
    assert "not JSON serializable" in str(outcomes[1])
    assert [o.status.value for o in (outcomes[0], outcomes[2])] == ["pending", "pending"]
    async with engine.connect() as conn:
        voters = list(await conn.scalars(select(Vote.user_id).order_by(Vote.id)))
    assert voters == ["U1", "U3"]


@pytest.mark.postgres
async def test_a_batch_locks_its_requests_in_id_order_whatever_the_ballots_order(
    postgres_url: str,
) -> None:
    """Two replicas' batches name the same requests in opposite orders (an approver's double
    click reaches both). Locked as the ballots come, each could hold one request and wait for
    the other's: a deadlock. Here another transaction holds the lower id; the batch, whose first
    ballot is for the higher id, must be waiting for the lower one without having locked the
    higher one yet."""
    engine = create_engine(postgres_url)
    await upgrade(engine)
    runner = TransactionRunner(engine)
    try:
        low, high = sorted([await new_request(runner), await new_request(runner)])
        async with engine.connect() as holder:
            await holder.execute(select(Request.id).where(Request.id == low).with_for_update())
            batch = asyncio.create_task(
                runner.run(
                    lambda session: cast_many(
                        session, [ballot(high, "U1", ["leads"]), ballot(low, "U1", ["leads"])], JOBS
                    )
                )
            )
            async with engine.connect() as watcher:
                await wait_for_a_lock_wait(watcher)
            async with engine.connect() as other:
                # NOWAIT: fails at once if the batch had taken the higher id first.
                locked = await other.scalar(
                    select(Request.id).where(Request.id == high).with_for_update(nowait=True)
                )
                assert locked == high
                await other.rollback()
            await holder.rollback()
        outcomes = await batch
        assert [o.status.value for o in outcomes if isinstance(o, VoteResult)] == [
            "pending",
            "pending",
        ]
    finally:
        runner.close()
        await engine.dispose()


async def test_a_card_read_with_an_event_cache_reads_the_event_once_and_the_rest_anew(
    runner: TransactionRunner,
) -> None:
    """The Slack jobs keep the events they read (an event never changes); the request and its
    votes are read anew every time."""
    request_id = await new_request(runner)
    events = EventCache()

    def read(request: str):
        return runner.run(lambda session: read_request(session, request, jobs=False, events=events))

    before = await read(request_id)
    await vote(runner, ballot(request_id, "U1", ["leads"]))
    after = await read(request_id)
    assert after.event is before.event
    assert [v.user_id for v in before.votes] == [] and [v.user_id for v in after.votes] == ["U1"]
    plain = await runner.run(lambda session: read_request(session, request_id, jobs=False))
    assert plain.event.body == after.event.body and plain.request.id == after.request.id
    with pytest.raises(NotFound):
        await read("r-missing")


async def test_a_failed_read_leaves_the_event_cache_usable(runner: TransactionRunner) -> None:
    """A unit that read a card through the cache and then failed (rolled back: on PostgreSQL
    a restart drops its connection) must not leave an expired event in the cache; once the
    cached copy was unusable and every later card of that request failed until it was
    dead-lettered."""
    request_id = await new_request(runner)
    events = EventCache()

    def read_then_fail(session):
        read_request(session, request_id, jobs=False, events=events)
        raise RuntimeError("the connection went away")

    with pytest.raises(RuntimeError):
        await runner.run(read_then_fail)
    view = await runner.run(
        lambda session: read_request(session, request_id, jobs=False, events=events)
    )
    plain = await runner.run(lambda session: read_request(session, request_id, jobs=False))
    assert view.event.body == plain.event.body and view.event.id == plain.event.id


async def test_the_vote_cache_reads_only_newer_votes_and_keeps_the_order(runner) -> None:
    """The Slack jobs keep the votes they read too (storage.requests.VoteCache): each read
    fetches only the votes after the last it has, and the list reads as a plain read does,
    ordered by time then id, whichever replica's clock a vote carries."""
    request_id = await new_request(runner)
    other = await new_request(runner)
    votes = VoteCache()

    def read(request: str):
        def work(session):
            view = read_request(session, request, jobs=False, votes=votes)
            plain = read_request(session, request, jobs=False)
            assert list(view.votes) == list(plain.votes)
            return view

        return runner.run(work)

    assert list((await read(request_id)).votes) == []
    await vote(runner, ballot(request_id, "U1", ["leads"]))
    await vote(runner, ballot(other, "U1", ["leads"]))
    first = await read(request_id)
    # A replica whose clock is behind: its vote has a higher id and an earlier time.
    earlier = ballot(request_id, "U2", ["leads"])
    await vote(runner, dataclasses.replace(earlier, now=first.votes[0].created_at - timedelta(1)))
    second = await read(request_id)
    assert [v.user_id for v in first.votes] == ["U1"]
    assert [v.user_id for v in second.votes] == ["U2", "U1"]
    assert [v.user_id for v in (await read(other)).votes] == ["U1"]
    # Nothing new: the cached list itself, no vote read again.
    assert (await read(request_id)).votes is (await read(request_id)).votes
