"""`GET /v1/requests/{id}` (bearer token, long poll) and the guarded decision transition."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from sqlalchemy import func, select

from storage.models import OutboxJob, RequestStatus
from storage.requests import decide
from tests.integration.conftest import API_TOKEN, Running, running_app
from tests.integration.conftest import test_settings as settings_for
from tests.support import CallbackSink, event_body, sign

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def routed(running: Running, **overrides) -> str:
    raw, headers = sign(event_body(**overrides))
    response = await running.client.post("/v1/events", data=raw, headers=headers)
    answer = await response.json()
    assert answer["status"] == "pending"
    return str(answer["request_id"])


async def approve(running: Running, request_id: str, who: str = "U1") -> bool:
    return await decide(
        running.services.sessions,
        request_id,
        status=RequestStatus.approved,
        decided_by=[{"id": who, "name": who}],
        reason="looks fine",
        actor=f"slack:{who}",
        now=datetime.now(UTC),
    )


async def test_a_request_signed_like_a_webhook_may_read_it(db_url: str) -> None:
    """No API token needed: the source signs the GET with the webhook secret, over the path and
    query it asks for, so the signature cannot be reused to read another request."""
    settings = settings_for(db_url)
    del settings["SIGNOFF_API_TOKEN"]
    async with running_app(settings) as app:
        request_id = await routed(app)
        other_id = await routed(app)
        path = f"/v1/requests/{request_id}?wait=0"
        _, headers = sign(path.encode())
        answer = await app.client.get(path, headers=headers)
        assert answer.status == 200
        assert (await answer.json())["id"] == request_id
        # The same signature for another request, or another query, is refused.
        moved = await app.client.get(f"/v1/requests/{other_id}?wait=0", headers=headers)
        assert moved.status == 401
        assert (
            "signed request refused: no webhook-signature matches" in (await moved.json())["error"]
        )
        longer = await app.client.get(f"/v1/requests/{request_id}?wait=30", headers=headers)
        assert longer.status == 401
        # A stale signature is refused like a stale webhook.
        _, stale = sign(path.encode(), timestamp=int(time.time()) - 3600)
        assert (await app.client.get(path, headers=stale)).status == 401
        # Without a signature and without a token configured: 401 saying how to get in.
        bare = await app.client.get(path)
        assert bare.status == 401
        assert "SIGNOFF_WEBHOOK_SECRET" in (await bare.json())["error"]


async def test_request_needs_the_bearer_token(running: Running) -> None:
    request_id = await routed(running)
    assert (await running.client.get(f"/v1/requests/{request_id}")).status == 401
    wrong = {"Authorization": "Bearer nope"}
    assert (await running.client.get(f"/v1/requests/{request_id}", headers=wrong)).status == 401
    ok = await running.client.get(f"/v1/requests/{request_id}", headers=AUTH)
    assert ok.status == 200
    body = await ok.json()
    assert body["status"] == "pending"
    assert body["rule"] == "big-refunds"
    assert any(step["outcome"] == "matched" for step in body["trace"])


async def test_unknown_request_is_404_and_bad_wait_is_400(running: Running) -> None:
    assert (await running.client.get("/v1/requests/r_nope", headers=AUTH)).status == 404
    bad = await running.client.get("/v1/requests/r_nope?wait=soon", headers=AUTH)
    assert bad.status == 400
    assert (await running.client.get("/v1/requests/x?wait=-1", headers=AUTH)).status == 400


async def test_long_poll_returns_when_decided(running: Running) -> None:
    request_id = await routed(running)

    async def decide_soon() -> None:
        await asyncio.sleep(0.3)
        assert await approve(running, request_id)

    started = time.monotonic()
    poll = asyncio.create_task(
        running.client.get(f"/v1/requests/{request_id}?wait=20", headers=AUTH)
    )
    await decide_soon()
    response = await poll
    elapsed = time.monotonic() - started
    body = await response.json()
    assert body["status"] == "approved"
    assert body["decided_by"] == [{"id": "U1", "name": "U1"}]
    assert elapsed < 5, "the long poll should wake on the decision, not wait out its time"


async def test_long_poll_times_out_with_pending(running: Running) -> None:
    request_id = await routed(running)
    started = time.monotonic()
    response = await running.client.get(f"/v1/requests/{request_id}?wait=1", headers=AUTH)
    assert (await response.json())["status"] == "pending"
    assert time.monotonic() - started >= 0.9


async def test_decided_twice_stays_decided_once(running: Running, sink: CallbackSink) -> None:
    request_id = await routed(running, callback_url=sink.url)
    results = await asyncio.gather(*(approve(running, request_id, f"U{i}") for i in range(8)))
    assert results.count(True) == 1
    async with running.services.sessions() as session:
        jobs = await session.scalar(
            select(func.count()).select_from(OutboxJob).where(OutboxJob.request_id == request_id)
        )
    assert jobs == 1
    await sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(sink.deliveries) == 1
    assert sink.deliveries[0].body["status"] == "approved"
