"""What `/signoff` answers, as ephemeral Block Kit messages: help, a request's status, lists of
pending requests, and short notes (replay results, refusals).

Same trust rules as the card (see `cards.py`): titles, reasons, trace details, error texts and
whatever the caller typed are escaped; ids from the policy are rendered as mentions. Every answer
stays within Slack's message limits by construction (asserted in `Answer.as_ack`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from slack_sdk.models.blocks import Block

from bot.slack.blocks import (
    MESSAGE_MAX_BLOCKS,
    SECTION_TEXT_MAX,
    Facts,
    as_text,
    aware,
    context,
    outcome_line,
    reason_text,
    section,
    span,
    status_of,
    trace_line,
    votes_text,
)
from bot.slack.cards import progress_line, still_needed
from bot.slack.mrkdwn import cut, cut_mrkdwn, date, escape_mrkdwn, join_within
from connectors.redaction import redact_text
from storage.models import JobStatus, RequestStatus
from storage.queries import PendingItem
from storage.requests import RequestView

__all__ = [
    "HELP_LINES",
    "LIST_MAX",
    "Answer",
    "help_answer",
    "list_answer",
    "note_answer",
    "sla_state",
    "status_answer",
]

# Ours: a list longer than this is read in the web UI or with `signoff requests list`.
LIST_MAX = 20
# Ours: enough to recognise a request in a list line; the whole title is in `status`.
LIST_TITLE_MAX = 120
TITLE_MAX = 500
ERROR_MAX = 500
# What the caller typed, echoed back in a complaint: enough to spot the typo.
ECHO_MAX = 60

HELP_LINES = (
    ("status ID", "a request's state, votes, what is still needed, the policy trace, sync-back"),
    ("pending", "open requests routed to this channel, oldest first"),
    ("mine", "open requests you may approve and have not voted on, in every channel"),
    ("replay ID", "operators: re-run a request's (or a job's) dead jobs, re-post a lost card"),
    ("help", "this list"),
)

_CHANNEL_ID = re.compile(r"^[CG][A-Z0-9]+$")


@dataclass(frozen=True)
class Answer:
    blocks: list[Block]
    # The notification / fallback text; mrkdwn-parsed like the blocks, so escaped like them.
    text: str

    def as_ack(self) -> dict[str, Any]:
        """Keyword arguments for Bolt's `ack()`: an answer only the caller sees."""
        assert len(self.blocks) <= MESSAGE_MAX_BLOCKS
        return {
            "response_type": "ephemeral",
            "text": self.text,
            "blocks": [block.to_dict() for block in self.blocks],
        }


def echo(typed: str) -> str:
    """Something the caller typed, safe to show back."""
    return escape_mrkdwn(cut(" ".join(typed.split()), ECHO_MAX))


def help_answer(problem: str = "") -> Answer:
    """The subcommands; `problem` (already escaped) says first what was wrong."""
    lines = [f"`/signoff {usage}`: {what}" for usage, what in HELP_LINES]
    blocks: list[Block] = []
    if problem:
        blocks.append(section(f":warning: {problem}. Nothing was changed."))
    blocks.append(section("*Signoff commands*\n" + "\n".join(lines)))
    blocks.append(context("Approve or reject on a request's card in its channel."))
    text = problem or "Signoff commands"
    return Answer(blocks=blocks, text=cut_mrkdwn(text, 300))


def note_answer(text: str) -> Answer:
    """A short answer; `text` is mrkdwn, already escaped."""
    return Answer(blocks=[section(text)], text=cut_mrkdwn(text, 300))


def sla_state(due: datetime | None, now: datetime) -> str:
    """On time, due in X, or breached X ago, from the request's stored SLA deadline."""
    if due is None:
        return "no SLA"
    due, now = aware(due), aware(now)
    if now <= due:
        return f":stopwatch: on time, due in {span(due - now)}"
    return f":rotating_light: *SLA breached* {span(now - due)} ago"


def _expiry(expires_at: datetime | None, now: datetime) -> str:
    if expires_at is None:
        return ""
    return f":hourglass: expires {date(aware(expires_at))} (in {span(aware(expires_at) - now)})"


def _channel(channel: str | None) -> str:
    if not channel:
        return ""
    # A channel id from the policy becomes a link to the channel; anything else stays text.
    return f"<#{channel}>" if _CHANNEL_ID.match(channel) else escape_mrkdwn(channel)


# --- status ----------------------------------------------------------------------------------


def status_answer(view: RequestView, *, now: datetime) -> Answer:
    facts = Facts.of(view)
    request = view.request
    status = status_of(request)
    title = facts.title(request)
    head = f"*{escape_mrkdwn(cut(title, TITLE_MAX))}*\n{outcome_line(request, status)}"
    if status.is_final and request.reason.strip():
        head += f"\n*Reason:* {reason_text(request.reason, 1000)}"
    blocks: list[Block] = [
        section(head),
        context(
            f"Request `{escape_mrkdwn(request.id)}`"
            f" · {escape_mrkdwn(cut(request.source, 64))}/{escape_mrkdwn(cut(request.kind, 64))}"
            f" · {escape_mrkdwn(cut(request.subject, 200))}"
            f" · version {escape_mrkdwn(cut(request.version, 40))}"
        ),
    ]
    if facts.route is not None:
        word = "Needs" if status is RequestStatus.pending else "Needed"
        needs = f"*{word}* {progress_line(facts.route, view.votes)}"
        if status is RequestStatus.pending:
            missing = still_needed(facts.route, view.votes)
            needs += f"\n*Still needed:* {missing}" if missing else ""
        if not view.votes:
            needs += "\n_No votes yet._"
        blocks.append(section(needs))
    if view.votes:
        blocks.append(section(votes_text(view.votes)))
    blocks.append(section(_trace_text(request.rule, facts.decision)))
    blocks.append(section(_jobs_text(view, status)))
    blocks.append(context(*_timing(view, status, now)))
    word = "Waiting for approval" if status is RequestStatus.pending else status.value
    text = f"{escape_mrkdwn(cut(title, 200))}: {word}"
    return Answer(blocks=blocks, text=cut_mrkdwn(text, 300))


def _trace_text(rule: str, decision: Mapping[str, Any]) -> str:
    """The whole trace, in order, as far as a section holds it."""
    kind = as_text(decision.get("kind"))
    lines = [f"*Policy trace* (rule `{escape_mrkdwn(as_text(decision.get('rule')) or rule)}`"]
    lines[0] += f" decided {escape_mrkdwn(kind)})" if kind else ")"
    lines.extend(
        trace_line(step) for step in decision.get("trace") or [] if isinstance(step, Mapping)
    )
    lines.extend(
        f":ghost: `{escape_mrkdwn(as_text(item.get('rule')))}` would"
        f" {escape_mrkdwn(as_text(item.get('decide')))} (shadow, not acted on)"
        for item in decision.get("shadow") or []
        if isinstance(item, Mapping)
    )
    if decision.get("failed_closed"):
        lines.append(":rotating_light: *Failed closed:* a condition errored before the winner.")
    return join_within(lines, sep="\n", limit=SECTION_TEXT_MAX, more=lambda n: f"… {n} more")


def _jobs_text(view: RequestView, status: RequestStatus) -> str:
    request = view.request
    lines = []
    for job in view.jobs:
        role = "sync-back" if job.kind == request.sync_kind else escape_mrkdwn(job.kind)
        line = f"• {role} `{escape_mrkdwn(job.id)}`: *{escape_mrkdwn(job.status)}*"
        line += f" after {job.attempts} attempt(s)"
        if job.result:
            got = ", ".join(f"{k}={v}" for k, v in sorted(job.result.items()))
            line += f", got {escape_mrkdwn(cut(got, 200))}"
        if job.last_error:
            error = " ".join(job.last_error.split())
            line += f"\n   last error: {escape_mrkdwn(cut(error, ERROR_MAX))}"
        if job.status == JobStatus.dead.value:
            line += f"\n   operators: `/signoff replay {escape_mrkdwn(job.id)}`"
        lines.append(line)
    if request.sync_kind is None:
        lines.append("_No sync-back: the source asked for no answer._")
    elif status is RequestStatus.pending:
        lines.append("_The sync-back is queued when the request is decided._")
    return join_within(
        lines,
        head="*Outbox jobs* (sync-back and Slack)\n" if view.jobs else "*Outbox jobs:* none\n",
        sep="\n",
        limit=SECTION_TEXT_MAX,
        more=lambda n: f"… and {n} more jobs (`signoff requests show`)",
    )


def _timing(view: RequestView, status: RequestStatus, now: datetime) -> list[str]:
    request = view.request
    parts = [f"Requested {date(aware(request.created_at))}"]
    if status is RequestStatus.pending:
        parts.append(sla_state(request.sla_due_at, now))
        expiry = _expiry(request.expires_at, now)
        if expiry:
            parts.append(expiry)
    elif request.decided_at is not None:
        parts.append(f"decided {date(aware(request.decided_at))}")
        if request.sla_due_at is not None and status in (
            RequestStatus.approved,
            RequestStatus.rejected,
        ):
            met = aware(request.decided_at) <= aware(request.sla_due_at)
            parts.append(":stopwatch: SLA met" if met else ":stopwatch: SLA missed")
    return parts


# --- lists -----------------------------------------------------------------------------------


def list_answer(
    heading: str,
    items: Sequence[PendingItem],
    *,
    total: int,
    now: datetime,
    empty: str,
    show_channel: bool = False,
) -> Answer:
    """`heading` (mrkdwn, escaped) and one section per request, at most LIST_MAX of them."""
    shown = list(items[:LIST_MAX])
    if not shown:
        return note_answer(f"{heading}\n{empty}")
    blocks: list[Block] = [section(f"{heading} ({total})")]
    blocks.extend(section(_item_line(item, now, show_channel)) for item in shown)
    more = total - len(shown)
    if more > 0:
        blocks.append(context(f"… and {more} more"))
    return Answer(blocks=blocks, text=cut_mrkdwn(f"{heading} ({total})", 300))


def _item_line(item: PendingItem, now: datetime, show_channel: bool) -> str:
    title = escape_mrkdwn(cut(redact_text(item.title) or "(untitled)", LIST_TITLE_MAX))
    parts = [f"`{escape_mrkdwn(item.id)}`"]
    if show_channel and item.channel:
        parts.append(_channel(item.channel))
    parts.append(f"{span(aware(now) - aware(item.created_at))} old")
    parts.append(sla_state(item.sla_due_at, now))
    expiry = _expiry(item.expires_at, now)
    if expiry:
        parts.append(expiry)
    return f"*{title}*\n" + " · ".join(parts)
