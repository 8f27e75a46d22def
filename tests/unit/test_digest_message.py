"""The digest message, golden: every number in its place, user text escaped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bot.slack.digest import digest_message
from storage.digests import DigestStats, Waiting
from tests.golden import assert_golden

UNTIL = datetime(2026, 11, 23, 9, tzinfo=UTC)
SINCE = UNTIL - timedelta(days=1)


def test_digest_message_golden() -> None:
    stats = DigestStats(
        channel="C0FIN",
        since=SINCE,
        until=UNTIL,
        pending=3,
        oldest=Waiting("r_old", "Refund <!channel> $4,200 to ACME", UNTIL - timedelta(hours=5)),
        expiring_soon=1,
        sla_breached=2,
        decided={"approved": 7, "rejected": 1, "expired": 1},
        auto_approved=30,
        events=40,
        median_seconds_to_decision=25 * 60,
        dead_sync_backs=1,
    )
    text, blocks = digest_message(stats, now=UNTIL)
    assert_golden("digest", {"text": text, "blocks": blocks})
    assert "<!channel>" not in str(blocks)  # the title is escaped
    assert "75% of 40 events" in str(blocks)
