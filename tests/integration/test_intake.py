"""`POST /v1/events` through the running app: signatures, refusals, decisions, duplicates."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from sqlalchemy import func, select

from storage.models import AuditRecord, EventRecord, OutboxJob, Request
from tests.integration.conftest import Running
from tests.support import CallbackSink, event_body, sign


async def post(running: Running, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    response = await running.client.post("/v1/events", data=body, headers=headers)
    return response.status, await response.json()


async def count(running: Running, model: type) -> int:
    async with running.services.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


async def audit_kinds(running: Running) -> list[str]:
    async with running.services.sessions() as session:
        return list(await session.scalars(select(AuditRecord.kind).order_by(AuditRecord.seq)))


async def test_routed_event_is_pending_with_rule_and_trace(running: Running) -> None:
    status, answer = await post(running, *sign(event_body()))
    assert status == 202
    assert answer["decision"] == "route"
    assert answer["status"] == "pending"
    assert answer["rule"] == "big-refunds"
    assert answer["request_id"].startswith("r_")
    kinds = await audit_kinds(running)
    assert kinds == ["event.received", "decision.made"]


@pytest.mark.parametrize(
    ("attributes", "kind", "decision", "status", "rule"),
    [
        ({"amount": 120}, "refund", "auto_approve", "approved", "small-refunds"),
        (
            {"amount": 900, "merchant": "blocked"},
            "refund",
            "auto_reject",
            "rejected",
            "blocked-merchants",
        ),
        ({}, "heartbeat", "ignore", None, "noise"),
        ({}, "login", "route", "pending", "default"),
    ],
)
async def test_each_decision_kind(
    running: Running, attributes: dict, kind: str, decision: str, status: str | None, rule: str
) -> None:
    status_code, answer = await post(running, *sign(event_body(kind=kind, attributes=attributes)))
    assert status_code == 202
    assert (answer["decision"], answer["status"], answer["rule"]) == (decision, status, rule)
    assert (answer["request_id"] is None) == (decision == "ignore")


async def test_auto_approval_is_synced_back_signed(running: Running, sink: CallbackSink) -> None:
    body = event_body(attributes={"amount": 100}, callback_url=sink.url)
    _, answer = await post(running, *sign(body))
    await sink.wait_for(1)
    delivery = sink.deliveries[0]
    assert delivery.webhook_id == f"sync-{answer['request_id']}"
    assert delivery.body["request_id"] == answer["request_id"]
    assert delivery.body["status"] == "approved"
    assert delivery.body["subject"] == body["subject"]
    assert delivery.body["version"] == "1"
    assert delivery.body["decided_by"] == [
        {"id": "policy:small-refunds", "name": "policy rule small-refunds"}
    ]
    assert delivery.body["decided_at"]
    assert sink.refused_signatures == 0


async def test_same_webhook_id_gives_same_answer_and_creates_nothing(running: Running) -> None:
    raw, headers = sign(event_body())
    first = await post(running, raw, headers)
    again = await post(running, raw, headers)
    assert first == again
    assert await count(running, EventRecord) == 1
    assert await count(running, Request) == 1


async def test_concurrent_duplicates_make_one_request_each(running: Running) -> None:
    deliveries = [sign(event_body()) for _ in range(20)]
    # Every delivery three times, all at once.
    results = await asyncio.gather(*(post(running, *d) for d in deliveries * 3))
    assert all(status == 202 for status, _ in results)
    by_id: dict[str, set[str]] = {}
    for (_raw, headers), (_, answer) in zip(deliveries * 3, results, strict=True):
        by_id.setdefault(headers["webhook-id"], set()).add(answer["request_id"])
    assert all(len(ids) == 1 for ids in by_id.values())
    assert await count(running, EventRecord) == 20
    assert await count(running, Request) == 20


async def test_new_version_supersedes_pending_subject(running: Running) -> None:
    _, first = await post(running, *sign(event_body(subject="refund/re_1", version="1")))
    _, same = await post(running, *sign(event_body(subject="refund/re_1", version="1")))
    _, second = await post(running, *sign(event_body(subject="refund/re_1", version="2")))
    assert same["request_id"] == first["request_id"], "same content again is the same request"
    assert second["request_id"] != first["request_id"]
    async with running.services.sessions() as session:
        old = await session.get(Request, first["request_id"])
        new = await session.get(Request, second["request_id"])
    assert old is not None and new is not None
    assert (old.status, old.superseded_by) == ("cancelled", new.id)
    assert "version 2" in old.reason
    assert new.status == "pending"
    assert "request.superseded" in await audit_kinds(running)


async def test_versions_in_one_batch_leave_one_pending(running: Running) -> None:
    bodies = [event_body(subject="refund/re_9", version=str(v)) for v in range(1, 6)]
    await asyncio.gather(*(post(running, *sign(b)) for b in bodies))
    async with running.services.sessions() as session:
        statuses = list(
            await session.scalars(select(Request.status).where(Request.subject == "refund/re_9"))
        )
    assert statuses.count("pending") == 1
    assert statuses.count("cancelled") == 4


# --- refusals: the right status, nothing stored, the refusal audited ------------------------


async def assert_refused_and_audited(running: Running, reason: str) -> None:
    assert await count(running, EventRecord) == 0
    assert await count(running, Request) == 0
    assert await count(running, OutboxJob) == 0
    async with running.services.sessions() as session:
        records = list(await session.scalars(select(AuditRecord)))
    assert [r.kind for r in records] == ["event.refused"]
    assert records[0].data["reason"] == reason


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda raw, h: (raw, {k: v for k, v in h.items() if k != "webhook-signature"}), "missing"),
        (lambda raw, h: (raw + b" ", h), "no webhook-signature matches"),
        (lambda raw, h: (raw, {**h, "webhook-signature": "v1,AAAA"}), "no webhook-signature"),
        (lambda raw, h: (raw, {**h, "webhook-signature": "garbage"}), "no webhook-signature"),
        (lambda raw, h: (raw, {**h, "webhook-timestamp": "soon"}), "Unix time"),
    ],
)
async def test_bad_signature_is_401(running: Running, tamper, message: str) -> None:
    raw, headers = tamper(*sign(event_body()))
    status, answer = await post(running, raw, headers)
    assert status == 401
    assert message in answer["error"]
    await assert_refused_and_audited(running, "bad_signature")


async def test_stale_timestamp_is_401(running: Running) -> None:
    status, answer = await post(running, *sign(event_body(), timestamp=int(time.time()) - 3600))
    assert status == 401
    assert "too old" in answer["error"]
    await assert_refused_and_audited(running, "bad_signature")


async def test_future_timestamp_is_401(running: Running) -> None:
    status, answer = await post(running, *sign(event_body(), timestamp=int(time.time()) + 3600))
    assert status == 401
    assert "future" in answer["error"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (
            json.dumps({k: v for k, v in event_body().items() if k != "subject"}).encode(),
            "subject: Field required",
        ),
        (json.dumps(event_body(risk="apocalyptic")).encode(), "risk:"),
        (json.dumps(event_body(actor={"name": "no id"})).encode(), "actor.id"),
        (json.dumps(event_body(surprise=1)).encode(), "surprise: Extra inputs"),
        (json.dumps(event_body(occurred_at="2026-01-01T00:00:00")).encode(), "occurred_at"),
        (json.dumps(event_body(callback_url="ftp://x")).encode(), "callback_url"),
        (json.dumps(event_body(title="a\u0000b")).encode(), "U+0000"),
    ],
)
async def test_malformed_body_is_400_naming_the_field(
    running: Running, body: bytes, field: str
) -> None:
    status, answer = await post(running, *sign(body))
    assert status == 400
    assert field in answer["error"]
    await assert_refused_and_audited(running, "malformed")


async def test_oversized_body_is_413(running: Running) -> None:
    body = event_body(
        summary="x" * 4000, context=[{"label": f"l{i}", "value": "v" * 1000} for i in range(20)]
    )
    status, answer = await post(running, *sign(body))
    assert status == 413
    assert "limit" in answer["error"]
    await assert_refused_and_audited(running, "too_large")


async def test_refusal_audit_holds_no_secret_or_signature(running: Running) -> None:
    raw, headers = sign(event_body())
    headers["webhook-signature"] = "v1,c2VjcmV0LXNpZ25hdHVyZQ=="
    await post(running, raw, headers)
    async with running.services.sessions() as session:
        record = (await session.scalars(select(AuditRecord))).one()
    dumped = json.dumps(record.data)
    assert "c2VjcmV0LXNpZ25hdHVyZQ" not in dumped
    assert "whsec_" not in dumped
    assert record.data["delivery_id"] == headers["webhook-id"]


async def test_health_and_readiness(running: Running) -> None:
    assert (await running.client.get("/healthz")).status == 200
    ready = await running.client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"
