"""`GET /metrics` from the running app: the counters move with what the app really did."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from bot.clock import ManualClock
from bot.http import build_app
from bot.service import Services
from bot.settings import load_settings
from tests.integration.conftest import SlackRunning, slack_app
from tests.integration.conftest import test_settings as settings_for
from tests.slack_support import block_action, signed
from tests.support import event_body, sign


async def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:  # type: ignore[type-arg]
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def until(client: TestClient, check, timeout: float = 15.0) -> dict:  # type: ignore[type-arg]
    """Scrape until `check(samples)` holds; the worker delivers in the background."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        samples = await scrape(client)
        if check(samples):
            return samples
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"metrics never got there: {samples}")
        await asyncio.sleep(0.05)


async def post(env: SlackRunning, body: dict, **kw) -> tuple[int, dict]:
    raw, headers = sign(body, **kw)
    response = await env.client.post("/v1/events", data=raw, headers=headers)
    return response.status, await response.json()


async def click(env: SlackRunning, request: dict, user: str) -> None:
    from bot.slack.cards import button_value

    body = block_action(
        action_id="signoff_approve", value=button_value(request["request_id"], "1"), user=user
    )
    response = await env.client.post("/slack/events", data=body, headers=signed(body))
    assert response.status == 200


async def test_intake_decisions_votes_and_pending(slack_running: SlackRunning) -> None:
    env = slack_running
    before = await scrape(env.client)
    assert value(before, "signoff_requests_pending") == 0

    body = event_body(callback_url=env.sink.url)
    raw, headers = sign(body)
    first = await env.client.post("/v1/events", data=raw, headers=headers)
    routed = await first.json()
    assert routed["status"] == "pending"
    again = await env.client.post("/v1/events", data=raw, headers=headers)
    assert (await again.json()) == routed
    forged = await env.client.post(
        "/v1/events", data=raw, headers={**headers, "webhook-signature": "v1,AAAA"}
    )
    assert forged.status == 401
    status, auto = await post(env, event_body(attributes={"amount": 50}))
    assert status == 202 and auto["status"] == "approved"

    samples = await scrape(env.client)
    events = "signoff_events_received_total"
    assert value(samples, events, source="webhook", outcome="accepted") == 2
    assert value(samples, events, source="webhook", outcome="duplicate") == 1
    assert value(samples, events, source="webhook", outcome="refused") == 1
    assert value(samples, "signoff_refusals_total", source="webhook", reason="bad_signature") == 1
    decisions = "signoff_decisions_total"
    assert value(samples, decisions, rule="big-refunds", decision="route") == 1
    assert value(samples, decisions, rule="small-refunds", decision="auto_approve") == 1
    # The auto-approval was final at once: one observation of 0 seconds.
    ttd = "signoff_time_to_decision_seconds"
    assert value(samples, f"{ttd}_count", by="policy") == 1
    assert value(samples, f"{ttd}_bucket", by="policy", le="0.0") == 1
    assert value(samples, f"{ttd}_count", by="vote") == 0
    assert value(samples, "signoff_requests_pending") == 1

    # A refused click, then the quorum: two finance leads and the CFO.
    await click(env, routed, "UNOPE")
    for user in ("UA1", "UA2", "U0CFO"):
        await click(env, routed, user)
    await env.sink.wait_for(1)
    samples = await until(
        env.client,
        lambda s: (
            value(s, "signoff_outbox_attempts_total", kind="webhook.callback", outcome="done") == 1
        ),
    )
    assert value(samples, "signoff_refusals_total", source="slack", reason="not_approver") == 1
    assert value(samples, f"{ttd}_count", by="vote") == 1
    # Decided within the test's few seconds: in the 10 s bucket, not in the 0 s one.
    assert value(samples, f"{ttd}_bucket", by="vote", le="0.0") == 0
    assert value(samples, f"{ttd}_bucket", by="vote", le="10.0") == 1
    assert value(samples, "signoff_requests_pending") == 0
    assert value(samples, "signoff_outbox_attempts_total", kind="slack.post_card", outcome="done")
    # The duplicate and the refusal decided nothing.
    assert value(samples, decisions, rule="big-refunds", decision="route") == 1


async def test_retries_dead_letters_and_slack_errors(slack_running: SlackRunning) -> None:
    env = slack_running
    env.slack.fail_next("chat.postMessage", "channel_not_found")
    status, routed = await post(env, event_body())
    assert status == 202 and routed["status"] == "pending"
    env.sink.fail_with = 500
    status, auto = await post(env, event_body(attributes={"amount": 50}, callback_url=env.sink.url))
    assert status == 202 and auto["status"] == "approved"

    outbox = "signoff_outbox_attempts_total"
    samples = await until(
        env.client,
        lambda s: (
            value(s, outbox, kind="webhook.callback", outcome="dead") == 1
            and value(s, outbox, kind="slack.post_card", outcome="dead") == 1
        ),
    )
    # SIGNOFF_OUTBOX_MAX_ATTEMPTS is 3 in the tests: two retries, then the dead letter.
    assert value(samples, outbox, kind="webhook.callback", outcome="retry") == 2
    assert value(samples, outbox, kind="webhook.callback", outcome="done") == 0
    assert env.sink.attempts == 3
    errors = "signoff_slack_api_errors_total"
    assert value(samples, errors, method="chat.postMessage", code="channel_not_found") == 1
    assert value(samples, outbox, kind="slack.post_card", outcome="retry") == 0


async def test_rate_limited_slack_call_is_counted_and_retried(slack_running: SlackRunning) -> None:
    env = slack_running
    # Twice: the client's own retry of a 429 (inside one call) fails too, so the call fails
    # once and the outbox retries the job.
    env.slack.fail_next("chat.postMessage", "ratelimited", retry_after=0, times=2)
    status, _ = await post(env, event_body())
    assert status == 202
    outbox = "signoff_outbox_attempts_total"
    samples = await until(
        env.client, lambda s: value(s, outbox, kind="slack.post_card", outcome="done") == 1
    )
    assert value(samples, outbox, kind="slack.post_card", outcome="retry") == 1
    errors = "signoff_slack_api_errors_total"
    assert value(samples, errors, method="chat.postMessage", code="ratelimited") == 1


async def test_expiry_is_observed_by_the_timer_sweep(db_url: str) -> None:
    clock = ManualClock(datetime.now(UTC))
    services = await Services.start(load_settings(**settings_for(db_url)), clock=clock)
    client = TestClient(TestServer(build_app(services), host="127.0.0.1"))
    await client.start_server()
    try:
        raw, headers = sign(event_body())
        answer = await (await client.post("/v1/events", data=raw, headers=headers)).json()
        assert answer["status"] == "pending"
        clock.advance(timedelta(hours=25))  # the route expires after 24h
        await services.scheduler.tick()
        samples = await scrape(client)
        ttd = "signoff_time_to_decision_seconds"
        assert value(samples, f"{ttd}_count", by="expiry") == 1
        # Created at the real now, expired at the manual clock's now + 25h.
        assert 25 * 3600 - 60 < value(samples, f"{ttd}_sum", by="expiry") < 25 * 3600 + 60
        assert value(samples, f"{ttd}_bucket", by="expiry", le="86400.0") == 0
        assert value(samples, f"{ttd}_bucket", by="expiry", le="259200.0") == 1
        assert value(samples, "signoff_requests_pending") == 0
    finally:
        await client.close()
        await services.close()


async def test_each_app_has_its_own_registry(db_url: str) -> None:
    async with slack_app(db_url) as one, slack_app(db_url) as two:
        status, _ = await post(one, event_body(attributes={"amount": 50}))
        assert status == 202
        first, second = await scrape(one.client), await scrape(two.client)
    events = "signoff_events_received_total"
    assert value(first, events, source="webhook", outcome="accepted") == 1
    assert value(second, events, source="webhook", outcome="accepted") == 0
