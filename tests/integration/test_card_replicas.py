"""Card updates from several replicas: whichever update reaches Slack last, the card ends up
showing the request as it stands. Each replica orders its own updates of a card; across
replicas only the database is shared, so an update re-reads it after sending."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from bot.slack import jobs as slack_jobs
from bot.slack.client import close_client, make_client
from bot.slack.directory import Directory
from bot.slack.standin import DEFAULT_TOKEN, SlackStandIn
from connectors.events import Event
from policies.model import Decision, DecisionKind, Route
from storage import ledger
from storage.db import TransactionRunner, create_engine
from storage.ledger import Intake
from storage.outbox import ClaimedJob
from storage.schema import upgrade
from storage.votes import Ballot, Choice, VoteResult, cast
from tests.support import event_body

pytestmark = pytest.mark.postgres

ROUTE = Route.model_validate({"channel": "C1", "approvers": [{"group": "g", "min": 2}]})


def claimed(kind: str, request_id: str) -> ClaimedJob:
    return ClaimedJob(
        id=f"j-{kind}",
        kind=kind,
        request_id=request_id,
        idempotency_key=f"{kind}-{request_id}",
        payload={"request_id": request_id},
        attempts=1,
        locked_until=datetime.now(UTC) + timedelta(seconds=60),
    )


async def approve(runner: TransactionRunner, request_id: str, user: str) -> VoteResult:
    ballot = Ballot(
        request_id=request_id,
        version="1",
        user_id=user,
        user_name=user.lower(),
        choice=Choice.approve,
        reason="",
        groups=["g"],
        now=datetime.now(UTC),
    )
    return await runner.run(lambda session: cast(session, ballot, slack_jobs.JOBS))


def offers_buttons(standin: SlackStandIn) -> bool:
    [card] = standin.messages("C1")
    return "signoff_approve" in json.dumps(card.blocks)


async def test_an_older_render_reaching_slack_last_is_corrected(postgres_url: str) -> None:
    """Replica A renders the card after the first vote; its chat.update is slow on the way.
    The deciding vote lands on replica B, whose update (no buttons) reaches Slack first. When
    A's older render lands it puts the buttons back, so A must notice and send the card again."""
    engines = [create_engine(postgres_url) for _ in range(2)]
    await upgrade(engines[0])
    runners = [TransactionRunner(engine) for engine in engines]
    async with SlackStandIn(channels={"C1"}) as standin:
        client = make_client(token=DEFAULT_TOKEN, base_url=standin.url)
        a, b = (
            slack_jobs.SlackJobHandlers(client, Directory(client), runner)
            for engine, runner in zip(engines, runners, strict=True)
        )
        try:
            body = event_body(callback_url="http://127.0.0.1:9/cb")
            event = Event.model_validate(
                {**body, "delivery_id": "t:1", "sync": {"callback_url": body["callback_url"]}}
            )
            decision = Decision(kind=DecisionKind.route, rule="r", route=ROUTE)
            [intake] = await ledger.record(
                runners[0], [Intake(event, decision, card_kind=slack_jobs.POST_CARD)]
            )
            request_id = intake.request_id
            assert request_id is not None
            await a.post_card(job=claimed(slack_jobs.POST_CARD, request_id))
            assert offers_buttons(standin)

            await approve(runners[0], request_id, "U1")
            slow = standin.hold_next("chat.update")
            first = asyncio.create_task(a.update_card(job=claimed("first", request_id)))
            await asyncio.wait_for(slow.arrived.wait(), 10)

            decided = await approve(runners[1], request_id, "U2")
            assert decided.status.value == "approved"
            await b.update_card(job=claimed("second", request_id))
            assert not offers_buttons(standin)

            slow.release()  # A's render from before the decision lands last
            await asyncio.wait_for(first, 10)
            assert not offers_buttons(standin), "the card offers buttons on a decided request"
            updates = [call for call in standin.calls_to("chat.update") if call.ok]
            assert len(updates) == 3  # B's, A's older one, and A's again
        finally:
            await close_client(client)
            for runner, engine in zip(runners, engines, strict=True):
                runner.close()
                await engine.dispose()
