"""Slack scenarios through the whole stack: signed events in, signed Slack payloads posted to the
running service, the Slack stand-in recording what Slack would have received."""

from __future__ import annotations

import asyncio
import json

from sqlalchemy import func, select

from bot.slack.cards import button_value
from storage.models import AuditRecord, OutboxJob, Request, Vote
from tests.integration.conftest import SlackRunning
from tests.slack_support import block_action, signed, slash_command, view_submission
from tests.support import event_body, sign


async def routed(env: SlackRunning, **overrides) -> dict:
    body = event_body(callback_url=env.sink.url, **overrides)
    raw, headers = sign(body)
    response = await env.client.post("/v1/events", data=raw, headers=headers)
    answer = await response.json()
    assert answer["status"] == "pending", answer
    return {**answer, "version": body["version"]}


async def card_posted(env: SlackRunning, request_id: str) -> tuple[str, str]:
    for _ in range(100):
        async with env.services.sessions() as session:
            request = await session.get(Request, request_id)
        if request is not None and request.card_ts:
            return str(request.card_channel), request.card_ts
        await asyncio.sleep(0.05)
    raise AssertionError("the card was never posted")


async def click(env: SlackRunning, action: str, request: dict, user: str, **kw) -> int:
    body = block_action(
        action_id=action,
        value=button_value(request["request_id"], request.get("version", "1")),
        user=user,
        **kw,
    )
    response = await env.client.post("/slack/events", data=body, headers=signed(body))
    return response.status


async def status_of(env: SlackRunning, request_id: str) -> str:
    async with env.services.sessions() as session:
        request = await session.get(Request, request_id)
    assert request is not None
    return request.status


async def audit_kinds(env: SlackRunning) -> list[str]:
    async with env.services.sessions() as session:
        return list(await session.scalars(select(AuditRecord.kind).order_by(AuditRecord.seq)))


async def wait_until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never became true")


async def test_card_is_posted_through_the_outbox(slack_running: SlackRunning) -> None:
    request = await routed(slack_running)
    channel, ts = await card_posted(slack_running, request["request_id"])
    assert channel == "C0FINANCE"
    [message] = slack_running.slack.messages("C0FINANCE")
    assert message.ts == ts
    text = json.dumps(message.blocks)
    assert "Refund $4,200 to ACME Corp" in text
    assert "signoff_approve" in text and "signoff_reject" in text


async def test_quorum_per_group_then_sync_back_dm_and_final_card(
    slack_running: SlackRunning,
) -> None:
    env = slack_running
    request = await routed(env)
    await card_posted(env, request["request_id"])
    assert await click(env, "signoff_approve", request, "UA1", name="ana") == 200
    assert await click(env, "signoff_approve", request, "UA2", name="bo") == 200
    assert await status_of(env, request["request_id"]) == "pending", "U0CFO is still needed"
    assert await click(env, "signoff_approve", request, "U0CFO", name="cfo") == 200
    assert await status_of(env, request["request_id"]) == "approved"

    await env.sink.wait_for(1)
    delivery = env.sink.deliveries[0].body
    assert delivery["status"] == "approved"
    assert [d["id"] for d in delivery["decided_by"]] == ["UA1", "UA2", "U0CFO"]

    def replied() -> list[str]:
        """Who the thread replies name, a line per vote (votes in quick succession may share
        a reply)."""
        return [
            line.split()[1]
            for m in env.slack.messages("C0FINANCE")
            if m.thread_ts
            for line in m.text.splitlines()
            if line.startswith(":white_check_mark:")
        ]

    async def settled() -> bool:
        dm = env.slack.dm_channel("UDANA")
        return len(replied()) == 3 and dm is not None and bool(env.slack.messages(dm))

    def card() -> str:
        return json.dumps(
            next(m for m in env.slack.messages("C0FINANCE") if not m.thread_ts).blocks
        )

    async def card_final() -> bool:
        # The card's updates go one after another; the deciding vote's is the last of them.
        return "signoff_approve" not in card()

    await wait_until(settled)
    assert sorted(replied()) == ["<@U0CFO>", "<@UA1>", "<@UA2>"], "each vote replied to once"
    await wait_until(card_final)  # a decided card has no buttons
    assert "Approved" in card() or "approved" in card()


async def test_refused_clicks_change_nothing_and_are_audited(
    slack_running: SlackRunning,
) -> None:
    env = slack_running
    request = await routed(env)
    await card_posted(env, request["request_id"])
    # Not an approver; the actor (Dana, found by email) approving her own refund; a double vote.
    assert await click(env, "signoff_approve", request, "UNOPE") == 200
    assert await click(env, "signoff_approve", request, "UDANA") == 200
    assert await click(env, "signoff_approve", request, "UA1") == 200
    assert await click(env, "signoff_approve", request, "UA1") == 200

    async def told() -> bool:
        return len(env.slack.ephemerals) == 3

    await wait_until(told)
    notes = {e.user: e.text for e in env.slack.ephemerals}
    assert "not one of this request's approvers" in notes["UNOPE"]
    assert "may not approve" in notes["UDANA"]
    assert "already voted" in notes["UA1"]
    async with env.services.sessions() as session:
        votes = list(await session.scalars(select(Vote.user_id)))
    assert votes == ["UA1"]
    assert (await audit_kinds(env)).count("vote.refused") == 3
    assert await status_of(env, request["request_id"]) == "pending"


async def test_click_on_superseded_version_is_refused(slack_running: SlackRunning) -> None:
    env = slack_running
    old = await routed(env, subject="refund/re_77", version="1")
    new = await routed(env, subject="refund/re_77", version="2")
    assert await click(env, "signoff_approve", old, "UA1") == 200
    stale = {**new, "version": "1"}  # the new request's id with the old card's version
    assert await click(env, "signoff_approve", stale, "UA2") == 200

    async def told() -> bool:
        return len(env.slack.ephemerals) == 2

    await wait_until(told)
    assert all("older version" in e.text for e in env.slack.ephemerals)
    async with env.services.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Vote)) == 0


async def test_reject_needs_a_reason_and_vetoes(slack_running: SlackRunning) -> None:
    env = slack_running
    request = await routed(env)
    _channel, ts = await card_posted(env, request["request_id"])
    assert await click(env, "signoff_approve", request, "UA1") == 200
    assert await click(env, "signoff_reject", request, "UA2", ts=ts) == 200
    opened = await env.slack.wait_for_calls("views.open")
    view = opened[0].params["view"]
    view = json.loads(view) if isinstance(view, str) else view
    assert view["callback_id"] == "signoff_reject_reason"
    metadata = view["private_metadata"]

    empty = view_submission(
        callback_id="signoff_reject_reason", metadata=metadata, reason="  ", user="UA2"
    )
    response = await env.client.post("/slack/events", data=empty, headers=signed(empty))
    answer = await response.json()
    assert answer["response_action"] == "errors"
    assert await status_of(env, request["request_id"]) == "pending"

    body = view_submission(
        callback_id="signoff_reject_reason",
        metadata=metadata,
        reason="Customer was already refunded",
        user="UA2",
    )
    response = await env.client.post("/slack/events", data=body, headers=signed(body))
    assert response.status == 200
    assert await status_of(env, request["request_id"]) == "rejected"
    await env.sink.wait_for(1)
    assert env.sink.deliveries[0].body["status"] == "rejected"
    assert env.sink.deliveries[0].body["reason"] == "Customer was already refunded"


async def test_concurrent_last_votes_decide_once(slack_running: SlackRunning) -> None:
    env = slack_running
    # The default route needs one approval from `approvers` (UA1, UA2).
    request = await routed(env, kind="login", attributes={})
    await card_posted(env, request["request_id"])
    statuses = await asyncio.gather(
        *(click(env, "signoff_approve", request, user) for user in ("UA1", "UA2"))
    )
    assert statuses == [200, 200]
    assert await status_of(env, request["request_id"]) == "approved"
    async with env.services.sessions() as session:
        sync_jobs = await session.scalar(
            select(func.count())
            .select_from(OutboxJob)
            .where(
                OutboxJob.request_id == request["request_id"], OutboxJob.kind == "webhook.callback"
            )
        )
        decided = await session.scalar(
            select(func.count())
            .select_from(AuditRecord)
            .where(AuditRecord.kind == "request.decided")
        )
    assert (sync_jobs, decided) == (1, 1)
    await env.sink.wait_for(1)
    await asyncio.sleep(0.3)
    assert len(env.sink.deliveries) == 1


async def test_bad_slack_signature_is_refused(slack_running: SlackRunning) -> None:
    env = slack_running
    request = await routed(env)
    body = block_action(
        action_id="signoff_approve", value=button_value(request["request_id"], "1"), user="UA1"
    )
    headers = signed(body, secret="not-the-secret")
    response = await env.client.post("/slack/events", data=body, headers=headers)
    assert response.status == 401
    async with env.services.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Vote)) == 0


async def test_details_modal_and_help_command(slack_running: SlackRunning) -> None:
    env = slack_running
    request = await routed(env, attributes={"amount": 9000, "api_key": "sk_live_secret"})
    assert await click(env, "signoff_details", request, "UNOPE") == 200
    opened = await env.slack.wait_for_calls("views.open")
    shown = json.dumps(opened[0].params["view"])
    assert "sk_live_secret" not in shown
    assert "9000" in shown

    body = slash_command("help")
    response = await env.client.post("/slack/events", data=body, headers=signed(body))
    assert response.status == 200
    assert "/signoff" in (await response.text())


async def test_hostile_title_renders_inert(slack_running: SlackRunning) -> None:
    env = slack_running
    request = await routed(env, title="<!channel> <https://evil.example|bank>")
    await card_posted(env, request["request_id"])
    [message] = env.slack.messages("C0FINANCE")
    # A plain_text header shows text as written and never parses mentions or links; every
    # mrkdwn text and the notification text must carry the title escaped.
    header, *rest = message.blocks
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    posted = json.dumps(rest) + (message.text or "")
    assert "<!channel>" not in posted
    assert "<https://evil.example" not in posted
    assert "&lt;!channel&gt;" in posted
