"""mrkdwn injection, property-based: hypothesis-written text in every event and vote field that
reaches a card, a vote reply, an outcome DM or the Details modal, and no `<...>` construct in
what Slack would parse that Signoff did not write itself from a trusted id (the policy's users and
groups, Slack user ids of voters) or a link it built (`<http...|title>`, only from a link's URL).
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.slack.cards import build_card, outcome_dm, vote_reply_text
from bot.slack.modals import build_details_modal
from bot.slack.mrkdwn import link
from connectors.redaction import redact
from policies.loader import parse_policy
from tests.unit.test_cards import NOW, decided, fixture, make_view, mrkdwn_texts

INJECTION = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

# Trusted ids: the only mentions a card may carry.
POLICY_TEXT = """
rules:
  - name: echo
    when: event.title.size() >= 0 && event.summary.size() >= 0
    decide: route
    route:
      channel: C0SEC
      approvers: [{users: [U0SEC1], min: 1}, {group: S0LEADS, min: 1}]
default:
  decide: route
  route: {channel: C0APPROVALS, approvers: [{group: approvers, min: 1}]}
"""
POLICY = parse_policy(POLICY_TEXT)
TRUSTED = {"<@U0SEC1>", "<!subteam^S0LEADS>", "<@U0VOTER1>"}
ATTACKS = [
    "<!channel>",
    "<!here>",
    "<!everyone>",
    "<@U0CFO>",
    "<!subteam^S0ALL|@all>",
    "<https://evil.example|bank>",
    "<http://x>",
    "<mailto:a@b|x>",
    "&lt;!channel&gt;",
    "<#C0GENERAL>",
    "<!date^1^x|y>",
    ">",
    "&",
]
hostile_text = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from(ATTACKS) | st.text(max_size=5), min_size=1, max_size=6).map("".join),
)
# Every `<...>` Slack would read as a construct.
CONSTRUCT = re.compile(r"<([^<>]*)>")


def allowed(construct: str, links: set[str]) -> bool:
    if construct in TRUSTED or construct.startswith("<!date^"):
        return True
    # A link we built: `<target|label>` whose target is one of the event's http(s) URLs.
    target = construct[1:-1].split("|", 1)[0]
    return target in links


def assert_inert(payload: Any, links: set[str]) -> None:
    for text in mrkdwn_texts(payload):
        for match in CONSTRUCT.finditer(text):
            assert allowed(match.group(0), links), (match.group(0), text)


@st.composite
def hostile_bodies(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a valid event body, raw fields stored as is: shapes the model would refuse)."""
    body = fixture("refund")
    body.update(
        title=draw(hostile_text.filter(lambda t: t.strip())) or "t",
        summary=draw(hostile_text),
        actor={
            "id": draw(hostile_text.filter(bool)) or "a",
            "name": draw(hostile_text),
            "email": draw(hostile_text),
            "team": draw(hostile_text),
        },
        context=[
            {"label": draw(hostile_text.filter(bool)) or "l", "value": draw(hostile_text)}
            for _ in range(draw(st.integers(0, 3)))
        ],
        anomaly={"score": draw(st.floats(-10, 10)), "detail": draw(hostile_text)},
        attributes={"shown": draw(hostile_text), "amount": 4200},
    )
    path = draw(hostile_text.map(lambda t: t.replace(" ", "")))
    raw = {
        "links": [
            {"title": draw(hostile_text), "url": f"https://docs.example/{path}"},
            {"title": draw(hostile_text), "url": draw(hostile_text)},
        ],
        "subject": draw(hostile_text),
        "source": draw(hostile_text),
        "kind": draw(hostile_text),
    }
    return body, raw


def link_targets(raw: dict[str, Any]) -> set[str]:
    """The targets of the links Signoff builds for these stored links (redacted, as cards
    show them): the only `<http...|...>` constructs a card may carry."""
    targets = set()
    for item in redact({"links": raw["links"]})["links"]:
        built = link(item["url"], item["title"] or item["url"])
        if built.startswith("<"):
            targets.add(built[1:].split("|", 1)[0])
    return targets


@INJECTION
@given(fields=hostile_bodies(), name=hostile_text, reason=hostile_text, voter=hostile_text)
def test_no_forged_construct_reaches_slack(fields, name, reason, voter) -> None:
    body, raw = fields
    votes = [
        {"user_id": "U0VOTER1", "user_name": name, "reason": reason, "groups": ["U0SEC1"]},
        {"user_id": voter or "x", "user_name": name, "choice": "reject", "reason": reason},
    ]
    view = make_view(body, policy=POLICY, votes=votes, raw=raw)
    links = link_targets(raw)
    card = build_card(view, now=NOW).as_payload()
    assert_inert(card, links)
    assert "<@U0SEC1>" in str(card)  # the policy's own mention is still a mention
    assert_inert({"text": vote_reply_text([view.votes[1]], view), "type": "mrkdwn"}, links)
    assert_inert(build_details_modal(view), links)

    final = make_view(
        body,
        policy=POLICY,
        raw=raw,
        **decided("rejected", decided_by=[{"id": voter, "name": name}], reason=reason),
    )
    text, blocks = outcome_dm(final)
    assert_inert({"text": text, "blocks": blocks}, links)
    assert_inert(build_card(final, now=NOW).as_payload(), links)
