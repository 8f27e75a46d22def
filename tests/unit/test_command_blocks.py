"""`/signoff` answers as Block Kit: a golden `status`, lists, help, escaping and Slack's limits.

Views are built as in `test_cards` (real fixture events, real policy decisions, in-memory rows).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from bot.slack.command_blocks import (
    LIST_MAX,
    help_answer,
    list_answer,
    note_answer,
    sla_state,
    status_answer,
)
from storage.models import OutboxJob
from storage.queries import PendingItem
from storage.requests import RequestView
from tests.unit.test_cards import (
    ALICE,
    ATTACK,
    NOW,
    T0,
    all_text,
    assert_golden,
    decided,
    fixture,
    make_view,
)


def job(
    kind: str, status: str, *, attempts: int = 1, last_error: str = "", n: int = 1
) -> OutboxJob:
    return OutboxJob(
        id=f"j_test{n:04}",
        kind=kind,
        request_id="r_test0001",
        idempotency_key=f"{kind}-{n}",
        payload={"request_id": "r_test0001"},
        status=status,
        attempts=attempts,
        next_attempt_at=T0,
        locked_until=None,
        last_error=last_error,
        created_at=T0 + timedelta(seconds=n),
        updated_at=T0 + timedelta(seconds=n),
        done_at=None,
        result=None,
    )


def with_jobs(view: RequestView, *jobs: OutboxJob) -> RequestView:
    return RequestView(view.request, view.event, view.votes, list(jobs))


def item(n: int, *, title: str = "", sla: timedelta | None = None) -> PendingItem:
    created = T0 + timedelta(minutes=n)
    return PendingItem(
        id=f"r_item{n:04}",
        title=title or f"Request {n:02}",
        channel="C0FINANCE",
        created_at=created,
        sla_due_at=created + sla if sla is not None else None,
        expires_at=None,
    )


def test_status_of_a_pending_refund_with_one_vote_golden() -> None:
    view = make_view(
        fixture("refund"),
        votes=[ALICE],
        sync_kind="webhook.callback",
        sla_due_at=T0 + timedelta(minutes=30),
    )
    view = with_jobs(view, job("slack.post_card", "done"))
    payload = status_answer(view, now=NOW).as_ack()
    assert_golden("command_status_pending", payload)

    text = all_text(payload)
    assert payload["response_type"] == "ephemeral"
    assert "*Needs* 2 of @finance-leads (1/2) · 1 of <@U0CFO> (0/1)" in text
    assert "*Still needed:* 1 more of @finance-leads · 1 more of <@U0CFO>" in text
    assert "<@U0ALICE1> approved" in text
    assert "*Policy trace* (rule `big-refunds` decided route)" in text
    assert "• `small-refunds` no match" in text, "the whole trace, in order"
    assert "slack.post_card `j_test0001`: *done* after 1 attempt(s)" in text
    assert "_The sync-back is queued when the request is decided._" in text
    assert ":stopwatch: on time, due in 18m" in text


def test_status_of_a_dead_sync_back_shows_the_error_escaped_and_how_to_replay() -> None:
    view = make_view(
        fixture("refund"),
        sync_kind="webhook.callback",
        **decided("approved", decided_by=[{"id": "U0CFO", "name": "cfo"}]),
    )
    error = f"callback answered 400: {ATTACK}"
    view = with_jobs(view, job("webhook.callback", "dead", attempts=3, last_error=error))
    payload = status_answer(view, now=NOW).as_ack()
    text = all_text(payload)
    assert "sync-back `j_test0001`: *dead* after 3 attempt(s)" in text
    assert "last error: callback answered 400: &lt;!channel&gt;" in text
    assert "<!channel>" not in str(payload)
    assert "operators: `/signoff replay j_test0001`" in text
    assert "Still needed" not in text, "decided: nothing is needed any more"
    assert "SLA" not in text, "no stored SLA deadline, nothing to say about it"


def test_status_answer_stays_within_slack_limits_whatever_is_stored() -> None:
    view = make_view(
        fixture("refund"),
        raw={"title": "T" * 5000},
        votes=[{**ALICE, "user_id": f"U0V{n:04}", "reason": "x" * 300} for n in range(60)],
    )
    long_error = "&<>" * 2000
    view = with_jobs(
        view,
        *(job("webhook.callback", "dead", last_error=long_error, n=n) for n in range(80)),
    )
    decision = dict(view.event.decision)
    decision["trace"] = [
        {"rule": f"r{n}", "outcome": "no_match", "detail": "y" * 300} for n in range(200)
    ]
    view.event.decision = decision
    payload = status_answer(view, now=NOW).as_ack()  # slack_sdk validates every block
    assert len(payload["blocks"]) <= 50
    for block in payload["blocks"]:
        if block["type"] == "section":
            assert len(block["text"]["text"]) <= 3000
    text = all_text(payload)
    assert "more jobs" in text and "more votes" in text and "… " in text


def test_list_is_capped_oldest_first_with_sla_states() -> None:
    items = [item(n, sla=timedelta(minutes=5 if n == 0 else 60)) for n in range(LIST_MAX + 5)]
    payload = list_answer("*Pending*", items, total=len(items) + 10, now=NOW, empty="none").as_ack()
    text = all_text(payload)
    assert len(payload["blocks"]) == 1 + LIST_MAX + 1
    assert text.index("Request 00") < text.index("Request 01") < text.index("Request 19")
    assert "Request 20" not in text
    assert "… and 15 more" in text
    first = payload["blocks"][1]["text"]["text"]
    assert "12m old" in first and "*SLA breached* 7m ago" in first
    assert "on time, due in" in payload["blocks"][2]["text"]["text"]
    assert "<#C0FINANCE>" not in text, "a channel list does not repeat its channel"


def test_list_escapes_titles_and_shows_channels_when_asked() -> None:
    answer = list_answer(
        "*Mine*",
        [item(1, title=ATTACK + " " + "z" * 400)],
        total=1,
        now=NOW,
        empty="none",
        show_channel=True,
    ).as_ack()
    text = all_text(answer)
    assert "<!channel>" not in str(answer) and "&lt;!channel&gt;" in text
    assert "<https://evil" not in str(answer)
    assert "<#C0FINANCE>" in text
    assert "z" * 200 not in text, "a list line's title is cut"


def test_empty_list_says_so() -> None:
    answer = list_answer("*Pending*", [], total=0, now=NOW, empty="Nothing here.").as_ack()
    assert all_text(answer) == "*Pending*\nNothing here."


def test_sla_state() -> None:
    assert sla_state(None, NOW) == "no SLA"
    assert sla_state(NOW + timedelta(minutes=90), NOW) == ":stopwatch: on time, due in 1h30m"
    assert sla_state(NOW - timedelta(hours=2), NOW) == ":rotating_light: *SLA breached* 2h ago"


def test_help_lists_every_subcommand_and_what_went_wrong() -> None:
    plain = all_text(help_answer().as_ack())
    for sub in ("status ID", "pending", "mine", "replay ID", "help"):
        assert f"`/signoff {sub}`" in plain
    assert ":warning:" not in plain
    wrong: dict[str, Any] = help_answer("unknown command `frob`").as_ack()
    assert wrong["blocks"][0]["text"]["text"] == (
        ":warning: unknown command `frob`. Nothing was changed."
    )
    assert wrong["text"] == "unknown command `frob`"


def test_note_is_one_section() -> None:
    answer = note_answer("x" * 4000).as_ack()
    assert len(answer["blocks"]) == 1
    assert len(answer["blocks"][0]["text"]["text"]) == 3000
