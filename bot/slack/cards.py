"""The approval card and its companions: details and reject modals, thread replies, outcome DMs.

Everything is built from a stored `RequestView`, so a card can be re-rendered at any time (after a
vote, on expiry, by `signoff replay`) and always shows what the database says.

Trust: the event body, votes' names and reasons and trace details (which quote event values) are
untrusted and go through `escape_mrkdwn`; ids from the policy (approver users and groups, the
channel) are trusted and rendered as mentions. Every mrkdwn text object is `verbatim`, so Slack
does not turn bare URLs or `#channel` words from an event into links. The body is also passed
through `redact` before it is shown anywhere: a token pasted into a summary must not reach Slack.

Limits are Slack's, read from slack_sdk's classes where it declares them; `Card.as_payload()`
runs slack_sdk's own validation (`to_dict()`), so a limit we got wrong fails loudly, not in Slack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from slack_sdk.models.blocks import (
    ActionsBlock,
    Block,
    ButtonElement,
    ContextBlock,
    DividerBlock,
    HeaderBlock,
    InputBlock,
    MarkdownTextObject,
    PlainTextInputElement,
    PlainTextObject,
    SectionBlock,
)
from slack_sdk.models.views import View

from bot.slack.mrkdwn import (
    chunks_mrkdwn,
    cut,
    cut_mrkdwn,
    date,
    escape_mrkdwn,
    group,
    is_user_id,
    join_within,
    link,
    to_plain,
    user,
)
from connectors.redaction import redact, redact_text
from policies.model import ApproverGroup, Route, format_duration
from storage.models import Request, RequestStatus, Vote
from storage.requests import RequestView
from storage.votes import progress

__all__ = [
    "APPROVE_ACTION",
    "DETAILS_ACTION",
    "REASON_ACTION",
    "REASON_BLOCK",
    "REJECT_ACTION",
    "REJECT_CALLBACK",
    "Card",
    "build_card",
    "build_details_modal",
    "build_reject_modal",
    "button_value",
    "escape_mrkdwn",
    "outcome_dm",
    "parse_button_value",
    "progress_line",
    "render_text",
    "vote_reply_text",
]

APPROVE_ACTION = "signoff_approve"
REJECT_ACTION = "signoff_reject"
DETAILS_ACTION = "signoff_details"
REJECT_CALLBACK = "signoff_reject_reason"
REASON_BLOCK = "reason"
REASON_ACTION = "reason"
REASON_MIN = 3
REASON_MAX = 2000

# Slack's limits. slack_sdk declares most of them on its classes; the others are from Slack's
# Block Kit reference and slack_sdk does not check them.
MESSAGE_MAX_BLOCKS = 50
MODAL_MAX_BLOCKS = View.blocks_max_length  # 100
MODAL_TITLE_MAX = View.title_max_length  # 24
HEADER_MAX = HeaderBlock.text_max_length  # 150
SECTION_TEXT_MAX = SectionBlock.text_max_length  # 3000
SECTION_FIELDS_MAX = SectionBlock.fields_max_length  # 10
FIELD_TEXT_MAX = 2000  # per field; not checked by slack_sdk
CONTEXT_ELEMENTS_MAX = ContextBlock.elements_max_length  # 10
CONTEXT_TEXT_MAX = 3000  # a text object's limit; not checked by slack_sdk for context elements
BUTTON_TEXT_MAX = ButtonElement.text_max_length  # 75
BUTTON_VALUE_MAX = ButtonElement.value_max_length  # 2000
ACTION_ID_MAX = ButtonElement.action_id_max_length  # 255
# Ours, not Slack's: the notification line is read on a lock screen.
FALLBACK_TEXT_MAX = 300
# Ours: three sections of fields is already a long card; the rest is one click away in Details.
CARD_MAX_FIELDS = 3 * SECTION_FIELDS_MAX
MODAL_CONTEXT_SECTIONS = 25
TRACE_DETAIL_MAX = 280
VOTE_REASON_MAX = 300
MODAL_TITLE = "Signoff request"
MODAL_REJECT_TITLE = "Reject request"

_RISK_EMOJI = {
    "low": ":large_green_circle:",
    "medium": ":large_yellow_circle:",
    "high": ":large_orange_circle:",
    "critical": ":red_circle:",
}
_UNKNOWN_RISK_EMOJI = ":white_circle:"

_OUTCOME = {
    RequestStatus.pending: (":hourglass_flowing_sand:", "Waiting for approval"),
    RequestStatus.approved: (":white_check_mark:", "Approved"),
    RequestStatus.rejected: (":x:", "Rejected"),
    RequestStatus.expired: (":hourglass:", "Expired"),
    RequestStatus.cancelled: (":no_entry_sign:", "Cancelled"),
}

# For `render_text` only: the emoji codes the card uses, as terminals show them.
_EMOJI_TEXT = {
    ":large_green_circle:": "🟢",
    ":large_yellow_circle:": "🟡",
    ":large_orange_circle:": "🟠",
    ":red_circle:": "🔴",
    ":white_circle:": "⚪",
    ":hourglass_flowing_sand:": "⏳",
    ":hourglass:": "⌛",
    ":white_check_mark:": "✅",
    ":x:": "❌",
    ":no_entry_sign:": "🚫",
    ":warning:": "⚠️",
    ":rotating_light:": "🚨",
    ":stopwatch:": "⏱",
    ":link:": "🔗",
    ":ghost:": "👻",
    ":bust_in_silhouette:": "👤",
}
_EMOJI_CODE = re.compile(r":[a-z_]+:")
# Bold and italic markers as Slack reads them: around a word-bounded run on one line.
_BOLD = re.compile(r"(?<![\w*])\*([^*\n]+)\*(?![\w*])")
_ITALIC = re.compile(r"(?<![\w_])_([^_\n]+)_(?![\w_])")


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


# --- reading what is stored ------------------------------------------------------------------


@dataclass(frozen=True)
class _Facts:
    """The stored event and decision, read defensively and redacted.

    The body is read as stored, not re-validated as an `Event`: a row written under an older or
    looser schema must still render, and the card must not be the place an event is refused.
    """

    body: Mapping[str, Any]
    decision: Mapping[str, Any]
    route: Route | None

    @classmethod
    def of(cls, view: RequestView) -> _Facts:
        body = redact(view.event.body if isinstance(view.event.body, dict) else {})
        decision = view.event.decision if isinstance(view.event.decision, dict) else {}
        stored = view.request.route
        # Written by `Route.model_dump` at intake, so it validates back; a failure is our bug.
        route = Route.model_validate(stored) if stored else None
        return cls(body=body, decision=decision, route=route)

    def text(self, key: str) -> str:
        return _str(self.body.get(key))

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.body.get(key)
        return value if isinstance(value, Mapping) else {}

    def items(self, key: str) -> list[Mapping[str, Any]]:
        value = self.body.get(key)
        if not isinstance(value, list):
            return []
        return [item for item in value if isinstance(item, Mapping)]

    def title(self, request: Request) -> str:
        return self.text("title") or redact_text(request.title) or "(untitled)"


def _str(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _num(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return f"{round(float(value), 2):g}"


def _aware(moment: datetime) -> datetime:
    # Stored times are UTC (storage.types.UTCDateTime); a naive one can only be UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _span(delta: timedelta) -> str:
    minutes = int(abs(delta).total_seconds() // 60)
    return format_duration(timedelta(minutes=minutes)) if minutes else "under a minute"


def _status(request: Request) -> RequestStatus:
    try:
        return RequestStatus(request.status)
    except ValueError:
        # Only our code writes statuses; guessing one for an unknown value would mislead.
        raise ValueError(f"request {request.id} has unknown status {request.status!r}") from None


# --- small builders --------------------------------------------------------------------------


def _md(text: str, limit: int = SECTION_TEXT_MAX) -> MarkdownTextObject:
    # verbatim: no auto-linking of bare URLs, `#channel` or `@name` words in event text.
    return MarkdownTextObject(text=cut_mrkdwn(text, limit), verbatim=True)


def _section(text: str) -> SectionBlock:
    return SectionBlock(text=_md(text))


def _context(*texts: str) -> ContextBlock:
    elements = [_md(text, CONTEXT_TEXT_MAX) for text in texts if text][:CONTEXT_ELEMENTS_MAX]
    return ContextBlock(elements=elements)


def _field(label: str, value: str) -> MarkdownTextObject:
    """`*Label*` over the value; both escaped here."""
    shown = escape_mrkdwn(value) if value.strip() else "—"
    return _md(f"*{escape_mrkdwn(label)}*\n{shown}", FIELD_TEXT_MAX)


def _field_sections(fields: Sequence[MarkdownTextObject]) -> list[Block]:
    return [
        SectionBlock(fields=list(fields[start : start + SECTION_FIELDS_MAX]))
        for start in range(0, len(fields), SECTION_FIELDS_MAX)
    ]


def _button(text: str, action_id: str, value: str, style: str | None = None) -> ButtonElement:
    assert len(action_id) <= ACTION_ID_MAX
    # The value is never cut: a cut JSON value would not parse. It is bounded by the columns it
    # comes from (id 40, version 128 characters), far below the limit.
    assert len(value) <= BUTTON_VALUE_MAX, "button value over Slack's limit"
    return ButtonElement(
        text=PlainTextObject(text=cut(text, BUTTON_TEXT_MAX)),
        action_id=action_id,
        value=value,
        style=style,
    )


def _person(ref: str, name: str) -> str:
    """Someone who voted or decided: a mention when we have a Slack user id (Slack shows the real
    name, which a display name cannot forge), else their name, escaped."""
    if is_user_id(ref):
        return user(ref)
    return escape_mrkdwn(name or ref or "someone")


def _decider(entry: object) -> str:
    if not isinstance(entry, Mapping):
        return "someone"
    return _person(_str(entry.get("id")), _str(entry.get("name")))


def _approvers(entry: ApproverGroup) -> str:
    if entry.group is not None:
        return group(entry.group)
    return ", ".join(user(ref) for ref in entry.users or [])


def progress_line(route: Route, votes: Sequence[Vote]) -> str:
    """`2 of @finance-leads (1/2) · 1 of <@U0CFO> (0/1)`: what is needed and how far along."""
    # Counted by storage's rule, the one that decides the request, so the card cannot disagree.
    tally = progress(route, [(vote.choice, vote.groups or []) for vote in votes])
    parts = []
    for entry, (_, done, need) in zip(route.approvers, tally, strict=True):
        mark = " :white_check_mark:" if done >= need else ""
        parts.append(f"{need} of {_approvers(entry)} ({min(done, need)}/{need}){mark}")
    return " · ".join(parts)


def _outcome_line(request: Request, status: RequestStatus) -> str:
    """What happened, by whom and when; expired reads as its own outcome, never as a rejection."""
    emoji, word = _OUTCOME[status]
    when = f" {date(_aware(request.decided_at))}" if request.decided_at else ""
    if status is RequestStatus.pending:
        return f"{emoji} *{word}*"
    if status is RequestStatus.expired:
        return (
            f"{emoji} *{word}*{when}: nobody decided before the deadline."
            " Nothing was approved, and nobody rejected it."
        )
    if status is RequestStatus.cancelled:
        if request.superseded_by:
            why = f"superseded by `{escape_mrkdwn(request.superseded_by)}` (a newer version)"
        else:
            why = "withdrawn by the source"
        return f"{emoji} *{word}*{when}: {why}"
    deciders = [_decider(entry) for entry in request.decided_by or []]
    by = f" by {', '.join(deciders)}" if deciders else ""
    return f"{emoji} *{word}*{by}{when}"


def _reason_text(reason: str, limit: int) -> str:
    return escape_mrkdwn(cut(" ".join(reason.split()), limit))


# --- the card --------------------------------------------------------------------------------


def build_card(view: RequestView, *, now: datetime) -> Card:
    """The message for a request; buttons only while it is pending."""
    facts = _Facts.of(view)
    request = view.request
    status = _status(request)
    title = facts.title(request)

    blocks: list[Block] = [HeaderBlock(text=PlainTextObject(text=cut(title, HEADER_MAX)))]
    if status.is_final:
        # First thing under the title: once decided, the outcome is what a reader looks for.
        blocks.append(_section(_outcome_text(request, status)))
    blocks.append(_section(_risk_line(facts)))
    summary = facts.text("summary").strip()
    if summary:
        blocks.append(_section(escape_mrkdwn(summary)))
    blocks.extend(_card_fields(facts))
    links = _links_text(facts)
    if links:
        blocks.append(_section(links))
    anomaly = _anomaly_text(facts)
    if anomaly:
        blocks.append(_section(anomaly))
    blocks.append(DividerBlock())
    blocks.append(_section(_why_text(request, facts)))
    if facts.route is not None:
        blocks.append(_section(_needs_text(facts.route, view.votes, status)))
    if view.votes:
        blocks.append(_section(_votes_text(view.votes)))
    timing = _timing(request, facts.route, status, now)
    if timing:
        blocks.append(_context(*timing))
    if not status.is_final:
        value = button_value(request.id, request.version)
        blocks.append(
            ActionsBlock(
                elements=[
                    _button("Approve", APPROVE_ACTION, value, "primary"),
                    _button("Reject", REJECT_ACTION, value, "danger"),
                    _button("Details", DETAILS_ACTION, value),
                ]
            )
        )
    blocks.append(_context(_footer(request, facts)))
    # Bounded by construction: at most 13 single blocks plus CARD_MAX_FIELDS / 10 field sections
    # and one overflow note.
    assert len(blocks) <= MESSAGE_MAX_BLOCKS
    return Card(blocks=blocks, text=_fallback_text(status, title))


def _fallback_text(status: RequestStatus, title: str) -> str:
    # Also mrkdwn-parsed by Slack (and shown in notifications): escaped like the blocks.
    word = "Approval needed" if status is RequestStatus.pending else _OUTCOME[status][1]
    return cut_mrkdwn(f"{word}: {escape_mrkdwn(title)}", FALLBACK_TEXT_MAX)


def _risk_line(facts: _Facts) -> str:
    risk = facts.text("risk") or "medium"
    emoji = _RISK_EMOJI.get(risk, _UNKNOWN_RISK_EMOJI)
    source, kind = escape_mrkdwn(facts.text("source")), escape_mrkdwn(facts.text("kind"))
    return f"{emoji} *{escape_mrkdwn(risk.capitalize())} risk* · {source} / {kind}"


def _actor_text(actor: Mapping[str, Any]) -> str:
    name, email, ident = (_str(actor.get(key)).strip() for key in ("name", "email", "id"))
    shown = name or ident
    if email:
        shown = f"{shown} ({email})" if shown else email
    return shown


def _card_fields(facts: _Facts) -> list[Block]:
    fields: list[MarkdownTextObject] = []
    actor = _actor_text(facts.mapping("actor"))
    if actor:
        fields.append(_field("Requested by", actor))
    for item in facts.items("context"):
        fields.append(_field(_str(item.get("label")) or "(no label)", _str(item.get("value"))))
    hidden = max(0, len(fields) - CARD_MAX_FIELDS)
    blocks = _field_sections(fields[:CARD_MAX_FIELDS])
    if hidden:
        blocks.append(_context(f"{hidden} more fields: see *Details*"))
    return blocks


def _links_text(facts: _Facts) -> str:
    links = [
        link(_str(item.get("url")), _str(item.get("title")))
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


def _anomaly_text(facts: _Facts) -> str:
    anomaly = facts.mapping("anomaly")
    score = _num(anomaly.get("score"))
    if score is None:
        return ""
    text = f":warning: *Anomaly score {score}*"
    baseline = _num(anomaly.get("baseline"))
    if baseline is not None:
        text += f" (baseline {baseline})"
    detail = _str(anomaly.get("detail")).strip()
    if detail:
        text += f": {escape_mrkdwn(cut(detail, TRACE_DETAIL_MAX))}"
    return text


_OUTCOME_WORDS = {
    "matched": "matched",
    "no_match": "no match",
    "error": "errored",
    "shadow_match": "matched in shadow mode",
    "default": "applied",
}


def _trace_line(step: Mapping[str, Any]) -> str:
    rule = escape_mrkdwn(_str(step.get("rule")))
    raw = _str(step.get("outcome"))
    outcome = _OUTCOME_WORDS.get(raw, raw.replace("_", " "))
    detail = " ".join(_str(step.get("detail")).split())
    line = f"• `{rule}` {escape_mrkdwn(outcome)}"
    if detail:
        line += f": {escape_mrkdwn(cut(detail, TRACE_DETAIL_MAX))}"
    return line


def _why_text(request: Request, facts: _Facts) -> str:
    """The deciding rule and a short trace: errors that came before it, the match itself,
    shadow decisions and the fail-closed warning. The whole trace is in Details."""
    decision = facts.decision
    rule = _str(decision.get("rule")) or request.rule
    kind = _str(decision.get("kind")) or request.decision_kind
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
    lines.extend(_trace_line(step) for step in shown)
    if len(errors) > 2:
        lines.append(f"• {len(errors) - 2} more errors in *Details*")
    shadows = [
        f"`{escape_mrkdwn(_str(item.get('rule')))}` would {escape_mrkdwn(_str(item.get('decide')))}"
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


def _needs_text(route: Route, votes: Sequence[Vote], status: RequestStatus) -> str:
    word = "Needs" if status is RequestStatus.pending else "Needed"
    text = f"*{word}* {progress_line(route, votes)}"
    if "actor_team" in route.forbid:
        text += "\n_The requester and their team may not approve._"
    elif "actor" in route.forbid:
        text += "\n_The requester may not approve._"
    return text


def _vote_line(vote: Vote) -> str:
    approve = vote.choice == "approve"
    emoji = ":white_check_mark:" if approve else ":x:"
    verb = "approved" if approve else "rejected"
    line = f"{emoji} {_person(vote.user_id, vote.user_name)} {verb} {date(_aware(vote.created_at))}"
    if vote.reason.strip():
        line += f": “{_reason_text(vote.reason, VOTE_REASON_MAX)}”"
    return line


def _votes_text(votes: Sequence[Vote]) -> str:
    return join_within(
        [_vote_line(vote) for vote in votes],
        head="*Votes*\n",
        sep="\n",
        limit=SECTION_TEXT_MAX,
        more=lambda n: f"… and {n} more votes",
    )


def _outcome_text(request: Request, status: RequestStatus) -> str:
    text = _outcome_line(request, status)
    reason = request.reason.strip()
    if reason:
        text += f"\n*Reason:* {_reason_text(reason, 1000)}"
    return text


def _timing(
    request: Request, route: Route | None, status: RequestStatus, now: datetime
) -> list[str]:
    created = _aware(request.created_at)
    now = _aware(now)
    parts = [f"Requested {date(created)}"]
    if route is not None and route.sla is not None:
        due = created + route.sla
        sla = format_duration(route.sla)
        if status is RequestStatus.pending:
            if now > due:
                parts.append(
                    f":rotating_light: *SLA {sla} breached:* was due {date(due)}"
                    f" ({_span(now - due)} ago)"
                )
            else:
                parts.append(f":stopwatch: SLA {sla}: due {date(due)} (in {_span(due - now)})")
        elif status in (RequestStatus.approved, RequestStatus.rejected) and request.decided_at:
            met = "met" if _aware(request.decided_at) <= due else "missed"
            parts.append(f":stopwatch: SLA {sla} {met}")
    if status is RequestStatus.pending and request.expires_at is not None:
        expires = _aware(request.expires_at)
        parts.append(f":hourglass: Expires {date(expires)} (in {_span(expires - now)})")
    return parts


def _footer(request: Request, facts: _Facts) -> str:
    subject = escape_mrkdwn(cut(facts.text("subject") or request.subject, 200))
    version = escape_mrkdwn(cut(request.version, 40))
    return f"Request `{escape_mrkdwn(request.id)}` · {subject} · version {version}"


# --- modals ----------------------------------------------------------------------------------


def build_details_modal(view: RequestView) -> dict[str, Any]:
    """A `views.open` view: the whole event (redacted) and the whole decision trace.

    Each part has its own share of the 100 blocks a modal may hold, so a huge attribute blob
    cannot push the trace or the context out; a part cut short says where the rest is.
    """
    facts = _Facts.of(view)
    request = view.request
    status = _status(request)
    show = f"`signoff requests show {escape_mrkdwn(request.id)}`"
    blocks: list[Block] = [
        HeaderBlock(text=PlainTextObject(text=cut(facts.title(request), HEADER_MAX)))
    ]
    blocks.append(_section(_outcome_line(request, status)))
    blocks.extend(_field_sections(_overview_fields(request, facts)))
    actor = facts.mapping("actor")
    if actor:
        keys = ("name", "email", "id", "team")
        blocks.extend(_field_sections([_field(f"Actor {k}", _str(actor.get(k))) for k in keys]))
    summary = facts.text("summary").strip()
    if summary:
        blocks.extend(_long_sections("*Summary*", escape_mrkdwn(summary), 5, show))
    blocks.extend(_long_sections("*Decision trace*", _full_trace(request, facts), 10, show))
    anomaly = _anomaly_text(facts)
    if anomaly:
        blocks.append(_section(anomaly))
    attributes = facts.mapping("attributes")
    if attributes:
        pretty = json.dumps(attributes, indent=2, ensure_ascii=False, default=str)
        blocks.extend(_long_sections("*Attributes*", escape_mrkdwn(pretty), 30, show, code=True))
    blocks.extend(_context_sections(facts, show))
    links = [link(_str(item.get("url")), _str(item.get("title"))) for item in facts.items("links")]
    if links:
        blocks.append(
            _section(
                join_within(
                    links,
                    head="*Links*\n",
                    sep="\n",
                    limit=SECTION_TEXT_MAX,
                    more=lambda n: f"… and {n} more: {show}",
                )
            )
        )
    if view.votes:
        blocks.append(_section(_votes_text(view.votes)))
    # Bounded by the shares above: 5 + 5 + 10 + 1 + 30 + 27 + 2 blocks at most.
    assert len(blocks) <= MODAL_MAX_BLOCKS
    modal = View(
        type="modal",
        title=PlainTextObject(text=cut(MODAL_TITLE, MODAL_TITLE_MAX)),
        close=PlainTextObject(text="Close"),
        blocks=blocks,
    )
    return modal.to_dict()


def _context_sections(facts: _Facts, show: str) -> list[Block]:
    fields = [
        _field(_str(item.get("label")) or "(no label)", _str(item.get("value")))
        for item in facts.items("context")
    ]
    if not fields:
        return []
    shown = MODAL_CONTEXT_SECTIONS * SECTION_FIELDS_MAX
    blocks: list[Block] = [_section("*Context*"), *_field_sections(fields[:shown])]
    if len(fields) > shown:
        blocks.append(_context(f"{len(fields) - shown} more fields: {show} has them all."))
    return blocks


def _overview_fields(request: Request, facts: _Facts) -> list[MarkdownTextObject]:
    fields = [
        _field("Request", request.id),
        _field("Status", request.status),
        _field("Source", facts.text("source")),
        _field("Kind", facts.text("kind")),
        _field("Subject", facts.text("subject")),
        _field("Version", facts.text("version")),
        _field("Risk", facts.text("risk")),
        _field("Occurred at", facts.text("occurred_at") or "not given"),
        _field("Received at", facts.text("received_at")),
        _field("Delivery id", facts.text("delivery_id")),
    ]
    callback = facts.text("callback_url")
    if callback:
        fields.append(_field("Callback URL", callback))
    # `sync` is left out on purpose: it is connector-private data for the sync-back, not context
    # for an approver, and may hold source identifiers nobody needs to see.
    return fields


def _full_trace(request: Request, facts: _Facts) -> str:
    decision = facts.decision
    rule = escape_mrkdwn(_str(decision.get("rule")) or request.rule)
    kind = escape_mrkdwn(_str(decision.get("kind")) or request.decision_kind)
    lines = [f"Rule `{rule}` decided {kind}."]
    lines.extend(
        _trace_line(step) for step in decision.get("trace") or [] if isinstance(step, Mapping)
    )
    for item in decision.get("shadow") or []:
        if isinstance(item, Mapping):
            lines.append(
                f":ghost: shadow `{escape_mrkdwn(_str(item.get('rule')))}`"
                f" would {escape_mrkdwn(_str(item.get('decide')))} (not acted on)"
            )
    if decision.get("failed_closed"):
        lines.append(":rotating_light: *Failed closed:* a condition errored before the winner.")
    return "\n".join(lines)


def _long_sections(
    heading: str, text: str, max_blocks: int, show: str, *, code: bool = False
) -> list[Block]:
    """Escaped text over as many sections as it takes (at most `max_blocks`), each within the
    section limit; when it does not all fit, the last one says so."""
    fence = "```" if code else ""
    note = f"\n_Cut here: {show} has the rest._"
    room = SECTION_TEXT_MAX - len(heading) - 2 * len(fence) - len(note) - 1
    pieces = chunks_mrkdwn(text, room)
    cut_short = len(pieces) > max_blocks
    pieces = pieces[:max_blocks]
    blocks: list[Block] = []
    for index, piece in enumerate(pieces):
        text = f"{fence}{piece}{fence}"
        if index == 0:
            text = f"{heading}\n{text}"
        if cut_short and index == len(pieces) - 1:
            text += note
        blocks.append(_section(text))
    return blocks


def build_reject_modal(view: RequestView, *, channel: str, ts: str) -> dict[str, Any]:
    """Asks for the reason; the submission carries the request, the version shown and the card's
    message, so the rejection is bound to what the approver saw and the card can be updated."""
    facts = _Facts.of(view)
    request = view.request
    metadata = json.dumps(
        {"r": request.id, "v": request.version, "c": channel, "ts": ts}, separators=(",", ":")
    )
    modal = View(
        type="modal",
        callback_id=REJECT_CALLBACK,
        title=PlainTextObject(text=cut(MODAL_REJECT_TITLE, MODAL_TITLE_MAX)),
        submit=PlainTextObject(text="Reject"),
        close=PlainTextObject(text="Cancel"),
        private_metadata=metadata,
        blocks=[
            _section(f"Reject *{escape_mrkdwn(cut(facts.title(request), 500))}*?"),
            InputBlock(
                block_id=REASON_BLOCK,
                label=PlainTextObject(text="Reason"),
                element=PlainTextInputElement(
                    action_id=REASON_ACTION,
                    multiline=True,
                    min_length=REASON_MIN,
                    max_length=REASON_MAX,
                    placeholder=PlainTextObject(text="Why is this rejected?"),
                ),
                optional=False,
            ),
        ],
    )
    return modal.to_dict()


# --- thread replies and DMs ------------------------------------------------------------------


def vote_reply_text(vote: Vote, view: RequestView) -> str:
    """The thread reply under the card when someone votes."""
    text = _vote_line(vote)
    route = _Facts.of(view).route
    if route is not None and _status(view.request) is RequestStatus.pending:
        text += f"\nNeeds {progress_line(route, view.votes)}"
    return cut_mrkdwn(text, SECTION_TEXT_MAX)


def outcome_dm(view: RequestView) -> tuple[str, list[dict[str, Any]]]:
    """A direct message saying how a request ended: (notification text, blocks)."""
    facts = _Facts.of(view)
    request = view.request
    status = _status(request)
    title = escape_mrkdwn(cut(facts.title(request), 500))
    body = f"{_outcome_text(request, status)}\n*{title}*"
    blocks: list[Block] = [_section(body), _context(_footer(request, facts))]
    return _fallback_text(status, facts.title(request)), [block.to_dict() for block in blocks]


# --- terminal --------------------------------------------------------------------------------


def render_text(card: Card) -> str:
    """The card as a terminal shows it (for `signoff demo`)."""
    lines: list[str] = []
    for block in card.blocks:
        if isinstance(block, HeaderBlock) and block.text is not None:
            title = block.text.text
            lines.extend([title, "=" * min(len(title), 72)])
        elif isinstance(block, SectionBlock):
            if block.text is not None:
                lines.append(_plain(block.text.text))
            for field in block.fields or []:
                label, _, value = field.text.partition("\n")
                lines.append(f"{_plain(label.strip('*'))}: {_plain(value)}")
        elif isinstance(block, ContextBlock):
            texts = [_plain(e.text) for e in block.elements if isinstance(e, MarkdownTextObject)]
            lines.append(" · ".join(texts))
        elif isinstance(block, DividerBlock):
            lines.append("-" * 40)
        elif isinstance(block, ActionsBlock):
            buttons = [
                f"[ {element.text.text} ]"
                for element in block.elements
                if isinstance(element, ButtonElement) and element.text is not None
            ]
            lines.append(" ".join(buttons))
    return "\n".join(lines) + "\n"


def _plain(text: str) -> str:
    shown = _BOLD.sub(r"\1", _ITALIC.sub(r"\1", to_plain(text)))
    return _EMOJI_CODE.sub(lambda match: _EMOJI_TEXT.get(match.group(0), match.group(0)), shown)
