"""The GitHub connector through the running service: signed deliveries into `/hooks/github`,
reviews through the real outbox worker to the GitHub API stand-in, and a Slack approval ending
in exactly one review."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import jsonschema
import pytest
from sqlalchemy import func, select

from bot.slack.cards import button_value
from connectors.github.standin import GitHubStandIn
from storage.models import AuditRecord, EventRecord, JobStatus, OutboxJob, Request
from tests.github_support import (
    POLICY,
    WEBHOOK_SECRET,
    deployment_payload,
    fixture,
    github_settings,
    github_signed,
    github_standin,
    review_schema,
)
from tests.integration.conftest import Running, running_app, slack_app
from tests.integration.conftest import test_settings as app_settings
from tests.slack_support import block_action, signed


@dataclass
class GitHubRunning:
    app: Running
    github: GitHubStandIn


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[GitHubRunning]:
    async with github_standin() as standin:
        settings = app_settings(db_url, SIGNOFF_POLICY_PATH=str(POLICY), **github_settings(standin))
        async with running_app(settings) as app:
            yield GitHubRunning(app, standin)


async def deliver(env: GitHubRunning, payload: dict | bytes, **kw) -> tuple[int, dict]:
    raw, headers = github_signed(payload, **kw)
    response = await env.app.client.post("/hooks/github", data=raw, headers=headers)
    return response.status, await response.json()


async def sync_job(env: GitHubRunning, *statuses: JobStatus, timeout: float = 10.0) -> OutboxJob:
    """The request's github.review job, once it reaches one of `statuses`."""
    for _ in range(int(timeout / 0.05)):
        async with env.app.services.sessions() as session:
            job = await session.scalar(select(OutboxJob).where(OutboxJob.kind == "github.review"))
        if job is not None and job.status in statuses:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"the github.review job never became {statuses}")


async def count(env: GitHubRunning, model) -> int:
    async with env.app.services.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


# --- intake ----------------------------------------------------------------------------------


async def test_ping_is_answered_and_nothing_stored(env: GitHubRunning) -> None:
    status, answer = await deliver(env, fixture("ping.json"), event="ping")
    assert (status, answer) == (200, {"ok": True, "event": "ping"})
    assert await count(env, EventRecord) == 0


async def test_other_events_are_acknowledged_and_ignored(env: GitHubRunning) -> None:
    status, answer = await deliver(env, {"action": "created", "zen": "x"}, event="star")
    assert status == 200 and "star" in answer["ignored"]
    assert await count(env, EventRecord) == 0


async def test_bad_signature_is_401_audited_and_stores_nothing(env: GitHubRunning) -> None:
    raw, headers = github_signed(deployment_payload(), secret="not the secret")
    response = await env.app.client.post("/hooks/github", data=raw, headers=headers)
    assert response.status == 401
    assert await count(env, EventRecord) == 0
    async with env.app.services.sessions() as session:
        refused = await session.scalar(
            select(AuditRecord).where(AuditRecord.kind == "event.refused")
        )
    assert refused is not None and refused.actor == "source:github"
    assert refused.data["reason"] == "bad_signature"
    assert "not the secret" not in json.dumps(refused.data)


async def test_malformed_payload_is_400_naming_the_field(env: GitHubRunning) -> None:
    payload = deployment_payload()
    del payload["installation"]
    status, answer = await deliver(env, payload)
    assert status == 400 and "installation" in answer["error"]


async def test_redelivery_creates_nothing_new(env: GitHubRunning) -> None:
    payload = deployment_payload()
    first = await deliver(env, payload, delivery="guid-1")
    again = await deliver(env, payload, delivery="guid-1")
    assert first[0] == again[0] == 202
    assert first[1]["requests"] == again[1]["requests"]
    assert first[1]["requests"][0]["status"] == "pending"
    assert await count(env, Request) == 1


# --- reviews through the outbox --------------------------------------------------------------


async def test_auto_approved_deployment_is_reviewed_once(env: GitHubRunning) -> None:
    status, answer = await deliver(env, deployment_payload(environment="staging"))
    assert status == 202 and answer["requests"][0]["status"] == "approved"
    [review] = await env.github.wait_for_reviews(1)
    jsonschema.validate(review.body, review_schema())
    assert review.body["environment_name"] == "staging"
    assert review.body["state"] == "approved"
    assert "policy rule staging-deploys" in review.body["comment"]
    request_id = answer["requests"][0]["request_id"]
    assert f"sync-{request_id}" in review.body["comment"]
    job = await sync_job(env, JobStatus.done)
    assert job.result is not None and job.result["state"] == "approved"
    assert env.github.token_calls == [review.installation_id]


async def test_auto_rejected_deployment_is_reviewed_rejected(env: GitHubRunning) -> None:
    status, _ = await deliver(env, deployment_payload(repo="octo-org/frozen"))
    assert status == 202
    [review] = await env.github.wait_for_reviews(1)
    assert (review.owner, review.repo) == ("octo-org", "frozen")
    assert review.body["state"] == "rejected"
    assert "policy rule frozen-repo" in review.body["comment"]


@pytest.mark.parametrize("refusal", [404, 422])
async def test_refusals_are_dead_lettered_with_githubs_message(
    env: GitHubRunning, refusal: int
) -> None:
    env.github.answers = [refusal]
    await deliver(env, deployment_payload(environment="staging"))
    job = await sync_job(env, JobStatus.dead, JobStatus.done)
    assert job.status == JobStatus.dead and job.attempts == 1
    assert f"HTTP {refusal}" in job.last_error
    assert f"answering {refusal} on purpose" in job.last_error
    assert env.github.reviews == []
    token_secret = "ghs_"
    assert token_secret not in job.last_error


async def test_5xx_is_retried_until_the_review_lands(env: GitHubRunning) -> None:
    env.github.answers = [502]
    await deliver(env, deployment_payload(environment="staging"))
    job = await sync_job(env, JobStatus.done, JobStatus.dead)
    assert job.status == JobStatus.done and job.attempts == 2
    assert len(env.github.reviews) == 1 and env.github.review_calls == 2
    # The retry reused the cached installation token.
    assert len(env.github.token_calls) == 1


async def test_two_reviews_share_one_installation_token(env: GitHubRunning) -> None:
    await deliver(env, deployment_payload(environment="staging", run_id=1))
    await deliver(env, deployment_payload(environment="staging", run_id=2))
    reviews = await env.github.wait_for_reviews(2)
    assert sorted(r.run_id for r in reviews) == [1, 2]
    assert len(env.github.token_calls) == 1


# --- a Slack approval for a GitHub deployment ------------------------------------------------


async def test_slack_approval_ends_in_exactly_one_review(db_url: str) -> None:
    async with (
        github_standin() as standin,
        slack_app(db_url, **github_settings(standin)) as env,
    ):
        raw, headers = github_signed(deployment_payload())
        response = await env.client.post("/hooks/github", data=raw, headers=headers)
        assert response.status == 202
        [request] = (await response.json())["requests"]
        assert request["status"] == "pending"

        for _ in range(100):  # the card goes out through the outbox
            if env.slack.messages("C0APPROVALS"):
                break
            await asyncio.sleep(0.05)
        [card] = env.slack.messages("C0APPROVALS")
        assert "terraform-test-github/sample-app" in json.dumps(card.blocks)
        assert standin.review_calls == 0, "nothing goes to GitHub before a decision"

        body = block_action(
            action_id="signoff_approve",
            value=button_value(request["request_id"], "1039846015"),
            user="UA1",
            name="ana",
            channel="C0APPROVALS",
            ts=card.ts,
        )
        clicked = await env.client.post("/slack/events", data=body, headers=signed(body))
        assert clicked.status == 200

        [review] = await standin.wait_for_reviews(1)
        await asyncio.sleep(0.5)  # a second review, if any, would arrive meanwhile
        assert standin.review_calls == 1 and len(standin.reviews) == 1
        jsonschema.validate(review.body, review_schema())
        assert (review.owner, review.repo, review.run_id) == (
            "terraform-test-github",
            "sample-app",
            5453085689,
        )
        assert review.body["state"] == "approved"
        assert review.body["environment_name"] == "production"
        assert review.body["comment"].startswith("Approved in Signoff by ana (UA1)")


async def test_no_secret_reaches_logs_audit_or_jobs(
    env: GitHubRunning, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    await deliver(env, deployment_payload(environment="staging", run_id=1))
    await env.github.wait_for_reviews(1)
    # A revoked token (401, retried with a new one) and a refusal (dead letter).
    env.github.revoke_tokens()
    env.github.answers = [404]
    await deliver(env, deployment_payload(environment="staging", run_id=2))
    await deliver(env, deployment_payload(environment="staging", run_id=3))
    await env.github.wait_for_reviews(2)
    for _ in range(200):
        async with env.app.services.sessions() as session:
            jobs = list(await session.scalars(select(OutboxJob)))
        if all(job.status in (JobStatus.done, JobStatus.dead) for job in jobs):
            break
        await asyncio.sleep(0.05)
    async with env.app.services.sessions() as session:
        audit = list(await session.scalars(select(AuditRecord)))
    assert sorted(job.status for job in jobs) == [JobStatus.dead, JobStatus.done, JobStatus.done]
    assert len(env.github.token_calls) == 2
    seen = "\n".join(
        [caplog.text]
        + [json.dumps(record.data) for record in audit]
        + [f"{job.last_error} {json.dumps(job.result)}" for job in jobs]
    )
    assert "401" in seen and "404" in seen, "the failures were recorded"
    secrets = [*env.github.issued_tokens, "PRIVATE KEY", WEBHOOK_SECRET, "eyJ"]
    assert [secret for secret in secrets if secret in seen] == []
