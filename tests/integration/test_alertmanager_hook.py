"""`POST /hooks/alertmanager` on the running service, with the real 0.25 deliveries: the token,
refusals (audited, nothing stored), repeats, a resolved alert in a firing group, and the
Silence… button's refusals, against the Slack stand-in and an Alertmanager API stand-in."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot.slack.cards import SILENCE_ACTION
from storage.models import AuditRecord, EventRecord, Request, Vote
from tests.alertmanager_support import AlertmanagerStandIn
from tests.integration.conftest import SlackRunning, slack_app
from tests.integration.test_slack_flow import card_posted, click, wait_until
from tests.slack_support import signed, view_submission

FIXTURES = Path(__file__).resolve().parents[2] / "connectors" / "alertmanager" / "fixtures"
TOKEN = "test-am-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"}


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[SlackRunning]:
    standin = AlertmanagerStandIn()
    await standin.start()
    try:
        async with slack_app(
            db_url, ALERTMANAGER_URL=standin.url, ALERTMANAGER_WEBHOOK_TOKEN=TOKEN
        ) as running:
            yield running
    finally:
        await standin.stop()


async def deliver(env: SlackRunning, name: str, headers: dict[str, str] = AUTH, body=None):
    raw = body if body is not None else (FIXTURES / f"{name}.json").read_bytes()
    response = await env.client.post("/hooks/alertmanager", data=raw, headers=headers)
    return response.status, await response.json()


async def count(env: SlackRunning, model) -> int:
    async with env.services.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def test_refusals_are_audited_and_store_nothing(env: SlackRunning) -> None:
    status, answer = await deliver(env, "firing", headers={"content-type": "application/json"})
    assert (status, answer) == (401, {"error": "missing Authorization: Bearer token"})
    status, answer = await deliver(env, "firing", headers={"Authorization": "Bearer nope"})
    assert status == 401 and TOKEN not in json.dumps(answer)
    future = json.loads((FIXTURES / "firing.json").read_text()) | {"version": "5"}
    status, answer = await deliver(env, "", body=json.dumps(future).encode())
    assert status == 400 and answer["error"].startswith("version: ")
    assert await count(env, EventRecord) == 0
    async with env.services.sessions() as session:
        refused = list(
            await session.scalars(select(AuditRecord).where(AuditRecord.kind == "event.refused"))
        )
    assert len(refused) == 3
    assert all(TOKEN not in record.data_json for record in refused)


async def test_firing_then_repeat_then_resolved(env: SlackRunning) -> None:
    status, first = await deliver(env, "firing")
    assert status == 202 and [r["status"] for r in first["requests"]] == ["pending", "pending"]
    # Alertmanager repeats the notification every repeat_interval: nothing new is created.
    status, again = await deliver(env, "firing")
    assert status == 202 and again["requests"] == first["requests"]
    assert await count(env, Request) == 2

    # The group is still `firing`, but its first alert resolved: that request is cancelled.
    # (The two captures are hours apart, so sda2 fires there with a new startsAt: a new
    # occurrence, which supersedes the first one's request.)
    status, resolved = await deliver(env, "resolved")
    assert status == 202
    sda1, sda2 = (r["request_id"] for r in first["requests"])
    assert resolved["cancelled"] == [sda1]
    [refired] = resolved["requests"]
    async with env.services.sessions() as session:
        rows = (await session.execute(select(Request.id, Request.status, Request.reason))).all()
    by_id = {row.id: (row.status, row.reason) for row in rows}
    assert by_id[sda1] == ("cancelled", "alert resolved at 2026-11-22 04:15:48 UTC")
    assert by_id[sda2][0] == "cancelled" and by_id[refired["request_id"]][0] == "pending"


async def test_silence_button_refusals(env: SlackRunning) -> None:
    _, answer = await deliver(env, "firing")
    request_id = answer["requests"][0]["request_id"]
    async with env.services.sessions() as session:
        request = await session.get(Request, request_id)
    assert request is not None
    channel, ts = await card_posted(env, request_id)
    target = {"request_id": request_id, "version": request.version}

    # Not an approver: told so, no modal opened.
    assert await click(env, SILENCE_ACTION, target, "UNOPE", channel=channel, ts=ts) == 200

    async def told() -> bool:
        return len(env.slack.ephemerals) == 1

    await wait_until(told)
    assert "not one of this request's approvers" in env.slack.ephemerals[0].text
    assert not env.slack.views

    # An approver opens it but submits without a duration or a reason: the modal says what.
    assert await click(env, SILENCE_ACTION, target, "UA1", channel=channel, ts=ts) == 200
    [opened] = await env.slack.wait_for_calls("views.open")
    view = opened.params["view"]
    view = json.loads(view) if isinstance(view, str) else view
    for values, reason, field in [({}, "because", "duration"), (_pick("1h"), " ", "reason")]:
        body = view_submission(
            callback_id=view["callback_id"],
            metadata=view["private_metadata"],
            reason=reason,
            user="UA1",
            values=values,
        )
        response = await env.client.post("/slack/events", data=body, headers=signed(body))
        answer = await response.json()
        assert answer["response_action"] == "errors" and field in answer["errors"]
    assert await count(env, Vote) == 0


def _pick(value: str) -> dict:
    option = {"text": {"type": "plain_text", "text": value}, "value": value}
    return {"duration": {"duration": {"type": "static_select", "selected_option": option}}}
