"""What the card, the modals and the DMs share: Slack's limits, the stored facts of a request,
small Block Kit builders and the lines more than one of them shows.

Limits are Slack's, read from slack_sdk's classes where it declares them. Every mrkdwn text object
is `verbatim`, so Slack does not turn bare URLs or `#channel` words from an event into links.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from slack_sdk.models.blocks import (
    Block,
    ButtonElement,
    ContextBlock,
    HeaderBlock,
    MarkdownTextObject,
    PlainTextObject,
    SectionBlock,
)
from slack_sdk.models.views import View

from bot.slack.mrkdwn import cut, cut_mrkdwn, date, escape_mrkdwn, is_user_id, join_within, user
from connectors.redaction import redact, redact_text
from policies.model import Route, format_duration
from storage.models import Request, RequestStatus
from storage.requests import RequestView, VoteView

__all__ = [
    "ACTION_ID_MAX",
    "BUTTON_TEXT_MAX",
    "BUTTON_VALUE_MAX",
    "CONTEXT_ELEMENTS_MAX",
    "CONTEXT_TEXT_MAX",
    "FIELD_TEXT_MAX",
    "HEADER_MAX",
    "MESSAGE_MAX_BLOCKS",
    "MODAL_MAX_BLOCKS",
    "MODAL_TITLE_MAX",
    "OUTCOME",
    "SECTION_FIELDS_MAX",
    "SECTION_TEXT_MAX",
    "TRACE_DETAIL_MAX",
    "VOTE_REASON_MAX",
    "Facts",
    "anomaly_text",
    "as_text",
    "aware",
    "button",
    "context",
    "field",
    "field_sections",
    "outcome_line",
    "reason_text",
    "section",
    "span",
    "status_of",
    "trace_line",
    "vote_line",
    "votes_text",
]

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
# Ours, not Slack's.
TRACE_DETAIL_MAX = 280
VOTE_REASON_MAX = 300

OUTCOME = {
    RequestStatus.pending: (":hourglass_flowing_sand:", "Waiting for approval"),
    RequestStatus.approved: (":white_check_mark:", "Approved"),
    RequestStatus.rejected: (":x:", "Rejected"),
    RequestStatus.expired: (":hourglass:", "Expired"),
    RequestStatus.cancelled: (":no_entry_sign:", "Cancelled"),
}


# --- reading what is stored ------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """The stored event and decision, read defensively and redacted.

    The body is read as stored, not re-validated as an `Event`: a row written under an older or
    looser schema must still render, and the card must not be the place an event is refused.
    """

    body: Mapping[str, Any]
    decision: Mapping[str, Any]
    route: Route | None

    @classmethod
    def of(cls, view: RequestView) -> Facts:
        body = redact(view.event.body if isinstance(view.event.body, dict) else {})
        decision = view.event.decision if isinstance(view.event.decision, dict) else {}
        stored = view.request.route
        # Written by `Route.model_dump` at intake, so it validates back; a failure is our bug.
        route = Route.model_validate(stored) if stored else None
        return cls(body=body, decision=decision, route=route)

    def text(self, key: str) -> str:
        return as_text(self.body.get(key))

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


def as_text(value: object) -> str:
    """A stored value as text: "" for None, `str()` for anything that is not a string."""
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _num(value: object) -> str | None:
    """A stored number, rounded to two places; None for anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return f"{round(float(value), 2):g}"


def aware(moment: datetime) -> datetime:
    # Stored times are UTC (storage.types.UTCDateTime); a naive one can only be UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def span(delta: timedelta) -> str:
    minutes = int(abs(delta).total_seconds() // 60)
    return format_duration(timedelta(minutes=minutes)) if minutes else "under a minute"


def status_of(request: Request) -> RequestStatus:
    try:
        return RequestStatus(request.status)
    except ValueError:
        # Only our code writes statuses; guessing one for an unknown value would mislead.
        raise ValueError(f"request {request.id} has unknown status {request.status!r}") from None


# --- small builders --------------------------------------------------------------------------


def _md(text: str, limit: int = SECTION_TEXT_MAX) -> MarkdownTextObject:
    # verbatim: no auto-linking of bare URLs, `#channel` or `@name` words in event text.
    return MarkdownTextObject(text=cut_mrkdwn(text, limit), verbatim=True)


def section(text: str) -> SectionBlock:
    return SectionBlock(text=_md(text))


def context(*texts: str) -> ContextBlock:
    elements = [_md(text, CONTEXT_TEXT_MAX) for text in texts if text][:CONTEXT_ELEMENTS_MAX]
    return ContextBlock(elements=elements)


def field(label: str, value: str) -> MarkdownTextObject:
    """`*Label*` over the value; both escaped here."""
    shown = escape_mrkdwn(value) if value.strip() else "—"
    return _md(f"*{escape_mrkdwn(label)}*\n{shown}", FIELD_TEXT_MAX)


def field_sections(fields: Sequence[MarkdownTextObject]) -> list[Block]:
    return [
        SectionBlock(fields=list(fields[start : start + SECTION_FIELDS_MAX]))
        for start in range(0, len(fields), SECTION_FIELDS_MAX)
    ]


def button(text: str, action_id: str, value: str, style: str | None = None) -> ButtonElement:
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


# --- lines the card and the modals both show -------------------------------------------------


def _person(ref: str, name: str) -> str:
    """Someone who voted or decided: a mention when we have a Slack user id (Slack shows the real
    name, which a display name cannot forge), else their name, escaped."""
    if is_user_id(ref):
        return user(ref)
    return escape_mrkdwn(name or ref or "someone")


def _decider(entry: object) -> str:
    if not isinstance(entry, Mapping):
        return "someone"
    return _person(as_text(entry.get("id")), as_text(entry.get("name")))


def outcome_line(request: Request, status: RequestStatus) -> str:
    """What happened, by whom and when; expired reads as its own outcome, never as a rejection."""
    emoji, word = OUTCOME[status]
    when = f" {date(aware(request.decided_at))}" if request.decided_at else ""
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
        elif request.reason.strip():
            # The source's own words, e.g. "alert resolved at ...": what a reader needs first.
            why = f"{reason_text(request.reason, 300)} (withdrawn by the source)"
        else:
            why = "withdrawn by the source"
        return f"{emoji} *{word}*{when}: {why}"
    deciders = [_decider(entry) for entry in request.decided_by or []]
    by = f" by {', '.join(deciders)}" if deciders else ""
    return f"{emoji} *{word}*{by}{when}"


def reason_text(reason: str, limit: int) -> str:
    return escape_mrkdwn(cut(" ".join(reason.split()), limit))


# From this many standard deviations a value is flagged, as the baselines' clamping band is.
UNUSUAL_SCORE = 3.0


def anomaly_text(facts: Facts) -> str:
    anomaly = facts.mapping("anomaly")
    score = _num(anomaly.get("score"))
    samples = _num(anomaly.get("samples"))
    if score is None:
        if samples is None:
            return ""
        # A baseline too young to judge: say so, or "why was this not auto-approved?" has no answer.
        return f":grey_question: *No anomaly baseline yet* ({samples} values seen so far)"
    unusual = abs(float(score)) >= UNUSUAL_SCORE
    text = f":warning: *Anomaly score {score}*" if unusual else f"*Anomaly score {score}*"
    notes = [] if unusual else ["usual"]
    baseline = _num(anomaly.get("baseline"))
    if baseline is not None:
        notes.append(f"baseline {baseline}")
    if notes:
        text += f" ({'; '.join(notes)})"
    detail = as_text(anomaly.get("detail")).strip()
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


def trace_line(step: Mapping[str, Any]) -> str:
    rule = escape_mrkdwn(as_text(step.get("rule")))
    raw = as_text(step.get("outcome"))
    outcome = _OUTCOME_WORDS.get(raw, raw.replace("_", " "))
    detail = " ".join(as_text(step.get("detail")).split())
    line = f"• `{rule}` {escape_mrkdwn(outcome)}"
    if detail:
        line += f": {escape_mrkdwn(cut(detail, TRACE_DETAIL_MAX))}"
    return line


def vote_line(vote: VoteView) -> str:
    approve = vote.choice == "approve"
    emoji = ":white_check_mark:" if approve else ":x:"
    verb = "approved" if approve else "rejected"
    line = f"{emoji} {_person(vote.user_id, vote.user_name)} {verb} {date(aware(vote.created_at))}"
    silence = (vote.params or {}).get("silence") if approve else None
    if isinstance(silence, str) and silence:
        line += f" with a {escape_mrkdwn(cut(silence, 20))} silence"
    if vote.reason.strip():
        line += f": “{reason_text(vote.reason, VOTE_REASON_MAX)}”"
    return line


def votes_text(votes: Sequence[VoteView]) -> str:
    return join_within(
        [vote_line(vote) for vote in votes],
        head="*Votes*\n",
        sep="\n",
        limit=SECTION_TEXT_MAX,
        more=lambda n: f"… and {n} more votes",
    )
