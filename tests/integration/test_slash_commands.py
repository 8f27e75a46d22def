"""`/signoff` through the whole stack: signed slash-command POSTs to the running service's
`/slack/events`, the ephemeral answer read from the HTTP response (it is the ack), the database
and the Slack stand-in checked for what changed (or did not)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote_plus

import pytest
from sqlalchemy import delete, func, select, update

from bot.slack.jobs import POST_CARD
from storage.models import AuditRecord, OutboxJob, Request
from tests.integration.conftest import SlackRunning, outbox_settled, slack_app
from tests.integration.test_slack_failures import is_dead, is_done, wait_for_job
from tests.integration.test_slack_flow import card_posted, click, routed
from tests.slack_support import signed, slash_command

OPERATOR = "UOPS"


@pytest.fixture
async def env(db_url: str) -> AsyncIterator[SlackRunning]:
    async with slack_app(db_url, SIGNOFF_OPERATORS=OPERATOR) as running:
        yield running


async def command(
    env: SlackRunning, text: str, *, user: str = "UA1", channel: str = "C0FINANCE"
) -> dict[str, Any]:
    """The ephemeral answer to `/signoff text`, as Slack receives it in the ack."""
    body = slash_command(quote_plus(text), user=user, channel=channel)
    response = await env.client.post("/slack/events", data=body, headers=signed(body))
    assert response.status == 200
    answer = await response.json()
    assert answer["response_type"] == "ephemeral"
    assert len(answer["blocks"]) <= 50
    return dict(answer)


def texts(answer: dict[str, Any]) -> str:
    """Every text Slack would show from the answer's blocks, one per line."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("text"), str):
                found.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(answer["blocks"])
    return "\n".join(found)


async def audit_rows(env: SlackRunning) -> list[tuple[str, str, dict[str, Any]]]:
    async with env.services.sessions() as session:
        rows = await session.scalars(select(AuditRecord).order_by(AuditRecord.seq))
        return [(r.kind, r.actor, r.data) for r in rows]


async def snapshot(env: SlackRunning) -> tuple[int, list[tuple[str, str, int]], int]:
    """What a command that must change nothing could have changed."""
    async with env.services.sessions() as session:
        audits = await session.scalar(select(func.count()).select_from(AuditRecord))
        jobs = (
            await session.execute(
                select(OutboxJob.id, OutboxJob.status, OutboxJob.attempts).order_by(OutboxJob.id)
            )
        ).all()
    # auth.test is Bolt checking its own token on the first request it serves: not a change.
    calls = [call.method for call in env.slack.calls if call.method != "auth.test"]
    return int(audits or 0), [tuple(job) for job in jobs], len(calls)


# --- status ------------------------------------------------------------------------------------


async def test_status_of_a_pending_request_with_one_vote(env: SlackRunning) -> None:
    request = await routed(env)
    await card_posted(env, request["request_id"])
    assert await click(env, "signoff_approve", request, "UA1", name="ana") == 200

    answer = await command(env, f"status {request['request_id']}", user="UNOPE")
    shown = texts(answer)
    assert "Refund $4,200 to ACME Corp" in shown
    assert "Waiting for approval" in shown
    assert "2 of @finance-leads (1/2)" in shown and "1 of <@U0CFO> (0/1)" in shown
    assert "*Still needed:* 1 more of @finance-leads · 1 more of <@U0CFO>" in shown
    assert "<@UA1> approved" in shown
    assert "*Policy trace*" in shown and "`big-refunds` matched" in shown
    assert "`small-refunds` no match" in shown, "the whole trace, not only the winner"
    assert f"{POST_CARD} `" in shown and "*done*" in shown
    assert "sync-back is queued when the request is decided" in shown
    assert "on time, due in 29m" in shown or "on time, due in 30m" in shown
    assert ":hourglass: expires" in shown


async def test_status_of_a_dead_lettered_sync_back_shows_its_last_error(
    env: SlackRunning,
) -> None:
    env.sink.fail_with = 400  # a 4xx other than 429 is terminal: dead at once
    request = await routed(env, kind="login", attributes={})
    assert await click(env, "signoff_approve", request, "UA1") == 200
    dead = await wait_for_job(env, request["request_id"], "webhook.callback", is_dead)

    shown = texts(await command(env, f"status {request['request_id']}"))
    assert ":white_check_mark: *Approved* by <@UA1>" in shown
    assert f"sync-back `{dead.id}`: *dead* after 1 attempt(s)" in shown
    assert "last error: " in shown and "400" in shown
    assert f"`/signoff replay {dead.id}`" in shown
    assert ":stopwatch:" not in shown, "the default route has no SLA"


# --- pending -----------------------------------------------------------------------------------


async def test_pending_lists_this_channel_oldest_first_with_sla_state(env: SlackRunning) -> None:
    first = await routed(env, title="First refund")
    second = await routed(env, title="Second refund")
    await routed(env, kind="login", attributes={}, title="A login elsewhere")  # C0APPROVALS
    async with env.services.sessions.begin() as session:
        await session.execute(
            update(Request)
            .where(Request.id == first["request_id"])
            .values(sla_due_at=datetime.now(UTC) - timedelta(minutes=10))
        )

    answer = await command(env, "pending", channel="C0FINANCE")
    shown = texts(answer)
    assert "(2)" in shown
    assert shown.index("First refund") < shown.index("Second refund"), "oldest first"
    assert "A login elsewhere" not in shown
    first_line = next(line for line in shown.split("\n") if first["request_id"] in line)
    assert "*SLA breached* 10m ago" in first_line or "*SLA breached* 9m ago" in first_line
    second_line = next(line for line in shown.split("\n") if second["request_id"] in line)
    assert "on time, due in" in second_line

    elsewhere = texts(await command(env, "pending", channel="C0APPROVALS"))
    assert "A login elsewhere" in elsewhere and "First refund" not in elsewhere
    empty = texts(await command(env, "pending", channel="C0NOTHING"))
    assert "Nothing is waiting here." in empty


async def test_pending_is_capped_with_a_count_of_the_rest(env: SlackRunning) -> None:
    for n in range(22):
        await routed(env, kind="login", attributes={}, title=f"Login {n:02}")
    answer = await command(env, "pending", channel="C0APPROVALS")
    shown = texts(answer)
    assert "(22)" in shown
    assert "Login 00" in shown and "Login 19" in shown and "Login 20" not in shown
    assert "… and 2 more" in shown
    assert len(answer["blocks"]) == 22  # heading, 20 requests, the "more" line


# --- mine --------------------------------------------------------------------------------------


async def test_mine_uses_group_membership_and_leaves_out_voted_and_own(
    env: SlackRunning,
) -> None:
    refund = await routed(env, title="Refund for everyone")
    voted = await routed(env, title="Refund UA2 voted on")
    login = await routed(env, kind="login", attributes={}, title="Login for approvers")
    own = await routed(env, title="Refund UA2 asked for", actor={"id": "UA2", "name": "Bo"})
    await card_posted(env, voted["request_id"])
    assert await click(env, "signoff_approve", voted, "UA2", name="bo") == 200

    calls_before = len(env.slack.calls_to("usergroups.users.list"))
    shown = texts(await command(env, "mine", user="UA2", channel="C0ELSEWHERE"))
    # UA2 is in finance-leads and approvers (user groups), in no route's user list.
    assert refund["request_id"] in shown and login["request_id"] in shown
    assert "<#C0FINANCE>" in shown and "<#C0APPROVALS>" in shown
    assert voted["request_id"] not in shown, "already voted"
    assert own["request_id"] not in shown, "the actor may not approve their own request"
    assert "(2)" in shown
    # Four requests, two distinct groups: at most one Slack call per group.
    assert len(env.slack.calls_to("usergroups.users.list")) - calls_before <= 2

    # The CFO is listed by user id on refunds and is in no group: the login is not theirs.
    cfo = texts(await command(env, "mine", user="U0CFO"))
    assert refund["request_id"] in cfo and voted["request_id"] in cfo
    assert login["request_id"] not in cfo

    nobody = texts(await command(env, "mine", user="UNOPE"))
    assert "Nothing is waiting for you." in nobody


# --- replay ------------------------------------------------------------------------------------


async def test_operator_replays_a_dead_sync_back_and_it_is_audited(env: SlackRunning) -> None:
    env.sink.fail_with = 400
    request = await routed(env, kind="login", attributes={})
    assert await click(env, "signoff_approve", request, "UA1") == 200
    dead = await wait_for_job(env, request["request_id"], "webhook.callback", is_dead)
    env.sink.fail_with = None

    shown = texts(await command(env, f"replay {request['request_id']}", user=OPERATOR))
    assert f"Re-queued `{dead.id}` (webhook.callback)" in shown
    await env.sink.wait_for(1)
    done = await wait_for_job(env, request["request_id"], "webhook.callback", is_done)
    assert done.id == dead.id
    assert env.sink.deliveries[0].body["status"] == "approved"
    [replayed] = [row for row in await audit_rows(env) if row[0] == "operator.replay"]
    assert replayed[1] == f"slack:{OPERATOR}"
    assert replayed[2]["job_id"] == dead.id

    # A job id works too; a job that is not dead is left alone and the answer says why.
    again = texts(await command(env, f"replay {dead.id}", user=OPERATOR))
    assert "only a dead (dead-lettered) job can be replayed" in again
    assert len(env.sink.deliveries) == 1


async def test_non_operator_replay_is_refused_audited_and_changes_nothing(
    env: SlackRunning,
) -> None:
    env.sink.fail_with = 400
    request = await routed(env, kind="login", attributes={})
    assert await click(env, "signoff_approve", request, "UA1") == 200
    await wait_for_job(env, request["request_id"], "webhook.callback", is_dead)
    env.sink.fail_with = None
    await outbox_settled(env)  # the click's card update, reply and DM land first: they are not ours
    audits, jobs, _ = await snapshot(env)

    shown = texts(await command(env, f"replay {request['request_id']}", user="UA1"))
    assert ":no_entry: Only operators may replay" in shown
    assert "SIGNOFF_OPERATORS" in shown and "Nothing was changed." in shown
    after_audits, after_jobs, _ = await snapshot(env)
    assert after_jobs == jobs
    assert after_audits == audits + 1
    refused = (await audit_rows(env))[-1]
    assert refused[:2] == ("operator.replay_refused", "slack:UA1")
    assert refused[2]["target"] == request["request_id"]
    assert env.sink.deliveries == []


async def test_replay_reposts_a_card_that_was_never_posted(env: SlackRunning) -> None:
    # A refused card (dead at once) and a card whose job never existed (say the request came
    # in before Slack was configured): a replay of the request brings both back.
    env.slack.fail_next("chat.postMessage", error="channel_not_found")
    refused = await routed(env, title="Card Slack refused")
    dead = await wait_for_job(env, refused["request_id"], POST_CARD, is_dead)
    lost = await routed(env, title="Card never queued")
    await card_posted(env, lost["request_id"])
    async with env.services.sessions.begin() as session:
        await session.execute(delete(OutboxJob).where(OutboxJob.request_id == lost["request_id"]))
        await session.execute(
            update(Request)
            .where(Request.id == lost["request_id"])
            .values(card_channel=None, card_ts=None)
        )

    shown = texts(await command(env, f"replay {refused['request_id']}", user=OPERATOR))
    assert f"Re-queued `{dead.id}` ({POST_CARD})" in shown
    await card_posted(env, refused["request_id"])

    shown = texts(await command(env, f"replay {lost['request_id']}", user=OPERATOR))
    assert "Queued the card, which was never posted" in shown
    await card_posted(env, lost["request_id"])
    reposted = [row for row in await audit_rows(env) if row[0] == "operator.repost_card"]
    assert [(kind, actor) for kind, actor, _ in reposted] == [
        ("operator.repost_card", f"slack:{OPERATOR}")
    ]

    # Posted now: nothing left to replay, and nothing is queued twice.
    before = await snapshot(env)
    shown = texts(await command(env, f"replay {lost['request_id']}", user=OPERATOR))
    assert "Nothing to replay" in shown
    assert (await snapshot(env))[:2] == before[:2]


# --- help, mistakes, escaping ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "user", "problem"),
    [
        ("", "UA1", None),
        ("help", "UA1", None),
        ("frobnicate r_1", "UA1", "unknown command `frobnicate`"),
        ("status r_doesnotexist", "UA1", "no request `r_doesnotexist`"),
        ("status", "UA1", "`status` needs one id"),
        ("replay r_doesnotexist", OPERATOR, "no request or job `r_doesnotexist`"),
        ("replay j_doesnotexist", OPERATOR, "no job `j_doesnotexist`"),
        ("pending now", "UA1", "`pending` takes no arguments"),
    ],
)
async def test_help_and_mistakes_answer_with_help_and_change_nothing(
    env: SlackRunning, text: str, user: str, problem: str | None
) -> None:
    request = await routed(env)
    await wait_for_job(env, request["request_id"], POST_CARD, is_done)  # settled
    before = await snapshot(env)
    shown = texts(await command(env, text, user=user))
    for sub in ("status ID", "pending", "mine", "replay ID", "help"):
        assert f"`/signoff {sub}`" in shown
    if problem is None:
        assert ":warning:" not in shown
    else:
        assert f":warning: {problem}. Nothing was changed." in shown
    assert await snapshot(env) == before


async def test_hostile_title_is_inert_in_every_answer(env: SlackRunning) -> None:
    request = await routed(env, title="<!channel> <https://evil.example|bank>")
    for text in (f"status {request['request_id']}", "pending"):
        answer = await command(env, text)
        sent = json.dumps(answer["blocks"]) + answer["text"]
        assert "<!channel>" not in sent
        assert "<https://evil.example" not in sent
        assert "&lt;!channel&gt;" in sent
    typed = await command(env, "status <!here>")
    assert "<!here>" not in json.dumps(typed)
    assert "&lt;!here&gt;" in texts(typed)


async def test_mine_says_so_when_slack_cannot_list_a_group(env: SlackRunning) -> None:
    refund = await routed(env, title="Refund")
    env.slack.fail_next("usergroups.list", error="missing_scope", times=10)
    shown = texts(await command(env, "mine", user="U0CFO"))
    # The CFO is listed by user id: still found. The groups could not be read: said so.
    assert refund["request_id"] in shown
    assert ":warning: Slack did not say who is in `finance-leads`" in shown


async def test_mine_leaves_out_own_requests_once_the_actor_is_known_without_asking_slack(
    env: SlackRunning,
) -> None:
    # Dana (UDANA, a finance lead) asked for this refund; the event names her by email only.
    refund = await routed(env, title="Dana's refund")
    lookups = len(env.slack.calls_to("users.lookupByEmail"))
    shown = texts(await command(env, "mine", user="UDANA"))
    assert refund["request_id"] in shown, "who the actor is is not known yet: listed"
    assert len(env.slack.calls_to("users.lookupByEmail")) == lookups, "no lookup to answer"

    # A click makes Signoff look her email up (separation of duties); from then on it knows.
    await card_posted(env, refund["request_id"])
    assert await click(env, "signoff_approve", refund, "UA1") == 200
    shown = texts(await command(env, "mine", user="UDANA"))
    assert refund["request_id"] not in shown
    assert "Nothing is waiting for you." in shown
