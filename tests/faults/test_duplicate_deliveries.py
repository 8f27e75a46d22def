"""Case 3: every inbound delivery sent three times, concurrently."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import fresh_postgres_database
from tests.faults.conftest import (
    Outcome,
    Source,
    callback_sink,
    request_ids_with_cards,
    serve_env,
    serving,
    slack_standin,
    wait_until,
)
from tests.support import event_body

DELIVERIES = 30
COPIES = 3


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def setup(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """(database URL, replicas): one process on SQLite; on PostgreSQL three replicas, so that
    the copies of a delivery race in different processes and transactions."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'signoff.db'}", 1
        return
    async with fresh_postgres_database() as url:
        yield url, 3


async def test_each_delivery_three_times_at_once_is_one_request(
    setup: tuple[str, int], tmp_path: Path
) -> None:
    """A source that times out and retries, or a load balancer that replays, sends the same
    `webhook-id` again while the first copy is still being written: all copies get the same
    answer, and there is one event, one request, one card, one callback."""
    db_url, replicas = setup
    source = Source()
    async with (
        slack_standin() as slack,
        callback_sink() as sink,
    ):
        env = serve_env(db_url, slack=slack)
        async with serving(env, tmp_path / "serve", replicas) as serves:
            bodies = []
            for n in range(DELIVERIES):
                # Alternately routed (a card) and auto-approved (a callback).
                amount = 4200 if n % 2 else 10 + n
                bodies.append(
                    (
                        f"msg_{uuid.uuid4().hex}",
                        event_body(attributes={"amount": amount}, callback_url=sink.url),
                    )
                )
            async with httpx.AsyncClient(timeout=30) as client:

                async def copies(msg_id: str, body: dict) -> list[dict]:
                    # Each copy to its own replica when there are several.
                    return await asyncio.gather(
                        *(
                            source.deliver(client, serves[c % len(serves)].url, body, msg_id)
                            for c in range(COPIES)
                        )
                    )

                answers = await asyncio.gather(*(copies(m, b) for m, b in bodies))

            for (msg_id, _), copies_answered in zip(bodies, answers, strict=True):
                assert all(a == copies_answered[0] for a in copies_answered), copies_answered
                assert copies_answered[0]["request_id"] is not None, msg_id
            # The database is up: a 503 here would be a race between the copies turned into
            # an error (a deadlock, a unique violation not retried).
            assert not source.unavailable, source.unavailable
            request_ids = {a[0]["request_id"] for a in answers}
            assert len(request_ids) == DELIVERIES

            routed = {a[0]["request_id"] for a in answers if a[0]["status"] == "pending"}

            async def cards_posted() -> bool:
                return set(await request_ids_with_cards(db_url)) == routed

            await wait_until(cards_posted, what="every routed request's card")
            await sink.wait_for(DELIVERIES - len(routed))
            await Outcome(db_url, env, source, sinks=[sink], slack=slack).check()
