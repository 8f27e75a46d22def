"""Case 4: Slack answers 429 with Retry-After to every second call for a while."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
from sqlalchemy import func, select

from storage.models import AuditRecord, Vote
from tests.faults.conftest import (
    Outcome,
    Source,
    callback_sink,
    click,
    database,
    request_ids_with_cards,
    serve_env,
    serving,
    slack_standin,
    vote,
    wait_until,
)
from tests.support import event_body

REQUESTS = 8
# Big refunds need two of @finance-leads (UA1, UA2; Dana is the actor) and U0CFO.
APPROVERS = ("UA1", "UA2", "U0CFO")
FAULT_SECONDS = 6.0


async def refused_unverified(db_url: str) -> int:
    async with database(db_url) as sessions, sessions() as session:
        data = await session.scalars(
            select(AuditRecord.data_json).where(AuditRecord.kind == "vote.refused")
        )
        return sum(json.loads(d)["refusal"] == "unverified" for d in data)


async def counted_votes(db_url: str) -> int:
    async with database(db_url) as sessions, sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(Vote)) or 0)


async def test_rate_limited_slack_gets_every_card_once_and_in_order(tmp_path: Path) -> None:
    """While Slack rate-limits every second call (HTTP 429, `Retry-After: 1`), requests arrive
    and are voted on: every card is posted once, its updates and thread replies come after it,
    each card ends showing its request's final state, and every decision is synced back.

    Slack's limits last a minute; here the fault lasts FAULT_SECONDS, which with a one-second
    Retry-After is still several rate-limited rounds for every job. Half the requests are voted
    on as soon as they are accepted, before their cards can be out, as a superseding version
    or an expiry would change a request whose card is still queued: their updates and replies
    must wait for the card.
    """
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'signoff.db'}"
    source = Source()
    async with slack_standin() as slack, callback_sink() as sink:
        env = serve_env(db_url, slack=slack)
        async with (
            serving(env, tmp_path / "serve") as [serve],
            httpx.AsyncClient(timeout=30) as client,
        ):
            request_ids = []

            async def accept() -> None:
                body = event_body(callback_url=sink.url)
                answer = await source.deliver(client, serve.url, body, f"m_{uuid.uuid4().hex}")
                assert answer["status"] == "pending"
                request_ids.append(answer["request_id"])

            # Regressions, on a first request. The first click after a start, while Slack
            # rate-limits auth.test, was answered "reinstall this app" by Bolt and dropped.
            # A click whose approver check Slack rate-limits (the requester's lookup by email,
            # twice: slack_sdk retries once) was a 500 and left no trace. It is refused,
            # audited, and the approver told to click again.
            await accept()
            slack.fail_next("auth.test", times=2, retry_after=1)
            slack.fail_next("users.lookupByEmail", times=2, retry_after=1)
            await click(client, serve.url, request_ids[0], "UA1")
            assert await refused_unverified(db_url) == 1
            assert await counted_votes(db_url) == 0
            assert [c.status for c in slack.calls_to("auth.test")] == [429, 429]

            slack.fail_every(2, for_seconds=FAULT_SECONDS, retry_after=1)
            for _ in range(REQUESTS - 1):
                await accept()

            early, late = request_ids[::2], request_ids[1::2]
            await asyncio.gather(
                *(vote(client, serve.url, db_url, rid, user) for rid in early for user in APPROVERS)
            )

            async def cards() -> bool:
                return set(await request_ids_with_cards(db_url)) == set(request_ids)

            await wait_until(cards, timeout=30, what="every card")
            for user in APPROVERS:
                await asyncio.gather(*(vote(client, serve.url, db_url, rid, user) for rid in late))

            await sink.wait_for(REQUESTS, timeout=40)
            limited = [c for c in slack.calls_to("chat.postMessage") if c.status == 429]
            assert limited, "Slack should have rate-limited card posts"
            await Outcome(db_url, env, source, sinks=[sink], slack=slack).check(
                thread_replies=dict.fromkeys(request_ids, len(APPROVERS))
            )
            assert all(d.body["status"] == "approved" for d in sink.deliveries)
