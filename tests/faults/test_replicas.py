"""Case 6: three `signoff serve` replicas on one PostgreSQL database, clicks spread across them."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from storage.models import Request, Vote
from tests.conftest import fresh_postgres_database
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
    wait_until,
)
from tests.support import event_body

REQUESTS = 12
REPLICAS = 3
# Big refunds need two of @finance-leads (UA1, UA2; Dana is the actor) and U0CFO.
APPROVERS = ("UA1", "UA2", "U0CFO")


@pytest.mark.postgres
@pytest.mark.timeout(180)
async def test_three_replicas_one_decision_one_sync_back_one_card(tmp_path: Path) -> None:
    """Behind a load balancer every click may land on any replica, and an impatient approver
    double-clicks: here each approver's click reaches two replicas at once, all requests'
    clicks together, while more events keep arriving. Each request gets one card, one vote per
    approver, one decision and one callback; each vote one thread reply."""
    source = Source()
    async with (
        fresh_postgres_database() as db_url,
        slack_standin() as slack,
        callback_sink() as sink,
    ):
        env = serve_env(db_url, slack=slack)
        async with (
            serving(env, tmp_path / "serve", REPLICAS) as replicas,
            httpx.AsyncClient(timeout=60) as client,
        ):
            urls = itertools.cycle([r.url for r in replicas])
            request_ids = []
            for _ in range(REQUESTS):
                body = event_body(callback_url=sink.url)
                answer = await source.deliver(client, next(urls), body, f"m_{uuid.uuid4().hex}")
                assert answer["status"] == "pending"
                request_ids.append(answer["request_id"])

            async def cards() -> bool:
                return set(await request_ids_with_cards(db_url)) == set(request_ids)

            await wait_until(cards, timeout=30, what="every card")

            loading = True

            async def load() -> None:
                # Auto-approved events meanwhile: intake and sync-backs on every replica.
                while loading:
                    body = event_body(attributes={"amount": 10}, callback_url=sink.url)
                    await source.deliver(client, next(urls), body, f"m_{uuid.uuid4().hex}")

            loaders = [asyncio.create_task(load()) for _ in range(REPLICAS)]
            clicks = []
            for n, (request_id, user) in enumerate(itertools.product(request_ids, APPROVERS)):
                for replica in (replicas[n % REPLICAS], replicas[(n + 1) % REPLICAS]):
                    clicks.append(click(client, replica.url, request_id, user))
            await asyncio.gather(*clicks)
            loading = False
            await asyncio.gather(*loaders)
            assert not source.unavailable, "the database is up: nothing should be a 503"

            async with database(db_url) as sessions, sessions() as session:
                rows = await session.execute(select(Request.id, Request.status))
                statuses = {row.id: row.status for row in rows}
                votes = await session.scalar(select(func.count()).select_from(Vote))
            assert {statuses[rid] for rid in request_ids} == {"approved"}
            assert votes == REQUESTS * len(APPROVERS)

            await sink.wait_for(len(source.accepted), timeout=60)
            await Outcome(db_url, env, source, sinks=[sink], slack=slack).check(
                thread_replies=dict.fromkeys(request_ids, len(APPROVERS))
            )
