"""The modals a card opens: Details (the whole event and decision trace), the reject modal that
asks for a reason, and the silence modal (alerts) that asks for a duration and a reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from slack_sdk.models.blocks import (
    Block,
    HeaderBlock,
    InputBlock,
    MarkdownTextObject,
    Option,
    PlainTextInputElement,
    PlainTextObject,
    StaticSelectElement,
)
from slack_sdk.models.views import View

from bot.slack.blocks import (
    HEADER_MAX,
    MODAL_MAX_BLOCKS,
    MODAL_TITLE_MAX,
    SECTION_FIELDS_MAX,
    SECTION_TEXT_MAX,
    Facts,
    anomaly_text,
    as_text,
    context,
    field,
    field_sections,
    outcome_line,
    section,
    status_of,
    trace_line,
    votes_text,
)
from bot.slack.mrkdwn import chunks_mrkdwn, cut, escape_mrkdwn, join_within, link
from connectors.alertmanager.silences import DURATIONS
from storage.models import Request
from storage.requests import RequestView

__all__ = [
    "DURATION_ACTION",
    "DURATION_BLOCK",
    "REASON_ACTION",
    "REASON_BLOCK",
    "REJECT_CALLBACK",
    "SILENCE_CALLBACK",
    "build_details_modal",
    "build_reject_modal",
    "build_silence_modal",
]

REJECT_CALLBACK = "signoff_reject_reason"
REASON_BLOCK = "reason"
REASON_ACTION = "reason"
REASON_MIN = 3
REASON_MAX = 2000
SILENCE_CALLBACK = "signoff_silence_choice"
DURATION_BLOCK = "duration"
DURATION_ACTION = "duration"
# The default pick: long enough to fix most things, short enough not to forget the silence.
DEFAULT_DURATION = "4h"
_UNITS = {"h": "hour", "d": "day"}

MODAL_CONTEXT_SECTIONS = 25
MODAL_TITLE = "Signoff request"
MODAL_REJECT_TITLE = "Reject request"
MODAL_SILENCE_TITLE = "Approve and silence"


def build_details_modal(view: RequestView) -> dict[str, Any]:
    """A `views.open` view: the whole event (redacted) and the whole decision trace.

    Each part has its own share of the 100 blocks a modal may hold, so a huge attribute blob
    cannot push the trace or the context out; a part cut short says where the rest is.
    """
    facts = Facts.of(view)
    request = view.request
    status = status_of(request)
    show = f"`signoff requests show {escape_mrkdwn(request.id)}`"
    blocks: list[Block] = [
        HeaderBlock(text=PlainTextObject(text=cut(facts.title(request), HEADER_MAX)))
    ]
    blocks.append(section(outcome_line(request, status)))
    blocks.extend(field_sections(_overview_fields(request, facts)))
    actor = facts.mapping("actor")
    if actor:
        keys = ("name", "email", "id", "team")
        blocks.extend(field_sections([field(f"Actor {k}", as_text(actor.get(k))) for k in keys]))
    summary = facts.text("summary").strip()
    if summary:
        blocks.extend(_long_sections("*Summary*", escape_mrkdwn(summary), 5, show))
    blocks.extend(_long_sections("*Decision trace*", _full_trace(request, facts), 10, show))
    anomaly = anomaly_text(facts)
    if anomaly:
        blocks.append(section(anomaly))
    attributes = facts.mapping("attributes")
    if attributes:
        pretty = json.dumps(attributes, indent=2, ensure_ascii=False, default=str)
        blocks.extend(_long_sections("*Attributes*", escape_mrkdwn(pretty), 30, show, code=True))
    blocks.extend(_context_sections(facts, show))
    links = [
        link(as_text(item.get("url")), as_text(item.get("title"))) for item in facts.items("links")
    ]
    if links:
        blocks.append(
            section(
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
        blocks.append(section(votes_text(view.votes)))
    # Bounded by the shares above: 5 + 5 + 10 + 1 + 30 + 27 + 2 blocks at most.
    assert len(blocks) <= MODAL_MAX_BLOCKS
    modal = View(
        type="modal",
        title=PlainTextObject(text=cut(MODAL_TITLE, MODAL_TITLE_MAX)),
        close=PlainTextObject(text="Close"),
        blocks=blocks,
    )
    return modal.to_dict()


def _context_sections(facts: Facts, show: str) -> list[Block]:
    fields = [
        field(as_text(item.get("label")) or "(no label)", as_text(item.get("value")))
        for item in facts.items("context")
    ]
    if not fields:
        return []
    shown = MODAL_CONTEXT_SECTIONS * SECTION_FIELDS_MAX
    blocks: list[Block] = [section("*Context*"), *field_sections(fields[:shown])]
    if len(fields) > shown:
        blocks.append(context(f"{len(fields) - shown} more fields: {show} has them all."))
    return blocks


def _overview_fields(request: Request, facts: Facts) -> list[MarkdownTextObject]:
    fields = [
        field("Request", request.id),
        field("Status", request.status),
        field("Source", facts.text("source")),
        field("Kind", facts.text("kind")),
        field("Subject", facts.text("subject")),
        field("Version", facts.text("version")),
        field("Risk", facts.text("risk")),
        field("Occurred at", facts.text("occurred_at") or "not given"),
        field("Received at", facts.text("received_at")),
        field("Delivery id", facts.text("delivery_id")),
    ]
    callback = facts.text("callback_url")
    if callback:
        fields.append(field("Callback URL", callback))
    # `sync` is left out on purpose: it is connector-private data for the sync-back, not context
    # for an approver, and may hold source identifiers nobody needs to see.
    return fields


def _full_trace(request: Request, facts: Facts) -> str:
    decision = facts.decision
    rule = escape_mrkdwn(as_text(decision.get("rule")) or request.rule)
    kind = escape_mrkdwn(as_text(decision.get("kind")) or request.decision_kind)
    lines = [f"Rule `{rule}` decided {kind}."]
    lines.extend(
        trace_line(step) for step in decision.get("trace") or [] if isinstance(step, Mapping)
    )
    for item in decision.get("shadow") or []:
        if isinstance(item, Mapping):
            lines.append(
                f":ghost: shadow `{escape_mrkdwn(as_text(item.get('rule')))}`"
                f" would {escape_mrkdwn(as_text(item.get('decide')))} (not acted on)"
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
        blocks.append(section(text))
    return blocks


def _card_metadata(request: Request, *, channel: str, ts: str) -> str:
    """What a vote modal's submission carries: the request, the version shown and the card's
    message, so the vote is bound to what the approver saw and the card can be updated."""
    return json.dumps(
        {"r": request.id, "v": request.version, "c": channel, "ts": ts}, separators=(",", ":")
    )


def _reason_input(placeholder: str) -> InputBlock:
    return InputBlock(
        block_id=REASON_BLOCK,
        label=PlainTextObject(text="Reason"),
        element=PlainTextInputElement(
            action_id=REASON_ACTION,
            multiline=True,
            min_length=REASON_MIN,
            max_length=REASON_MAX,
            placeholder=PlainTextObject(text=placeholder),
        ),
        optional=False,
    )


def build_reject_modal(view: RequestView, *, channel: str, ts: str) -> dict[str, Any]:
    """Asks for the reason of a reject."""
    facts = Facts.of(view)
    request = view.request
    modal = View(
        type="modal",
        callback_id=REJECT_CALLBACK,
        title=PlainTextObject(text=cut(MODAL_REJECT_TITLE, MODAL_TITLE_MAX)),
        submit=PlainTextObject(text="Reject"),
        close=PlainTextObject(text="Cancel"),
        private_metadata=_card_metadata(request, channel=channel, ts=ts),
        blocks=[
            section(f"Reject *{escape_mrkdwn(cut(facts.title(request), 500))}*?"),
            _reason_input("Why is this rejected?"),
        ],
    )
    return modal.to_dict()


def _duration_label(key: str) -> str:
    """`4h` as "4 hours"."""
    count, unit = int(key[:-1]), _UNITS[key[-1]]
    return f"{count} {unit}{'s' if count != 1 else ''}"


def build_silence_modal(view: RequestView, *, channel: str, ts: str) -> dict[str, Any]:
    """Approve with a silence: how long, and why (the silence's comment in Alertmanager). The
    submission is an approve vote carrying the duration, bound to the version shown."""
    facts = Facts.of(view)
    request = view.request
    options = [
        Option(value=key, text=PlainTextObject(text=_duration_label(key))) for key in DURATIONS
    ]
    initial = next(option for option in options if option.value == DEFAULT_DURATION)
    modal = View(
        type="modal",
        callback_id=SILENCE_CALLBACK,
        title=PlainTextObject(text=cut(MODAL_SILENCE_TITLE, MODAL_TITLE_MAX)),
        submit=PlainTextObject(text="Approve"),
        close=PlainTextObject(text="Cancel"),
        private_metadata=_card_metadata(request, channel=channel, ts=ts),
        blocks=[
            section(
                f"Approve *{escape_mrkdwn(cut(facts.title(request), 500))}* and silence it in"
                " Alertmanager: a silence matching exactly this alert's labels, created once the"
                " request is approved. If approvers pick different durations, the shortest wins."
            ),
            InputBlock(
                block_id=DURATION_BLOCK,
                label=PlainTextObject(text="Silence for"),
                element=StaticSelectElement(
                    action_id=DURATION_ACTION, options=options, initial_option=initial
                ),
                optional=False,
            ),
            _reason_input("Why silence it? (kept as the comment)"),
        ],
    )
    return modal.to_dict()
