"""Alertmanager webhooks: real 0.25 deliveries in, Events and Cancellations out; every refusal."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from connectors.alertmanager.connector import AlertmanagerConnector
from connectors.alertmanager.intake import REMEDIATION_ANNOTATION, check_token, receive
from connectors.base import Delivery
from connectors.errors import MalformedPayload, SignatureError
from tests.unit.test_cards import assert_golden

FIXTURES = Path(__file__).resolve().parents[2] / "connectors" / "alertmanager" / "fixtures"
TOKEN = "test-am-token-0123456789"


def raw(name: str) -> bytes:
    return (FIXTURES / f"{name}.json").read_bytes()


def payload(name: str = "firing") -> dict[str, Any]:
    return dict(json.loads(raw(name)))


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def as_golden(delivery: Delivery) -> dict[str, Any]:
    """The delivery minus the moment it was received."""
    return {
        "events": [
            event.model_dump(mode="json", exclude={"received_at"}) for event in delivery.events
        ],
        "cancellations": [vars(item) for item in delivery.cancellations],
    }


def test_golden_firing() -> None:
    delivery = receive(raw("firing"), {}, token=None, silences=True)
    assert_golden("alertmanager_firing", as_golden(delivery))
    first, second = delivery.events
    # One event per alert, each identified by its own fingerprint and occurrence.
    assert (first.subject, second.subject) == ("ed32a28c2fba30d5", "fdbf71dda2355fbe")
    assert first.delivery_id == "alertmanager:ed32a28c2fba30d5:2026-11-22T01:48:39.509722745Z"
    assert first.version == "2026-11-22T01:48:39.509722745Z"
    assert first.title == "DiskRunningFull: please check the instance example1"
    assert first.risk.value == "critical"
    assert first.attributes["labels"]["dev"] == "sda1"
    assert first.sync == {"silence": True, "labels": first.attributes["labels"]}
    assert [link.title for link in first.links] == ["Source", "Alertmanager"]
    assert [link.title for link in second.links] == ["Alertmanager"]  # empty generatorURL
    assert not delivery.cancellations


def test_golden_resolved_in_a_firing_group() -> None:
    headers = dict(
        line.split(": ", 1)
        for line in (FIXTURES / "resolved.headers.txt").read_text().splitlines()
        if ": " in line
    )
    delivery = receive(raw("resolved"), headers, token=TOKEN, silences=True)
    assert_golden("alertmanager_resolved", as_golden(delivery))
    # The group says `firing`; its first alert has resolved: it cancels, the other still fires.
    [cancelled] = delivery.cancellations
    assert cancelled.subject == "ed32a28c2fba30d5"
    assert cancelled.reason == "alert resolved at 2026-11-22 04:15:48 UTC"
    assert [event.subject for event in delivery.events] == ["fdbf71dda2355fbe"]


def test_repeat_notification_has_the_same_delivery_ids() -> None:
    first = receive(raw("firing"), {}, token=None, silences=True)
    again = receive(raw("firing"), {}, token=None, silences=True)
    assert [e.delivery_id for e in first.events] == [e.delivery_id for e in again.events]


def test_without_an_alertmanager_url_nothing_offers_a_silence() -> None:
    delivery = receive(raw("firing"), {}, token=None, silences=False)
    assert all(event.sync == {} for event in delivery.events)


def test_unknown_fields_from_newer_alertmanagers_are_accepted() -> None:
    body = payload()
    body["someFutureField"] = {"x": 1}
    body["alerts"][0]["silencedBy"] = ["abc"]
    body["alerts"][0]["annotations"]["runbook_url"] = "https://runbooks.example/disk"
    delivery = receive(encode(body), {}, token=None, silences=True)
    assert len(delivery.events) == 2
    links = {link.title: str(link.url) for link in delivery.events[0].links}
    assert links["runbook_url"] == "https://runbooks.example/disk"


def test_remediation_annotation_goes_to_sync_not_to_the_card() -> None:
    body = payload()
    annotations = body["alerts"][0]["annotations"]
    annotations[REMEDIATION_ANNOTATION] = "https://remediate.example/disk?sda1"
    annotations["dashboard"] = "javascript:alert(1)"
    event = receive(encode(body), {}, token=None, silences=True).events[0]
    assert event.sync["remediation_url"] == "https://remediate.example/disk?sda1"
    assert event.sync["labels"]["dev"] == "sda1"
    without_url = receive(encode(body), {}, token=None, silences=False).events[0]
    assert without_url.sync == {
        "remediation_url": "https://remediate.example/disk?sda1",
        "labels": event.sync["labels"],
    }
    shown = json.dumps(event.model_dump(mode="json", exclude={"sync"}))
    assert "remediate.example" not in shown, "only the sync-back sees it (it may hold a token)"
    assert "javascript" in json.dumps(event.attributes)  # kept as data for policies
    assert all(str(link.url).startswith("http") for link in event.links)  # never a link


def test_long_annotations_are_cut_not_refused() -> None:
    body = payload()
    body["alerts"][0]["annotations"]["details"] = "x" * 4000
    event = receive(encode(body), {}, token=None, silences=True).events[0]
    [details] = [field for field in event.context if field.label == "details"]
    assert len(details.value) == 2000


@pytest.mark.parametrize(
    ("severity", "risk"),
    [("critical", "critical"), ("warning", "medium"), ("info", "low"), ("", "medium")],
)
def test_risk_from_severity(severity: str, risk: str) -> None:
    body = payload()
    body["alerts"][0]["labels"]["severity"] = severity
    assert receive(encode(body), {}, token=None, silences=True).events[0].risk.value == risk


def test_no_alerts_is_acknowledged_and_ignored() -> None:
    body = payload()
    body["alerts"] = []
    delivery = receive(encode(body), {}, token=None, silences=True)
    assert delivery.ignored and not delivery.events


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(version="5"), "version: only Alertmanager webhook version 4"),
        (lambda b: b.pop("version"), "version: only Alertmanager webhook version 4"),
        (lambda b: b.update(version=4), "got 4"),
        (lambda b: b.pop("alerts"), "alerts: Field required"),
        (lambda b: b["alerts"][0].update(status="pending"), "alerts.0.status"),
        (lambda b: b["alerts"][0].pop("fingerprint"), "alerts.0.fingerprint"),
        (lambda b: b["alerts"][0].update(startsAt="yesterday"), "startsAt"),
        (lambda b: b["alerts"][0]["labels"].update(x="a\x00b"), "U\\+0000"),
        (lambda b: b["alerts"][0]["labels"].update(x="a" * 5000), "alerts.0.labels.x"),
    ],
)
def test_malformed_names_the_field(change: Any, message: str) -> None:
    body = copy.deepcopy(payload())
    change(body)
    with pytest.raises(MalformedPayload, match=message):
        receive(encode(body), {}, token=None, silences=True)


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'"4"'])
def test_not_an_object(body: bytes) -> None:
    with pytest.raises(MalformedPayload):
        receive(body, {}, token=None, silences=True)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing Authorization"),
        ({"Authorization": f"Basic {TOKEN}"}, "not a Bearer token"),
        ({"Authorization": "Bearer"}, "not a Bearer token"),
        ({"Authorization": "Bearer wrong-token-0123456789"}, "wrong bearer token"),
        ({"Authorization": f"Bearer {TOKEN}x"}, "wrong bearer token"),
    ],
)
def test_token_refusals(headers: dict[str, str], message: str) -> None:
    with pytest.raises(SignatureError, match=message) as refused:
        check_token(headers, TOKEN)
    assert TOKEN not in str(refused.value)


def test_token_is_checked_before_the_body_is_read() -> None:
    with pytest.raises(SignatureError):
        receive(b"not json at all", {"Authorization": "Bearer nope"}, token=TOKEN, silences=True)


def test_right_token_and_no_token_configured_are_accepted() -> None:
    check_token({"Authorization": f"Bearer {TOKEN}"}, TOKEN)
    check_token({"Authorization": f"bearer {TOKEN}"}, TOKEN)  # the scheme is case-insensitive
    check_token({}, None)


async def test_connector_receive_uses_its_settings() -> None:
    from connectors.outbound import Outbound

    async with Outbound() as client:
        connector = AlertmanagerConnector(
            client=client, timeout=1, callback_secret="whsec_x", token=TOKEN
        )
        with pytest.raises(SignatureError):
            await connector.receive(body=raw("firing"), headers={})
        delivery = await connector.receive(
            body=raw("firing"), headers={"Authorization": f"Bearer {TOKEN}"}
        )
    # No api_url: no silence offered.
    assert [event.sync for event in delivery.events] == [{}, {}]
