"""Slack failing on purpose, through the whole stack: the real outbox worker against the Slack
stand-in. A card Slack refuses is dead-lettered with a reason an operator can act on and can be
replayed; a rate limit or an outage delays a card but never loses or duplicates it."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest

from bot.operator import replay_command, show_request_command
from bot.slack.jobs import POST_CARD, THREAD_REPLY, UPDATE_CARD
from bot.slack.standin import SlackStandIn
from storage.models import JobStatus
from storage.outbox import JobView, list_jobs_for_request
from tests.integration.conftest import SlackRunning, slack_app
from tests.integration.test_slack_flow import card_posted, click, routed, wait_until

CHANNEL = "C0FINANCE"  # where the test policy routes a big refund


@pytest.fixture
async def patient_slack(db_url: str) -> AsyncIterator[SlackRunning]:
    """Like `slack_running`, with an attempt budget that outlasts a Slack outage of seconds
    (the shared fixture dead-letters a job after three quick attempts)."""
    async with slack_app(
        db_url, SIGNOFF_OUTBOX_BACKOFF_MAX=0.1, SIGNOFF_OUTBOX_MAX_ATTEMPTS=50
    ) as env:
        yield env


async def job_of(env: SlackRunning, request_id: str, kind: str) -> JobView | None:
    async with env.services.sessions() as session:
        jobs = await list_jobs_for_request(session, request_id)
    return next((job for job in jobs if job.kind == kind), None)


async def wait_for_job(
    env: SlackRunning,
    request_id: str,
    kind: str,
    until: Callable[[JobView], bool],
    timeout: float = 5.0,
) -> JobView:
    """The request's job of `kind` once `until` holds for it."""
    seen: list[JobView] = []

    async def reached() -> bool:
        job = await job_of(env, request_id, kind)
        seen[:] = [job] if job is not None else []
        return job is not None and until(job)

    try:
        await wait_until(reached, timeout)
    except AssertionError:
        raise AssertionError(f"{kind} of {request_id} never got there: {seen}") from None
    return seen[0]


def is_dead(job: JobView) -> bool:
    return job.status is JobStatus.dead


def is_done(job: JobView) -> bool:
    return job.status is JobStatus.done


async def shown(env: SlackRunning, request_id: str) -> str:
    out = io.StringIO()
    assert (
        await show_request_command(env.services.sessions, request_id, as_json=False, out=out) == 0
    )
    return out.getvalue()


# --- Slack refuses the card: dead at once, shown to the operator, replayable ----------------


@dataclass(frozen=True)
class Refusal:
    error: str
    hint: str
    breaks: Callable[[SlackStandIn], None]
    mends: Callable[[SlackStandIn], None]


def _no_channel(slack: SlackStandIn) -> None:
    slack.channels.discard(CHANNEL)


def _channel_back(slack: SlackStandIn) -> None:
    slack.channels.add(CHANNEL)


def _bot_not_invited(slack: SlackStandIn) -> None:
    slack.channels.discard(CHANNEL)
    slack.not_in_channel.add(CHANNEL)


def _bot_invited(slack: SlackStandIn) -> None:
    slack.not_in_channel.discard(CHANNEL)
    slack.channels.add(CHANNEL)


def _blocks_refused(slack: SlackStandIn) -> None:
    slack.fail_next("chat.postMessage", error="invalid_blocks")


def _nothing(slack: SlackStandIn) -> None:
    """The injected refusal was used up by the first attempt."""


REFUSALS = [
    pytest.param(
        Refusal(
            "channel_not_found",
            "the route's channel id is wrong or the channel is private",
            _no_channel,
            _channel_back,
        ),
        id="channel_not_found",
    ),
    pytest.param(
        Refusal(
            "not_in_channel",
            "invite the Signoff app to the channel",
            _bot_not_invited,
            _bot_invited,
        ),
        id="not_in_channel",
    ),
    pytest.param(
        Refusal("invalid_blocks", "Slack refused the card's blocks", _blocks_refused, _nothing),
        id="invalid_blocks",
    ),
]


@pytest.mark.parametrize("refusal", REFUSALS)
async def test_refused_card_is_dead_lettered_shown_and_replayed(
    slack_running: SlackRunning, refusal: Refusal
) -> None:
    env = slack_running
    refusal.breaks(env.slack)
    request = await routed(env)
    request_id = request["request_id"]

    dead = await wait_for_job(env, request_id, POST_CARD, is_dead)
    # Terminal: one attempt, no retries spent on an error that will not go away by itself.
    assert dead.attempts == 1
    assert dead.last_error == f"Slack refused chat.postMessage: {refusal.error}: {refusal.hint}"
    assert [c.error for c in env.slack.calls_to("chat.postMessage")] == [refusal.error]
    assert env.slack.messages(CHANNEL) == []

    [line] = [line for line in (await shown(env, request_id)).splitlines() if dead.id in line]
    assert f"{POST_CARD} dead after 1 attempt(s)" in line
    assert f"last error: {dead.last_error}" in line
    assert f"(replay with `signoff replay {dead.id}`)" in line

    refusal.mends(env.slack)
    out = io.StringIO()
    assert await replay_command(env.services.sessions, request_id, out=out) == 0
    assert out.getvalue() == f"re-queued {dead.id}\n"

    # No wake-up: an operator replays from another process, so the worker's poll finds it.
    channel, ts = await card_posted(env, request_id)
    done = await wait_for_job(env, request_id, POST_CARD, is_done)
    assert (done.id, done.attempts) == (dead.id, 1), "the same job, with a fresh budget"
    assert channel == CHANNEL
    [card] = env.slack.messages(CHANNEL)
    assert card.ts == ts and card.thread_ts is None
    assert "signoff_approve" in json.dumps(card.blocks)
    assert [c.error for c in env.slack.calls_to("chat.postMessage")] == [refusal.error, None]


# --- Rate limited: slack_sdk absorbs one 429, the outbox waits out the next ------------------


async def test_rate_limited_card_is_posted_once_after_retry_after(
    slack_running: SlackRunning,
) -> None:
    env = slack_running
    env.slack.fail_next("chat.postMessage", error="ratelimited", retry_after=1, times=2)
    request = await routed(env)
    request_id = request["request_id"]

    done = await wait_for_job(env, request_id, POST_CARD, is_done, timeout=8)
    # Two outbox attempts for three calls: the client's retry handler repeated the first call
    # itself; its second 429 went back to the outbox, which kept Retry-After as the delay.
    assert done.attempts == 2
    assert "ratelimited (HTTP 429)" in done.last_error
    calls = env.slack.calls_to("chat.postMessage")
    assert [(c.status, c.error) for c in calls] == [
        (429, "ratelimited"),
        (429, "ratelimited"),
        (200, None),
    ]
    retry_after = timedelta(seconds=1)
    assert calls[1].at - calls[0].at >= retry_after, "slack_sdk retried before Retry-After"
    assert calls[2].at - calls[1].at >= retry_after, "the outbox retried before Retry-After"

    [card] = env.slack.messages(CHANNEL)
    _channel, ts = await card_posted(env, request_id)
    assert card.ts == ts


# --- Slack down: the card waits, and what a vote says waits for the card --------------------


def _not_posted_yet(job: JobView) -> bool:
    return job.status is not JobStatus.dead and "is not posted yet" in job.last_error


async def test_card_survives_an_outage_and_updates_land_after_it(
    patient_slack: SlackRunning,
) -> None:
    env = patient_slack
    env.slack.fail_every(1, method="chat.postMessage", error="internal_error")
    request = await routed(env)
    request_id = request["request_id"]

    failing = await wait_for_job(env, request_id, POST_CARD, lambda job: job.attempts >= 2)
    assert failing.status in (JobStatus.pending, JobStatus.running)
    assert "Slack chat.postMessage: internal_error" in failing.last_error

    assert await click(env, "signoff_approve", request, "UA1", name="ana") == 200
    await wait_for_job(env, request_id, UPDATE_CARD, _not_posted_yet)
    await wait_for_job(env, request_id, THREAD_REPLY, _not_posted_yet)
    # Waiting means not calling Slack at all: nothing to update, nowhere to reply.
    assert env.slack.calls_to("chat.update") == []
    assert all("thread_ts" not in c.params for c in env.slack.calls_to("chat.postMessage"))
    assert env.slack.messages(CHANNEL) == []

    env.slack.clear_faults()
    for kind in (POST_CARD, UPDATE_CARD, THREAD_REPLY):
        await wait_for_job(env, request_id, kind, is_done)

    delivered = [
        ("reply" if "thread_ts" in c.params else "card")
        if c.method == "chat.postMessage"
        else c.method
        for c in env.slack.calls
        if c.ok and c.method in {"chat.postMessage", "chat.update"}
    ]
    assert delivered[0] == "card"
    assert sorted(delivered[1:]) == ["chat.update", "reply"]

    card, reply = env.slack.messages(CHANNEL)
    _channel, ts = await card_posted(env, request_id)
    assert card.ts == ts and card.thread_ts is None
    assert card.edits == 1, "the update brought the card up to date with the vote"
    assert "UA1" in json.dumps(card.blocks)
    assert reply.thread_ts == ts
    assert reply.text is not None and "UA1" in reply.text and "approved" in reply.text
