"""The digest message: a channel's approvals at a glance, from `storage.digests.DigestStats`."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from slack_sdk.models.blocks import HeaderBlock

from bot.slack.blocks import aware, context, field, field_sections, section, span
from bot.slack.mrkdwn import cut, date
from storage.digests import DigestStats

_ORDER = ("approved", "rejected", "expired", "cancelled")


def _duration(seconds: float) -> str:
    return span(timedelta(seconds=seconds))


def digest_message(stats: DigestStats, *, now: datetime) -> tuple[str, list[dict[str, Any]]]:
    """(fallback text, blocks) for `chat.postMessage`."""
    decided_total = sum(stats.decided.values())
    decided = ", ".join(f"{stats.decided[s]} {s}" for s in _ORDER if stats.decided.get(s)) or "none"
    if stats.oldest is not None:
        waited = span(aware(now) - aware(stats.oldest.created_at))
        oldest = (
            # `field` escapes the value: the title cannot ping or link.
            f"{cut(stats.oldest.title, 150)} (`{stats.oldest.request_id}`), waiting {waited}"
        )
    else:
        oldest = "nothing waiting"
    rate = stats.auto_approve_rate
    fields = [
        field("Pending", str(stats.pending)),
        field("Oldest waiting", oldest),
        field("Expiring within 24h", str(stats.expiring_soon)),
        field(
            "SLA breached",
            f":rotating_light: {stats.sla_breached}" if stats.sla_breached else "0",
        ),
        field("Decided in the period", f"{decided_total} ({decided})"),
        field(
            "Median time to decision",
            _duration(stats.median_seconds_to_decision)
            if stats.median_seconds_to_decision is not None
            else "no decisions",
        ),
        field(
            "Auto-approved (all sources)",
            f"{rate:.0%} of {stats.events} events" if rate is not None else "no events",
        ),
        field(
            "Dead-lettered sync-backs",
            f":warning: {stats.dead_sync_backs} (`signoff replay`)"
            if stats.dead_sync_backs
            else "0",
        ),
    ]
    blocks = [
        HeaderBlock(text="Approvals digest"),
        section(f"Since {date(stats.since)} in <#{stats.channel}>"),
        *field_sections(fields),
        context("`/signoff pending` lists what is waiting here."),
    ]
    text = (
        f"Approvals digest: {stats.pending} pending, {stats.sla_breached} past SLA, "
        f"{decided_total} decided since {aware(stats.since):%Y-%m-%d %H:%M} UTC"
    )
    return text, [block.to_dict() for block in blocks]
