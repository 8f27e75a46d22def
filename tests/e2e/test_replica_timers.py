"""Three `signoff serve` replicas on one PostgreSQL database, each sweeping timers every 0.2 s:
every SLA reminder, escalation, expiry warning and expiry goes out once, not three times."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
from pathlib import Path

import httpx
import pytest

from bot.slack.standin import DEFAULT_TOKEN, SlackStandIn
from tests.conftest import fresh_postgres_database
from tests.e2e.conftest import Serve
from tests.slack_support import SIGNING_SECRET
from tests.support import SECRET, CallbackSink, event_body, free_port, sign

pytestmark = pytest.mark.postgres

POLICY = """
rules:
  - name: refunds
    when: event.kind == "refund"
    decide: route
    route:
      channel: C0FINANCE
      approvers: [{group: finance-leads, min: 1}]
      sla: 1s
      escalate:
        - after: 2s
          notify: [U0CFO]
      expires_after: 4s
      warn_before: 1s
default:
  decide: ignore
"""
REQUESTS = 6


async def test_three_replicas_send_each_notice_once(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    slack = SlackStandIn(
        channels={"C0FINANCE"},
        users={
            "UA1": {"name": "ana", "email": "ana@example.com"},
            "U0CFO": {"name": "cfo", "email": "cfo@example.com"},
        },
        usergroups={"S0FIN": ["UA1"]},
        usergroup_handles={"finance-leads": "S0FIN"},
    )
    sink = CallbackSink()
    await slack.start()
    await sink.start()
    replicas: list[Serve] = []
    try:
        async with fresh_postgres_database() as url:
            for index in range(3):
                port = free_port()
                env = {
                    **os.environ,
                    "SIGNOFF_DATABASE_URL": url,
                    "SIGNOFF_POLICY_PATH": str(policy),
                    "SIGNOFF_WEBHOOK_SECRET": SECRET,
                    "SIGNOFF_PORT": str(port),
                    "SIGNOFF_TIMER_INTERVAL": "0.2",
                    "SIGNOFF_OUTBOX_BACKOFF_BASE": "0.1",
                    "SIGNOFF_OUTBOX_BACKOFF_MAX": "0.3",
                    "SLACK_BOT_TOKEN": DEFAULT_TOKEN,
                    "SLACK_SIGNING_SECRET": SIGNING_SECRET,
                    "SLACK_API_URL": slack.url,
                }
                replica = Serve(env, port, tmp_path / f"replica{index}.log")
                await replica.start()
                replicas.append(replica)
            async with httpx.AsyncClient() as client:
                for n in range(REQUESTS):  # spread over the replicas
                    raw, headers = sign(event_body(callback_url=sink.url))
                    answer = await client.post(
                        f"{replicas[n % 3].url}/v1/events", content=raw, headers=headers
                    )
                    assert answer.status_code == 202
            # Expiry at 4 s; then let the sync-backs and last notices land.
            for _ in range(150):
                if len(sink.deliveries) >= REQUESTS:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # anything sent twice would arrive by now
    finally:
        for replica in replicas:
            if replica.process is not None:
                replica.stop(signal.SIGTERM)
        await sink.stop()
        await slack.stop()

    cards = [m for m in slack.messages("C0FINANCE") if m.thread_ts is None]
    assert len(cards) == REQUESTS
    notices = collections.Counter()
    for card in cards:
        for reply in slack.messages("C0FINANCE", thread_ts=card.ts):
            for word in ("SLA of 1s breached", "Escalation, level 1", "Expires"):
                if word in reply.text:
                    notices[(card.ts, word)] += 1
    assert len(notices) == 3 * REQUESTS and set(notices.values()) == {1}, notices
    cfo = slack.dm_channel("U0CFO")
    assert cfo is not None
    escalation_dms = [m for m in slack.messages(cfo) if "escalation level 1" in m.text]
    assert len(escalation_dms) == REQUESTS
    # One expiry per request, synced back once, as expired.
    assert sorted(d.body["status"] for d in sink.deliveries) == ["expired"] * REQUESTS
    assert len({d.webhook_id for d in sink.deliveries}) == REQUESTS
