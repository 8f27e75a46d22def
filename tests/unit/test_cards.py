"""Slack cards: golden Block Kit out for real fixture events, escaping, limits, modals.

Requests are built from real connector fixtures and real policy decisions, as in-memory ORM rows
(no database). A golden file that is missing or different makes the test fail and writes
`<name>.json.new` (or `.txt.new`) next to it for review; rename it to accept.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from slack_sdk.models.blocks import ActionsBlock, HeaderBlock

from bot.slack.cards import (
    APPROVE_ACTION,
    DETAILS_ACTION,
    REJECT_ACTION,
    Card,
    build_card,
    outcome_dm,
    parse_button_value,
    vote_reply_text,
)
from bot.slack.modals import REJECT_CALLBACK, build_details_modal, build_reject_modal
from bot.slack.mrkdwn import cut_mrkdwn, escape_mrkdwn, link, to_plain
from bot.slack.terminal import render_text
from connectors.events import Event
from connectors.redaction import MASK
from policies.gateway import Policy
from policies.loader import load_policy, parse_policy
from storage.models import EventRecord, Request
from storage.requests import RequestView, VoteView
from tests.golden import assert_golden

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "connectors" / "webhook" / "fixtures"
DESIGN_POLICY = Path(__file__).parent / "policies" / "design_example.yaml"

T0 = datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=12)
ATTACK = "<!channel> <https://evil.example|bank>"

# A policy where the refund fixture fails closed: `vip-check` errors (no such attribute) before
# `trusted-merchants` would auto-approve it, so the default routes it; a shadow rule also matches.
FAIL_CLOSED_POLICY = """
rules:
  - name: watch-big-refunds
    when: event.kind == "refund" && event.attributes.amount > 1000
    decide: auto_reject
    shadow: true
  - name: vip-check
    when: event.attributes.vip == true
    decide: auto_reject
  - name: trusted-merchants
    when: event.attributes.merchant == "acme"
    decide: auto_approve
default:
  decide: route
  route:
    channel: C0APPROVALS
    approvers: [{group: S0APPROVERS, min: 1}]
    sla: 1h
    expires_after: 1d
"""

# Quotes the event's title in its trace detail, which must be escaped like the title itself.
TITLE_POLICY = """
rules:
  - name: bank-titles
    when: event.title.contains("bank")
    decide: route
    route: {channel: C0SEC, approvers: [{users: [U0SEC1, U0SEC2], min: 1}]}
default:
  decide: route
  route: {channel: C0APPROVALS, approvers: [{group: approvers, min: 1}]}
"""


# --- building views --------------------------------------------------------------------------


def fixture(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    body["delivery_id"] = f"d-{name}"
    body["received_at"] = T0.isoformat()
    return body


def make_view(
    body: dict[str, Any],
    *,
    policy: Policy | None = None,
    status: str = "pending",
    votes: list[dict[str, Any]] | None = None,
    raw: dict[str, Any] | None = None,
    **request_fields: Any,
) -> RequestView:
    """A request as storage would hold it. `raw` overrides body fields after validation, for
    stored shapes the current Event model would refuse (200 context fields, a huge summary)."""
    event = Event.model_validate(body)
    decision = (policy or load_policy(DESIGN_POLICY)).decide(event).model_dump(mode="json")
    stored = event.model_dump(mode="json")
    stored.update(raw or {})
    record = EventRecord(
        id="e_test0001",
        delivery_id=f"webhook:{event.delivery_id}",
        source=event.source,
        kind=event.kind,
        subject=event.subject,
        version=event.version,
        body=stored,
        decision=decision,
        decision_kind=decision["kind"],
        rule=decision["rule"],
        request_id="r_test0001",
        received_at=T0,
    )
    fields: dict[str, Any] = {
        "id": "r_test0001",
        "event_id": record.id,
        "source": event.source,
        "kind": event.kind,
        "subject": event.subject,
        "version": event.version,
        "title": stored["title"],
        "actor_id": event.actor.id if event.actor else None,
        "status": status,
        "decision_kind": decision["kind"],
        "rule": decision["rule"],
        "route": decision["route"],
        "created_at": T0,
        "expires_at": T0 + timedelta(days=1),
        "decided_at": None,
        "decided_by": [],
        "reason": "",
        "superseded_by": None,
        "sync_kind": None,
    }
    fields.update(request_fields)
    rows = [
        VoteView(
            id=index + 1,
            user_id=vote["user_id"],
            user_name=vote.get("user_name", ""),
            choice=vote.get("choice", "approve"),
            reason=vote.get("reason", ""),
            groups=vote.get("groups", []),
            params=vote.get("params"),
            created_at=vote.get("at", T0 + timedelta(minutes=5 + index)),
        )
        for index, vote in enumerate(votes or [])
    ]
    return RequestView(Request(**fields), record, rows, [])


ALICE = {
    "user_id": "U0ALICE1",
    "user_name": "alice",
    "reason": "Matches the ticket",
    "groups": ["finance-leads"],
}
BOB = {"user_id": "U0BOB22", "user_name": "bob", "groups": ["finance-leads"]}
CFO = {"user_id": "U0CFO", "user_name": "cfo", "groups": ["U0CFO"]}


def decided(status: str, **fields: Any) -> dict[str, Any]:
    return {"status": status, "decided_at": T0 + timedelta(minutes=20), **fields}


# --- helpers ---------------------------------------------------------------------------------


def mrkdwn_texts(payload: Any) -> Iterator[str]:
    """Every string Slack would parse as mrkdwn: mrkdwn text objects, and the top-level `text`."""
    if isinstance(payload, dict):
        if payload.get("type") == "mrkdwn":
            yield payload["text"]
        if isinstance(payload.get("text"), str) and "type" not in payload:
            yield payload["text"]
        for value in payload.values():
            if isinstance(value, dict | list):
                yield from mrkdwn_texts(value)
    elif isinstance(payload, list):
        for item in payload:
            yield from mrkdwn_texts(item)


def text_objects(payload: Any) -> Iterator[dict[str, Any]]:
    if isinstance(payload, dict):
        if payload.get("type") in ("mrkdwn", "plain_text"):
            yield payload
        for value in payload.values():
            yield from text_objects(value)
    elif isinstance(payload, list):
        for item in payload:
            yield from text_objects(item)


def all_text(payload: Any) -> str:
    return "\n".join(obj["text"] for obj in text_objects(payload))


def card_payload(view: RequestView) -> dict[str, Any]:
    return build_card(view, now=NOW).as_payload()


def actions(payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [block for block in payload["blocks"] if block["type"] == "actions"]


# --- golden cards ----------------------------------------------------------------------------


def test_pending_routed_refund_with_one_vote() -> None:
    view = make_view(fixture("refund"), votes=[ALICE])
    card = build_card(view, now=NOW)
    payload = card.as_payload()
    assert_golden("card_pending_refund", payload)
    assert_golden("card_pending_refund", render_text(card))

    text = all_text(payload)
    assert "*Needs* 2 of @finance-leads (1/2) · 1 of <@U0CFO> (0/1)" in text
    assert "Matches the ticket" in text and "<@U0ALICE1> approved" in text
    assert "Dana Whitfield (dana@example.com)" in text
    assert "<https://dashboard.example.com/refunds/re_3Q1x8Z|Open in Stripe>" in text
    assert "due <!date^" in text and "(in 18m)" in text and "breached" not in text
    assert payload["text"] == "Approval needed: Refund $4,200 to ACME Corp"

    [block] = actions(payload)
    buttons = {button["action_id"]: button for button in block["elements"]}
    assert list(buttons) == [APPROVE_ACTION, REJECT_ACTION, DETAILS_ACTION]
    assert buttons[APPROVE_ACTION]["style"] == "primary"
    assert buttons[REJECT_ACTION]["style"] == "danger"
    assert "style" not in buttons[DETAILS_ACTION]
    for button in buttons.values():
        assert parse_button_value(button["value"]) == ("r_test0001", "1")


def test_progress_counts_a_vote_toward_every_entry_it_was_recorded_against() -> None:
    both = {**BOB, "groups": ["finance-leads", "U0CFO"]}
    rejecter = {"user_id": "U0EVE33", "choice": "reject", "groups": ["finance-leads"]}
    view = make_view(fixture("refund"), votes=[ALICE, both, rejecter])
    text = all_text(card_payload(view))
    assert "2 of @finance-leads (2/2) :white_check_mark: · 1 of <@U0CFO> (1/1)" in text


def test_sla_breached_is_said() -> None:
    view = make_view(fixture("refund"))
    payload = build_card(view, now=T0 + timedelta(minutes=45)).as_payload()
    assert "*SLA 30m breached:* was due" in all_text(payload)
    assert "(15m ago)" in all_text(payload)


def test_approved_card_has_no_buttons_and_says_who() -> None:
    view = make_view(
        fixture("refund"),
        votes=[ALICE, BOB, CFO],
        **decided(
            "approved",
            decided_by=[
                {"id": "U0ALICE1", "name": "alice"},
                {"id": "U0BOB22", "name": "bob"},
                {"id": "U0CFO", "name": "cfo"},
            ],
        ),
    )
    payload = card_payload(view)
    assert_golden("card_approved", payload)
    assert actions(payload) == []
    assert ":white_check_mark: *Approved* by <@U0ALICE1>, <@U0BOB22>, <@U0CFO> <!date^" in (
        all_text(payload)
    )
    assert "*Needed* 2 of @finance-leads (2/2)" in all_text(payload)
    assert ":stopwatch: SLA 30m met" in all_text(payload)  # decided after 20 minutes
    assert payload["text"].startswith("Approved: ")


def test_rejected_card_shows_the_reason() -> None:
    reject = {"user_id": "U0CFO", "choice": "reject", "reason": "Already refunded", "groups": []}
    view = make_view(
        fixture("refund"),
        votes=[reject],
        **decided(
            "rejected", decided_by=[{"id": "U0CFO", "name": "cfo"}], reason="Already refunded"
        ),
    )
    payload = card_payload(view)
    assert_golden("card_rejected", payload)
    text = all_text(payload)
    assert actions(payload) == []
    assert ":x: *Rejected* by <@U0CFO>" in text
    assert "*Reason:* Already refunded" in text


def test_expired_reads_distinct_from_rejected() -> None:
    view = make_view(
        fixture("deploy"),
        **decided(
            "expired",
            decided_by=[{"id": "system:expiry", "name": "expiry"}],
            reason="no decision within 1d",
        ),
    )
    payload = card_payload(view)
    assert_golden("card_expired", payload)
    text = all_text(payload)
    assert actions(payload) == []
    assert "*Expired*" in text and "nobody rejected it" in text
    assert "Rejected" not in text
    assert payload["text"].startswith("Expired: ")


def test_cancelled_by_supersede_names_the_newer_request() -> None:
    view = make_view(
        fixture("refund"), votes=[ALICE], **decided("cancelled", superseded_by="r_newer02")
    )
    payload = card_payload(view)
    assert_golden("card_cancelled_superseded", payload)
    assert actions(payload) == []
    assert "*Cancelled*" in all_text(payload)
    assert "superseded by `r_newer02`" in all_text(payload)
    assert "SLA" not in all_text(payload)  # nobody decided: there is no SLA to have met


def test_withdrawn_without_supersede_says_so() -> None:
    view = make_view(fixture("refund"), **decided("cancelled", reason="resolved at the source"))
    text = all_text(card_payload(view))
    assert "withdrawn by the source" in text and "superseded" not in text


# --- escaping --------------------------------------------------------------------------------


def attack_view() -> RequestView:
    body = fixture("refund")
    body.update(
        title=ATTACK,
        summary=f"{ATTACK} & more <@U0CFO>",
        actor={"id": "u-1", "name": ATTACK, "email": "<!here>@evil.example"},
        context=[{"label": ATTACK, "value": ATTACK}],
        anomaly={"score": 9, "detail": ATTACK},
    )
    # Stored as is (the Event model would normalise these URLs): the card must not rely on it.
    links = [
        {"title": ATTACK, "url": "https://docs.example/a|b>c<d"},
        {"title": "ok", "url": "https://ok.example/?x=1&y=2"},
    ]
    vote = {**ALICE, "user_id": "not-a-slack-id", "user_name": ATTACK, "reason": ATTACK}
    return make_view(body, policy=parse_policy(TITLE_POLICY), votes=[vote], raw={"links": links})


def test_escaping_attack_renders_inert() -> None:
    view = attack_view()
    card = build_card(view, now=NOW)
    payload = card.as_payload()
    assert_golden("card_escaping_attack", payload)
    texts = list(mrkdwn_texts(payload))
    assert len(texts) > 8  # title, summary, actor, context, links, anomaly, trace, votes, text
    for text in texts:
        assert "<!channel>" not in text and "<!here>" not in text
        assert "<https://evil" not in text
    joined = "\n".join(texts)
    assert "&lt;!channel&gt; &lt;https://evil.example|bank&gt;" in joined
    # The trace quotes the title; the vote's name and reason are untrusted too.
    assert 'event.title="&lt;!channel&gt;' in joined
    assert "&lt;@U0CFO&gt;" in joined  # a mention typed into the summary is not a mention
    # The link's URL cannot end the construct early nor carry a label of its own.
    assert "<https://docs.example/a%7Cb%3Ec%3Cd|&lt;!channel&gt;" in joined
    assert "<https://ok.example/?x=1&amp;y=2|ok>" in joined
    # The header is plain_text, which Slack never parses for mentions or links.
    header = payload["blocks"][0]
    assert header["type"] == "header" and header["text"]["type"] == "plain_text"
    # verbatim everywhere event text goes: no auto-linking of what escaping leaves behind.
    assert all(
        obj.get("verbatim") is True for obj in text_objects(payload) if obj["type"] == "mrkdwn"
    )
    # The policy's own user ids are still real mentions.
    assert "1 of <@U0SEC1>, <@U0SEC2> (0/1)" in joined
    # On a terminal it reads as written.
    assert f"Requested by: {ATTACK} (<!here>@evil.example)" in render_text(card)


def test_vote_reply_and_outcome_dm_escape_untrusted_text() -> None:
    view = attack_view()
    reply = vote_reply_text([view.votes[0]], view)
    assert "<!channel>" not in reply and "<https://evil" not in reply
    assert reply.startswith(":white_check_mark: &lt;!channel&gt;")
    assert "Needs 1 of <@U0SEC1>, <@U0SEC2> (0/1)" in reply

    final = make_view(
        {**fixture("refund"), "title": ATTACK},
        **decided("rejected", decided_by=[{"id": "x", "name": ATTACK}], reason=ATTACK),
    )
    text, blocks = outcome_dm(final)
    for piece in [text, *mrkdwn_texts(blocks)]:
        assert "<!channel>" not in piece and "<https://evil" not in piece
    assert text == "Rejected: &lt;!channel&gt; &lt;https://evil.example|bank&gt;"
    assert "*Rejected* by &lt;!channel&gt;" in blocks[0]["text"]["text"]


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("a & b", "a &amp; b"),
        ("<!everyone>", "&lt;!everyone&gt;"),
        ("&lt;", "&amp;lt;"),
        ("x > y < z", "x &gt; y &lt; z"),
    ],
)
def test_escape_mrkdwn(raw: str, escaped: str) -> None:
    assert escape_mrkdwn(raw) == escaped
    assert to_plain(escaped) == raw


def test_cut_never_leaves_half_an_entity() -> None:
    text = escape_mrkdwn("a" * 7 + "&&&")  # aaaaaaa&amp;&amp;&amp;
    for limit in range(8, len(text) + 1):
        cut = cut_mrkdwn(text, limit)
        assert len(cut) <= limit
        body = cut.removesuffix("…")
        assert body.count("&") == body.count("&amp;"), cut


@pytest.mark.parametrize(
    "url", ["javascript:alert(1)", "slack://open", "mailto:a@b.c", "https://x/" + "a" * 3000]
)
def test_links_only_for_plain_http_urls(url: str) -> None:
    assert link(url, "click <here>") == "click &lt;here&gt;"


# --- limits ----------------------------------------------------------------------------------


def check_card_limits(payload: dict[str, Any]) -> None:
    blocks = payload["blocks"]
    assert len(blocks) <= 50
    for block in blocks:
        if block["type"] == "header":
            assert len(block["text"]["text"]) <= 150
        if block["type"] == "section":
            assert "text" not in block or len(block["text"]["text"]) <= 3000
            assert len(block.get("fields", [])) <= 10
            assert all(len(field["text"]) <= 2000 for field in block.get("fields", []))
        if block["type"] == "context":
            assert len(block["elements"]) <= 10
            assert all(len(element["text"]) <= 3000 for element in block["elements"])
        if block["type"] == "actions":
            for button in block["elements"]:
                assert len(button["text"]["text"]) <= 75
                assert len(button["value"]) <= 2000
                assert len(button["action_id"]) <= 255
    assert all(obj["text"] for obj in text_objects(payload)), "Slack refuses empty text"


def test_huge_event_stays_within_slack_limits() -> None:
    body = fixture("refund")
    raw = {
        "title": "T" * 1000,
        "summary": "lorem & ipsum " * 715,  # 10,010 characters, & escapes to 5
        "context": [{"label": f"Field {n}", "value": "v&" * 1000} for n in range(200)],
        "links": [{"title": f"L{n} " * 50, "url": f"https://x.example/{n}"} for n in range(20)],
        "attributes": {f"key{n}": "x" * 1000 for n in range(300)},
    }
    votes = [{**ALICE, "user_id": f"U0V{n:04d}", "reason": "r" * 5000} for n in range(40)]
    view = make_view(body, raw=raw, votes=votes)
    card = build_card(view, now=NOW)
    assert len(card.blocks) <= 50
    payload = card.as_payload()  # runs slack_sdk's validation of every block
    check_card_limits(payload)
    text = all_text(payload)
    assert payload["blocks"][0]["text"]["text"] == "T" * 149 + "…"
    assert "171 more fields: see *Details*" in text
    summary = payload["blocks"][2]["text"]["text"]
    assert len(summary) == 3000 and summary.endswith("…")
    assert "more votes" in text and "more in *Details*" in text

    modal = build_details_modal(view)  # validated by slack_sdk too
    assert len(modal["blocks"]) <= 100
    for obj in text_objects(modal["blocks"]):
        assert 0 < len(obj["text"]) <= 3000
    modal_text = all_text(modal)
    # Every part is there, and the ones cut short say where the rest is.
    assert "*Decision trace*" in modal_text and "*Context*" in modal_text
    assert "*Links*" in modal_text and "*Votes*" in modal_text
    assert "Cut here: `signoff requests show r_test0001` has the rest." in modal_text
    assert all(f"*Field {n}*" in modal_text for n in range(200))  # every context field


def test_details_modal_says_where_the_rest_of_the_context_is() -> None:
    raw = {"context": [{"label": f"F{n}", "value": str(n)} for n in range(263)]}
    modal = build_details_modal(make_view(fixture("refund"), raw=raw))
    assert "*F249*" in all_text(modal) and "*F250*" not in all_text(modal)
    assert "13 more fields: `signoff requests show r_test0001` has them all." in all_text(modal)


def test_a_limit_we_break_fails_in_as_payload_not_in_slack() -> None:
    from slack_sdk.errors import SlackObjectFormationError
    from slack_sdk.models.blocks import PlainTextObject

    card = Card(blocks=[HeaderBlock(text=PlainTextObject(text="x" * 151))], text="x")
    with pytest.raises(SlackObjectFormationError):
        card.as_payload()


# --- anomaly, failed closed ------------------------------------------------------------------


def test_anomaly_is_shown_with_its_baseline() -> None:
    body = fixture("deploy")
    body["anomaly"] = {"score": 4.237, "baseline": 1.1, "detail": "42 files, usually 5"}
    payload = card_payload(make_view(body))
    assert_golden("card_anomaly", payload)
    assert ":warning: *Anomaly score 4.24* (baseline 1.1): 42 files, usually 5" in all_text(payload)
    assert ":red_circle: *Critical risk*" in all_text(payload)


@pytest.mark.parametrize(
    ("anomaly", "shown"),
    [
        ({"score": 0.4, "baseline": 80, "samples": 40}, "*Anomaly score 0.4* (usual; baseline 80)"),
        ({"score": -3.5, "baseline": 80}, ":warning: *Anomaly score -3.5* (baseline 80)"),
        ({"samples": 4}, ":grey_question: *No anomaly baseline yet* (4 values seen so far)"),
    ],
)
def test_anomaly_says_usual_unusual_or_not_yet_known(anomaly: dict, shown: str) -> None:
    body = fixture("refund")
    body["anomaly"] = anomaly
    assert shown in all_text(card_payload(make_view(body)))


def test_failed_closed_and_shadow_decisions_are_shown() -> None:
    view = make_view(fixture("refund"), policy=parse_policy(FAIL_CLOSED_POLICY))
    assert view.event.decision["failed_closed"] is True
    payload = card_payload(view)
    assert_golden("card_failed_closed", payload)
    text = all_text(payload)
    assert ":rotating_light: *Failed closed:*" in text
    assert "`vip-check` errored" in text
    assert "`trusted-merchants` matched" in text
    assert "Shadow rules (not acted on): `watch-big-refunds` would auto_reject" in text
    assert "*Needs* 1 of <!subteam^S0APPROVERS> (0/1)" in text


# --- modals ----------------------------------------------------------------------------------


def test_details_modal_redacts_secrets_and_has_the_full_trace() -> None:
    body = fixture("refund")
    body["attributes"] = {
        **body["attributes"],
        "api_key": "sk_live_x",
        "note": "bot token xoxb-1234567890-abcdef here",
    }
    body["summary"] = "Use xoxb-1234567890-abcdef to retry"
    view = make_view(body, policy=parse_policy(FAIL_CLOSED_POLICY))
    modal = build_details_modal(view)
    assert_golden("modal_details", modal)
    dumped = json.dumps(modal)
    assert "sk_live_x" not in dumped and "xoxb-" not in dumped
    assert f'"api_key": "{MASK}"' in all_text(modal)
    assert modal["type"] == "modal" and len(modal["title"]["text"]) <= 24
    text = all_text(modal)
    assert "```{" in text and '"amount": 4200' in text
    for rule in ("watch-big-refunds", "vip-check", "trusted-merchants"):
        assert f"`{rule}`" in text
    assert "Failed closed" in text
    # The card redacts too: a token in the summary never reaches the channel.
    assert "xoxb-" not in json.dumps(card_payload(view))


def test_reject_modal_shape() -> None:
    view = make_view(fixture("refund"), votes=[ALICE])
    modal = build_reject_modal(view, channel="C0FINANCE", ts="1772460000.000100")
    assert_golden("modal_reject", modal)
    assert modal["callback_id"] == REJECT_CALLBACK
    assert json.loads(modal["private_metadata"]) == {
        "r": "r_test0001",
        "v": "1",
        "c": "C0FINANCE",
        "ts": "1772460000.000100",
    }
    [reason] = [block for block in modal["blocks"] if block["type"] == "input"]
    assert reason["block_id"] == "reason" and reason.get("optional", False) is False
    assert reason["element"] == {
        "type": "plain_text_input",
        "action_id": "reason",
        "multiline": True,
        "min_length": 3,
        "max_length": 2000,
        "placeholder": {"type": "plain_text", "text": "Why is this rejected?"},
    }


# --- terminal --------------------------------------------------------------------------------


def test_render_text_reads_like_the_card() -> None:
    card = build_card(make_view(fixture("refund"), votes=[ALICE]), now=NOW)
    text = render_text(card)
    lines = text.splitlines()
    assert lines[0] == "Refund $4,200 to ACME Corp"
    assert "🟠 High risk · payments / refund" in lines
    assert "The requester may not approve." in lines
    assert "Customer: ACME Corp" in lines
    assert "🔗 Open in Stripe (https://dashboard.example.com/refunds/re_3Q1x8Z)" in lines
    assert "[ Approve ] [ Reject ] [ Details ]" in lines
    assert "2026-03-02 14:30 UTC" in text and "<!date" not in text
    final = build_card(make_view(fixture("refund"), **decided("expired")), now=NOW)
    assert "[ Approve ]" not in render_text(final)
    assert isinstance(card.blocks[-2], ActionsBlock)


@pytest.mark.parametrize(
    "value", ["", "not json", "[]", '{"r": 1, "v": "1"}', '{"r": "r_1"}', "null"]
)
def test_parse_button_value_refuses_what_we_did_not_write(value: str) -> None:
    assert parse_button_value(value) is None


def test_a_reply_shared_by_votes_in_a_burst_has_a_line_per_vote_then_what_is_needed() -> None:
    view = make_view(fixture("refund"), votes=[ALICE, BOB])
    reply = vote_reply_text(view.votes, view)
    lines = reply.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [
        [":white_check_mark:", f"<@{ALICE['user_id']}>"],
        [":white_check_mark:", f"<@{BOB['user_id']}>"],
    ]
    assert len(lines) == 3 and lines[2].startswith("Needs ")
    assert "(2/2)" in lines[2]
