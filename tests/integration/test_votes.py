"""Quorum, veto and authorization in storage, and concurrent last votes from two "replicas"
(separate engines, so separate connections and transactions) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from sqlalchemy import func, select, update

from connectors.events import Event
from policies.model import Decision, DecisionKind, Route
from storage import ledger
from storage.db import TransactionRunner, create_engine
from storage.ledger import Intake
from storage.models import AuditRecord, OutboxJob, Request
from storage.votes import Ballot, Choice, Refusal, SlackJobs, VoteRefused, cast
from tests.support import event_body

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
