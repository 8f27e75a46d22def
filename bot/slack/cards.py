"""The approval card: the message for a request, its buttons, and the thread replies and
outcome DMs that go with it.

Everything is built from a stored `RequestView`, so a card can be re-rendered at any time (after a
vote, on expiry, by `signoff replay`) and always shows what the database says.

Trust: the event body, votes' names and reasons and trace details (which quote event values) are
untrusted and go through `escape_mrkdwn`; ids from the policy (approver users and groups, the
channel) are trusted and rendered as mentions. The body is also passed through `redact` before it
is shown anywhere: a token pasted into a summary must not reach Slack.

`Card.as_payload()` runs slack_sdk's own validation (`to_dict()`), so a limit we got wrong fails
loudly, not in Slack.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    DividerBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
)

from bot.slack.blocks import (
    HEADER_MAX,
    MESSAGE_MAX_BLOCKS,
    OUTCOME,
    SECTION_FIELDS_MAX,
    SECTION_TEXT_MAX,
    Facts,
    anomaly_text,
    as_text,
    aware,
    button,
    context,
    field,
    field_sections,
    outcome_line,
    reason_text,
    section,
    span,
    status_of,
    trace_line,
    vote_line,
    votes_text,
)
from bot.slack.mrkdwn import (
    cut,
    cut_mrkdwn,
    date,
    escape_mrkdwn,
    group,
    is_user_id,
    join_within,
    link,
    user,
)
from policies.model import ApproverGroup, Route, format_duration
from storage.models import Request, RequestStatus
from storage.requests import RequestView, VoteView
from storage.votes import progress

__all__ = [
    "APPROVE_ACTION",
    "DETAILS_ACTION",
    "REJECT_ACTION",
    "SILENCE_ACTION",
    "Card",
    "build_card",
    "button_value",
    "outcome_dm",
    "parse_button_value",
    "progress_line",
    "still_needed",
    "vote_reply_text",
]

APPROVE_ACTION = "signoff_approve"
REJECT_ACTION = "signoff_reject"
DETAILS_ACTION = "signoff_details"
SILENCE_ACTION = "signoff_silence"

# Ours, not Slack's: the notification line is read on a lock screen.
FALLBACK_TEXT_MAX = 300
# Ours: three sections of fields is already a long card; the rest is one click away in Details.
CARD_MAX_FIELDS = 3 * SECTION_FIELDS_MAX

_RISK_EMOJI = {
    "low": ":large_green_circle:",
    "medium": ":large_yellow_circle:",
    "high": ":large_orange_circle:",
    "critical": ":red_circle:",
}
_UNKNOWN_RISK_EMOJI = ":white_circle:"


@dataclass(frozen=True)
class Card:
    """A Slack message: blocks and the notification text shown where blocks are not."""

    blocks: list[Block]
    text: str

    def as_payload(self) -> dict[str, Any]:
        """The `chat.postMessage` / `chat.update` arguments. Raises slack_sdk's
        `SlackObjectFormationError` if a block breaks one of Slack's limits."""
        return {"blocks": [block.to_dict() for block in self.blocks], "text": self.text}


def button_value(request_id: str, version: str) -> str:
    """What a button carries: the request and the version shown, so a click on a card for a
    superseded version can be refused."""
    return json.dumps({"r": request_id, "v": version}, separators=(",", ":"))


def parse_button_value(value: str) -> tuple[str, str] | None:
    """(request id, version) from a button's value; None for anything we did not write."""
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    request_id, version = data.get("r"), data.get("v")
    if not isinstance(request_id, str) or not isinstance(version, str):
        return None
    return request_id, version


def _approvers(entry: ApproverGroup) -> str:
    if entry.group is not None:
        return group(entry.group)
    return ", ".join(user(ref) for ref in entry.users or [])


def progress_line(route: Route, votes: Sequence[VoteView]) -> str:
    """`2 of @finance-leads (1/2) · 1 of <@U0CFO> (0/1)`: what is needed and how far along."""
    # Counted by storage's rule, the one that decides the request, so the card cannot disagree.
    tally = progress(route, [(vote.choice, vote.groups or []) for vote in votes])
    parts = []
    for entry, (_, done, need) in zip(route.approvers, tally, strict=True):
        mark = " :white_check_mark:" if done >= need else ""
        parts.append(f"{need} of {_approvers(entry)} ({min(done, need)}/{need}){mark}")
    return " · ".join(parts)


def still_needed(route: Route, votes: Sequence[VoteView]) -> str:
    """`1 more of @finance-leads · 1 more of <@U0CFO>`; "" once every entry has its quorum."""
    tally = progress(route, [(vote.choice, vote.groups or []) for vote in votes])
    return " · ".join(
        f"{need - done} more of {_approvers(entry)}"
        for entry, (_, done, need) in zip(route.approvers, tally, strict=True)
        if done < need
    )


# --- the card --------------------------------------------------------------------------------


def build_card(view: RequestView, *, now: datetime) -> Card:
    """The message for a request; buttons only while it is pending."""
    facts = Facts.of(view)
    request = view.request
    status = status_of(request)
    title = facts.title(request)

    blocks: list[Block] = [HeaderBlock(text=PlainTextObject(text=cut(title, HEADER_MAX)))]
    if status.is_final:
        # First thing under the title: once decided, the outcome is what a reader looks for.
        blocks.append(section(_outcome_text(request, status)))
    blocks.append(section(_risk_line(facts)))
    summary = facts.text("summary").strip()
    if summary:
        blocks.append(section(escape_mrkdwn(summary)))
    blocks.extend(_card_fields(facts))
    links = _links_text(facts)
    if links:
        blocks.append(section(links))
    anomaly = anomaly_text(facts)
    if anomaly:
        blocks.append(section(anomaly))
    blocks.append(DividerBlock())
    blocks.append(section(_why_text(request, facts)))
    if facts.route is not None:
        has_actor = bool(facts.mapping("actor").get("id"))
        blocks.append(section(_needs_text(facts.route, view.votes, status, has_actor=has_actor)))
    if view.votes:
        blocks.append(section(votes_text(view.votes)))
    timing = _timing(request, facts.route, status, now)
    if timing:
        blocks.append(context(*timing))
    if not status.is_final:
        value = button_value(request.id, request.version)
        buttons = [
            button("Approve", APPROVE_ACTION, value, "primary"),
            button("Reject", REJECT_ACTION, value, "danger"),
        ]
        if offers_silence(facts):
            buttons.append(button("Silence…", SILENCE_ACTION, value))
        buttons.append(button("Details", DETAILS_ACTION, value))
        blocks.append(ActionsBlock(elements=buttons))
    blocks.append(context(_footer(request, facts)))
    # Bounded by construction: at most 13 single blocks plus CARD_MAX_FIELDS / 10 field sections
    # and one overflow note.
    assert len(blocks) <= MESSAGE_MAX_BLOCKS
    return Card(blocks=blocks, text=_fallback_text(status, title))


def offers_silence(facts: Facts) -> bool:
    """Only an alert whose connector can silence it (Alertmanager with ALERTMANAGER_URL set)
    says so in its sync-back data, next to the labels to match."""
    sync = facts.mapping("sync")
    return sync.get("silence") is True and bool(sync.get("labels"))


def _fallback_text(status: RequestStatus, title: str) -> str:
    # Also mrkdwn-parsed by Slack (and shown in notifications): escaped like the blocks.
    word = "Approval needed" if status is RequestStatus.pending else OUTCOME[status][1]
    return cut_mrkdwn(f"{word}: {escape_mrkdwn(title)}", FALLBACK_TEXT_MAX)


def _risk_line(facts: Facts) -> str:
    risk = facts.text("risk") or "medium"
    emoji = _RISK_EMOJI.get(risk, _UNKNOWN_RISK_EMOJI)
    source, kind = escape_mrkdwn(facts.text("source")), escape_mrkdwn(facts.text("kind"))
    return f"{emoji} *{escape_mrkdwn(risk.capitalize())} risk* · {source} / {kind}"


def _actor_text(actor: Mapping[str, Any]) -> str:
    name, email, ident = (as_text(actor.get(key)).strip() for key in ("name", "email", "id"))
    shown = name or ident
    if email:
        shown = f"{shown} ({email})" if shown else email
    return shown


def _card_fields(facts: Facts) -> list[Block]:
    fields: list[MarkdownTextObject] = []
    actor = _actor_text(facts.mapping("actor"))
    if actor:
        fields.append(field("Requested by", actor))
    for item in facts.items("context"):
        fields.append(field(as_text(item.get("label")) or "(no label)", as_text(item.get("value"))))
    hidden = max(0, len(fields) - CARD_MAX_FIELDS)
    blocks = field_sections(fields[:CARD_MAX_FIELDS])
    if hidden:
        blocks.append(context(f"{hidden} more fields: see *Details*"))
    return blocks


def _links_text(facts: Facts) -> str:
    links = [
        link(as_text(item.get("url")), as_text(item.get("title")))
        for item in facts.items("links")
        if item.get("url") or item.get("title")
    ]
    if not links:
        return ""
    return join_within(
        links,
        head=":link: ",
        sep=" · ",
        limit=SECTION_TEXT_MAX,
        more=lambda n: f"{n} more in *Details*",
    )


def _why_text(request: Request, facts: Facts) -> str:
    """The deciding rule and a short trace: errors that came before it, the match itself,
    shadow decisions and the fail-closed warning. The whole trace is in Details."""
    decision = facts.decision
    rule = as_text(decision.get("rule")) or request.rule
    kind = as_text(decision.get("kind")) or request.decision_kind
    verb = "routed it to people" if kind == "route" else f"decided {escape_mrkdwn(kind)}"
    lines = [f"*Why it is here:* policy rule `{escape_mrkdwn(rule)}` {verb}"]
    trace = [step for step in decision.get("trace") or [] if isinstance(step, Mapping)]
    errors = [step for step in trace if step.get("outcome") == "error"]
    winner = next(
        (
            step
            for step in reversed(trace)
            if step.get("rule") == rule and step.get("outcome") in ("matched", "default")
        ),
        None,
    )
    shown = errors[:2] + ([winner] if winner is not None else [])
    lines.extend(trace_line(step) for step in shown)
    if len(errors) > 2:
        lines.append(f"• {len(errors) - 2} more errors in *Details*")
    shadows = [
        f"`{escape_mrkdwn(as_text(item.get('rule')))}`"
        f" would {escape_mrkdwn(as_text(item.get('decide')))}"
        for item in decision.get("shadow") or []
        if isinstance(item, Mapping)
    ]
    if shadows:
        lines.append(":ghost: Shadow rules (not acted on): " + ", ".join(shadows))
    if decision.get("failed_closed"):
        lines.append(
            ":rotating_light: *Failed closed:* a policy condition errored before the deciding"
            " rule, so an automatic decision was refused and people decide instead."
        )
    return join_within(lines, sep="\n", limit=SECTION_TEXT_MAX, more=lambda n: f"… {n} more")


def _needs_text(
    route: Route, votes: Sequence[VoteView], status: RequestStatus, *, has_actor: bool
) -> str:
    word = "Needs" if status is RequestStatus.pending else "Needed"
    text = f"*{word}* {progress_line(route, votes)}"
    if not has_actor:
        return text  # an alert has no requester: nobody to keep from approving
    if "actor_team" in route.forbid:
        text += "\n_The requester and their team may not approve._"
    elif "actor" in route.forbid:
        text += "\n_The requester may not approve._"
    return text


def _outcome_text(request: Request, status: RequestStatus) -> str:
    text = outcome_line(request, status)
    reason = request.reason.strip()
    withdrawn = status is RequestStatus.cancelled and not request.superseded_by
    if reason and not withdrawn:  # a withdrawal's reason is already the outcome line
        text += f"\n*Reason:* {reason_text(reason, 1000)}"
    return text


def _timing(
    request: Request, route: Route | None, status: RequestStatus, now: datetime
) -> list[str]:
    created = aware(request.created_at)
    now = aware(now)
    parts = [f"Requested {date(created)}"]
    if route is not None and route.sla is not None:
        due = created + route.sla
        sla = format_duration(route.sla)
        if status is RequestStatus.pending:
            if now > due:
                parts.append(
                    f":rotating_light: *SLA {sla} breached:* was due {date(due)}"
                    f" ({span(now - due)} ago)"
                )
            else:
                parts.append(f":stopwatch: SLA {sla}: due {date(due)} (in {span(due - now)})")
        elif status in (RequestStatus.approved, RequestStatus.rejected) and request.decided_at:
            met = "met" if aware(request.decided_at) <= due else "missed"
            parts.append(f":stopwatch: SLA {sla} {met}")
    level = request.escalation_level or 0
    if status is RequestStatus.pending and route is not None and level > 0:
        notified = ", ".join(notify_target(t) for t in route.escalate[level - 1].notify)
        parts.append(
            f":rotating_light: *Escalated* (level {level} of {len(route.escalate)}) to {notified}"
        )
    if status is RequestStatus.pending and request.expires_at is not None:
        expires = aware(request.expires_at)
        parts.append(f":hourglass: Expires {date(expires)} (in {span(expires - now)})")
    return parts


def notify_target(ref: str) -> str:
    """A policy's notify entry: a user id pings the user, a group id the group; a handle is
    shown inert (the notice in the thread resolves it to a real mention)."""
    return user(ref) if is_user_id(ref) else group(ref)


def _footer(request: Request, facts: Facts) -> str:
    subject = escape_mrkdwn(cut(facts.text("subject") or request.subject, 200))
    version = escape_mrkdwn(cut(request.version, 40))
    return f"Request `{escape_mrkdwn(request.id)}` · {subject} · version {version}"


# --- thread replies and DMs ------------------------------------------------------------------


def vote_reply_text(votes: Sequence[VoteView], view: RequestView) -> str:
    """The thread reply under the card when someone votes: a line per vote (several when votes
    came in a burst and share one reply), then what is still needed."""
    text = "\n".join(vote_line(vote) for vote in votes)
    route = Facts.of(view).route
    if route is not None and status_of(view.request) is RequestStatus.pending:
        text += f"\nNeeds {progress_line(route, view.votes)}"
    return cut_mrkdwn(text, SECTION_TEXT_MAX)


def outcome_dm(view: RequestView) -> tuple[str, list[dict[str, Any]]]:
    """A direct message saying how a request ended: (notification text, blocks)."""
    facts = Facts.of(view)
    request = view.request
    status = status_of(request)
    title = escape_mrkdwn(cut(facts.title(request), 500))
    body = f"{_outcome_text(request, status)}\n*{title}*"
    blocks: list[Block] = [section(body), context(_footer(request, facts))]
    return _fallback_text(status, facts.title(request)), [block.to_dict() for block in blocks]
