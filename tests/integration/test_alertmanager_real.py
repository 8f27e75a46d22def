"""The real Alertmanager (SIGNOFF_TEST_ALERTMANAGER) notifying the running service: an alert
becomes a card, a Slack "Silence…" vote approves it, the outbox creates the silence, and the
silence is read back from Alertmanager; a resolved alert cancels its request and its card says so.
"""

from __future__ import annotations

import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.operator import show_request_command
from bot.slack.cards import SILENCE_ACTION
from connectors.alertmanager.silences import SilencesAPI
from connectors.errors import TerminalSyncError
from connectors.outbound import Outbound
from storage.models import AuditRecord, OutboxJob, Request, Vote
from tests.alertmanager_support import real_alertmanager
from tests.integration.conftest import SlackRunning, slack_app
from tests.integration.test_slack_flow import card_posted, click, wait_until
from tests.slack_support import signed, view_submission
from tests.support import free_port

TOKEN = "test-am-token-0123456789"


async def request_for(env: SlackRunning, fingerprint_labels: dict[str, str]) -> Request:
    """The request Alertmanager's notification created for the alert with these labels."""
    found: list[Request] = []

    async def arrived() -> bool:
        async with env.services.sessions() as session:
            rows = await session.scalars(select(Request).where(Request.source == "alertmanager"))
            found[:] = [row for row in rows if fingerprint_labels["alertname"] in (row.title or "")]
        return bool(found)

    await wait_until(arrived, timeout=20)
    [request] = found
    return request


async def status_of(env: SlackRunning, request_id: str) -> str:
    async with env.services.sessions() as session:
        request = await session.get(Request, request_id)
    assert request is not None
    return request.status


async def test_silence_vote_in_slack_creates_the_silence_in_alertmanager(
    db_url: str, tmp_path: Path
) -> None:
    port = free_port()
    am_url = f"http://127.0.0.1:{port}"
    async with slack_app(db_url, ALERTMANAGER_URL=am_url, ALERTMANAGER_WEBHOOK_TOKEN=TOKEN) as env:
        hook = str(env.client.make_url("/hooks/alertmanager"))
        async with real_alertmanager(tmp_path, webhook_url=hook, token=TOKEN, port=port) as am:
            name = f"DiskFull{uuid.uuid4().hex[:6]}"
            labels = {"alertname": name, "instance": "db-1", "severity": "critical"}
            await am.push(
                [
                    {
                        "labels": labels,
                        "annotations": {
                            "summary": "disk 95% full",
                            "runbook_url": "https://runbooks.example/disk",
                        },
                        "generatorURL": "http://prometheus.example:9090/graph",
                    }
                ]
            )
            request = await request_for(env, labels)
            assert request.status == "pending" and request.kind == "alert"
            channel, ts = await card_posted(env, request.id)
            [card] = [m for m in env.slack.messages(channel) if m.ts == ts]
            card_text = json.dumps(card.blocks, ensure_ascii=False)
            assert "Silence…" in card_text and "runbooks.example" in card_text

            # UA1 (an approver under the default route) picks "Silence…", 1 hour, a reason.
            target = {"request_id": request.id, "version": request.version}
            assert await click(env, SILENCE_ACTION, target, "UA1", channel=channel, ts=ts) == 200
            [opened] = await env.slack.wait_for_calls("views.open")
            view = opened.params["view"]
            view = json.loads(view) if isinstance(view, str) else view
            body = view_submission(
                callback_id=view["callback_id"],
                metadata=view["private_metadata"],
                reason="disk cleanup is running",
                user="UA1",
                values={
                    "duration": {
                        "duration": {
                            "type": "static_select",
                            "selected_option": {
                                "text": {"type": "plain_text", "text": "1 hour"},
                                "value": "1h",
                            },
                        }
                    }
                },
            )
            before = datetime.now(UTC).replace(microsecond=0)
            answer = await env.client.post("/slack/events", data=body, headers=signed(body))
            assert answer.status == 200
            assert await status_of(env, request.id) == "approved"

            job: list[OutboxJob] = []

            async def synced() -> bool:
                async with env.services.sessions() as session:
                    job[:] = list(
                        await session.scalars(
                            select(OutboxJob).where(
                                OutboxJob.kind == "alertmanager.apply",
                                OutboxJob.request_id == request.id,
                            )
                        )
                    )
                return bool(job) and job[0].status in ("done", "dead")

            await wait_until(synced, timeout=20)
            assert job[0].status == "done", job[0].last_error
            assert job[0].result is not None  # the receipt's refs, shown by `requests show`
            silence_id = job[0].result["silence_id"]

            # Read it back from Alertmanager itself.
            [silence] = [s for s in await am.silences() if s["id"] == silence_id]
            assert silence["status"]["state"] == "active"
            assert sorted(silence["matchers"], key=lambda m: m["name"]) == [
                {"name": k, "value": v, "isRegex": False, "isEqual": True}
                for k, v in sorted(labels.items())
            ]
            assert silence["createdBy"] == "UA1"
            assert silence["comment"].startswith("disk cleanup is running")
            assert silence["comment"].endswith(f"[signoff:{job[0].idempotency_key}]")
            ends = datetime.fromisoformat(silence["endsAt"].replace("Z", "+00:00"))
            assert before + timedelta(hours=1) <= ends <= datetime.now(UTC) + timedelta(hours=1)
            # And Alertmanager applies it: the alert is now suppressed by that silence.
            [alert] = [a for a in await am.alerts() if a["labels"]["alertname"] == name]
            assert alert["status"]["silencedBy"] == [silence_id]

            async with env.services.sessions() as session:
                [vote] = list(await session.scalars(select(Vote)))
                cast = list(
                    await session.scalars(
                        select(AuditRecord).where(AuditRecord.kind == "vote.cast")
                    )
                )
            assert vote.params == {"silence": "1h"}
            assert cast[0].data["params"] == {"silence": "1h"}

            shown = io.StringIO()
            await show_request_command(env.services.sessions, request.id, as_json=False, out=shown)
            assert "UA1: approve, silence=1h (disk cleanup is running)" in shown.getvalue()
            assert f"alertmanager.apply done after 1 attempt(s), got silence_id={silence_id}" in (
                shown.getvalue()
            )


async def test_a_resolved_alert_cancels_its_request_and_the_card_says_so(
    sqlite_url: str, tmp_path: Path
) -> None:
    port = free_port()
    async with slack_app(
        sqlite_url, ALERTMANAGER_URL=f"http://127.0.0.1:{port}", ALERTMANAGER_WEBHOOK_TOKEN=TOKEN
    ) as env:
        hook = str(env.client.make_url("/hooks/alertmanager"))
        async with real_alertmanager(tmp_path, webhook_url=hook, token=TOKEN, port=port) as am:
            name = f"HighLatency{uuid.uuid4().hex[:6]}"
            labels = {"alertname": name, "service": "api", "severity": "warning"}
            await am.push([{"labels": labels, "annotations": {"summary": "p99 over 2s"}}])
            request = await request_for(env, labels)
            channel, ts = await card_posted(env, request.id)

            # Prometheus resolves an alert by sending it again with endsAt in the past.
            ended = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
            await am.push([{"labels": labels, "endsAt": ended}])

            async def cancelled() -> bool:
                return await status_of(env, request.id) == "cancelled"

            await wait_until(cancelled, timeout=20)

            async def card_updated() -> bool:
                [card] = [m for m in env.slack.messages(channel) if m.ts == ts]
                return "resolved" in json.dumps(card.blocks)

            await wait_until(card_updated, timeout=10)
            [card] = [m for m in env.slack.messages(channel) if m.ts == ts]
            text = json.dumps(card.blocks)
            assert "Cancelled" in text and "alert resolved at" in text
            assert "signoff_approve" not in text, "a cancelled card has no buttons"
            async with env.services.sessions() as session:
                stored = await session.get(Request, request.id)
            assert stored is not None and stored.reason.startswith("alert resolved at")


async def test_the_real_alertmanagers_refusals_read_clearly(tmp_path: Path) -> None:
    """The two refusal shapes, as the real binary sends them, through our client."""
    async with real_alertmanager(tmp_path, webhook_url="http://127.0.0.1:9/", token=TOKEN) as am:
        async with Outbound() as client:
            api = SilencesAPI(client, base_url=am.url, timeout=5)
            now = datetime.now(UTC).replace(microsecond=0)
            with pytest.raises(TerminalSyncError) as bad_range:
                await api.create(
                    labels={"a": "b"},
                    starts_at=now,
                    ends_at=now - timedelta(hours=1),
                    created_by="t",
                    comment="c",
                )
            with pytest.raises(TerminalSyncError) as no_matchers:
                await api.create(
                    labels={},
                    starts_at=now,
                    ends_at=now + timedelta(hours=1),
                    created_by="t",
                    comment="c",
                )
    assert str(bad_range.value) == (
        "Alertmanager refused the silence (HTTP 400):"
        " Failed to create silence: start time must be before end time"
    )
    assert str(no_matchers.value).startswith("Alertmanager refused the silence (HTTP 422): ")
    assert "matchers" in str(no_matchers.value) and "612" not in str(no_matchers.value)
