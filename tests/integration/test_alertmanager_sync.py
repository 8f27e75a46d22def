"""The Alertmanager sync-back against a local API v2 stand-in and a real callback receiver:
silences (once, however often the job runs), both refusal shapes, retries, remediation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from connectors.alertmanager.connector import AlertmanagerConnector
from connectors.base import FinalDecision, Voter
from connectors.errors import RetryableSyncError, TerminalSyncError
from connectors.outbound import Outbound
from tests.alertmanager_support import AlertmanagerStandIn, Refusal
from tests.support import SECRET

LABELS = {"alertname": "DiskRunningFull", "dev": "sda1", "instance": 'ex"ample\\1'}
KEY = "sync-r_am0001"


@pytest.fixture
async def alertmanager() -> AsyncIterator[AlertmanagerStandIn]:
    standin = AlertmanagerStandIn()
    await standin.start()
    try:
        yield standin
    finally:
        await standin.stop()


@pytest.fixture
async def http() -> AsyncIterator[Outbound]:
    async with Outbound() as client:
        yield client


def connector(http: Outbound, api_url: str | None) -> AlertmanagerConnector:
    return AlertmanagerConnector(client=http, timeout=2, callback_secret=SECRET, api_url=api_url)


def decision(
    status: str = "approved", votes: list[Voter] | None = None, **sync: Any
) -> FinalDecision:
    return FinalDecision(
        request_id="r_am0001",
        subject="ed32a28c2fba30d5",
        version="2026-11-22T01:48:39.509722745Z",
        status=status,
        decided_by=[{"id": "UA1", "name": "ana"}],
        reason="ana: disk cleanup running",
        decided_at=datetime.now(UTC),
        event={"title": "DiskRunningFull", "sync": {"silence": True, "labels": LABELS, **sync}},
        votes=votes
        if votes is not None
        else [Voter("UA1", "ana", "approve", "disk cleanup running", {"silence": "4h"})],
        idempotency_key=KEY,
    )


async def test_a_silence_on_exactly_the_alerts_labels(alertmanager, http) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    receipt = await connector(http, alertmanager.url).apply(decision=decision())
    [silence] = alertmanager.silences
    assert receipt.refs == {"silence_id": silence["id"]}
    assert silence["matchers"] == [
        {"name": name, "value": value, "isRegex": False, "isEqual": True}
        for name, value in sorted(LABELS.items())
    ]
    assert silence["createdBy"] == "ana"
    assert silence["comment"].startswith("disk cleanup running")
    assert silence["comment"].endswith(f"[signoff:{KEY}]")
    starts = datetime.fromisoformat(silence["startsAt"])
    ends = datetime.fromisoformat(silence["endsAt"])
    assert before <= starts <= datetime.now(UTC)
    assert ends - starts == timedelta(hours=4)
    # The lookup before the POST filtered on every label, quotes and backslashes escaped.
    assert 'instance="ex\\"ample\\\\1"' in alertmanager.gets[0]


async def test_a_second_apply_with_the_same_key_reuses_the_silence(alertmanager, http) -> None:
    am = connector(http, alertmanager.url)
    first = await am.apply(decision=decision())
    again = await am.apply(decision=decision())
    assert alertmanager.posts == 1
    assert again.refs == first.refs


async def test_the_shortest_picked_duration_wins_and_all_approvers_sign(alertmanager, http) -> None:
    votes = [
        Voter("UA1", "ana", "approve", "cleanup", {"silence": "24h"}),
        Voter("UA2", "bo", "approve", "agreed", {"silence": "1h"}),
        Voter("UA3", "cy", "approve", "", {}),
    ]
    await connector(http, alertmanager.url).apply(decision=decision(votes=votes))
    [silence] = alertmanager.silences
    span = datetime.fromisoformat(silence["endsAt"]) - datetime.fromisoformat(silence["startsAt"])
    assert span == timedelta(hours=1)
    assert silence["createdBy"] == "ana, bo, cy"
    assert silence["comment"].startswith("cleanup; agreed")


async def test_approved_without_a_silence_sends_nothing(alertmanager, http) -> None:
    votes = [Voter("UA1", "ana", "approve", "", {})]
    receipt = await connector(http, alertmanager.url).apply(decision=decision(votes=votes))
    assert "without a silence" in receipt.detail and receipt.refs == {}
    assert alertmanager.posts == 0 and alertmanager.gets == []


@pytest.mark.parametrize("status", ["rejected", "expired", "cancelled"])
async def test_other_outcomes_send_nothing(alertmanager, http, status: str) -> None:
    receipt = await connector(http, alertmanager.url).apply(decision=decision(status))
    assert receipt.detail == f"{status}: nothing to send to Alertmanager"
    assert alertmanager.posts == 0 and alertmanager.gets == []


async def test_422_json_refusal_is_terminal_with_its_message(alertmanager, http) -> None:
    alertmanager.refuse["GET"] = [
        Refusal(422, '{"code":612,"message":"matchers in body should have at least 1 items"}')
    ]
    with pytest.raises(TerminalSyncError) as refused:
        await connector(http, alertmanager.url).apply(decision=decision())
    assert str(refused.value) == (
        "Alertmanager refused the silences query (HTTP 422):"
        " matchers in body should have at least 1 items"
    )


async def test_400_bare_string_refusal_is_terminal_with_its_message(alertmanager, http) -> None:
    alertmanager.refuse["POST"] = [
        Refusal(400, '"Failed to create silence: start time must be before end time"')
    ]
    with pytest.raises(TerminalSyncError) as refused:
        await connector(http, alertmanager.url).apply(decision=decision())
    assert str(refused.value) == (
        "Alertmanager refused the silence (HTTP 400):"
        " Failed to create silence: start time must be before end time"
    )


async def test_5xx_is_retried_then_succeeds_once(alertmanager, http) -> None:
    am = connector(http, alertmanager.url)
    alertmanager.refuse["POST"] = [Refusal(503, "unavailable", "text/plain")]
    with pytest.raises(RetryableSyncError, match="HTTP 503"):
        await am.apply(decision=decision())
    receipt = await am.apply(decision=decision())
    assert alertmanager.posts == 1 and receipt.refs["silence_id"]


async def test_unreachable_alertmanager_is_retryable(http) -> None:
    with pytest.raises(RetryableSyncError):
        await connector(http, "http://127.0.0.1:9").apply(decision=decision())


async def test_a_silence_without_alertmanager_url_is_terminal_and_says_so(http) -> None:
    with pytest.raises(TerminalSyncError, match="ALERTMANAGER_URL is not set"):
        await connector(http, None).apply(decision=decision())


async def test_an_unknown_duration_is_refused(alertmanager, http) -> None:
    votes = [Voter("UA1", "ana", "approve", "", {"silence": "10y"})]
    with pytest.raises(TerminalSyncError, match="unknown silence '10y'"):
        await connector(http, alertmanager.url).apply(decision=decision(votes=votes))
    assert alertmanager.posts == 0


async def test_remediation_is_a_signed_callback_after_the_silence(alertmanager, http, sink) -> None:
    am = connector(http, alertmanager.url)
    receipt = await am.apply(decision=decision(remediation_url=sink.url))
    await am.apply(decision=decision(remediation_url=sink.url))  # a retry of the same job
    [silence] = alertmanager.silences
    assert sink.refused_signatures == 0
    by_id = sink.unique_deliveries()
    assert list(by_id) == [f"{KEY}-remediation"], "the same webhook-id on every attempt"
    body = by_id[f"{KEY}-remediation"][0].body
    assert body["status"] == "approved" and body["request_id"] == "r_am0001"
    assert body["labels"] == LABELS and body["silence_id"] == silence["id"]
    assert "remediation called at http://127.0.0.1" in receipt.detail


async def test_remediation_alone_needs_no_alertmanager_url(http, sink) -> None:
    votes = [Voter("UA1", "ana", "approve", "go", {})]
    receipt = await connector(http, None).apply(
        decision=decision(votes=votes, remediation_url=sink.url)
    )
    assert len(sink.deliveries) == 1 and receipt.refs == {}
