"""Anomaly baselines through the running service: learned at intake, persisted, scored before
the decision, learned once per delivery, and still there after a restart (both backends)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from sqlalchemy import select

from storage.models import AnomalyBaseline, EventRecord
from tests.integration.conftest import Running, running_app
from tests.integration.conftest import test_settings as settings_for
from tests.support import event_body, sign

POLICY = """
baselines:
  - source: payments
    kind: refund
    key: event.attributes.merchant
    value: event.attributes.amount
    min_samples: 10
rules:
  - name: usual-refunds
    when: event.kind == "refund" && event.anomaly.score < 3.0
    decide: auto_approve
default:
  decide: route
  route: {channel: C1, approvers: [{group: finance}]}
"""


async def refund(app: Running, merchant: str, amount: float, *, msg_id: str | None = None):
    body = event_body(attributes={"amount": amount, "merchant": merchant})
    response = await app.client.post("/v1/events", **_signed(body, msg_id))
    assert response.status == 202
    return await response.json()


def _signed(body: dict, msg_id: str | None) -> dict:
    raw, headers = sign(body, msg_id=msg_id)
    return {"data": raw, "headers": headers}


async def baseline(app: Running, merchant: str) -> AnomalyBaseline | None:
    async with app.services.sessions() as session:
        return await session.scalar(select(AnomalyBaseline).where(AnomalyBaseline.key == merchant))


async def test_unusual_amounts_for_a_merchant_go_to_people(db_url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    settings = settings_for(db_url, SIGNOFF_POLICY_PATH=str(policy))
    rng = random.Random(1)
    async with running_app(settings) as app:
        # Young baseline: no score yet, so even usual amounts are seen by a person.
        first = [await refund(app, "acme", rng.gauss(80, 4)) for _ in range(10)]
        assert {answer["decision"] for answer in first} == {"route"}
        # Concurrent deliveries share a batch: each is still learned exactly once.
        await asyncio.gather(*(refund(app, "acme", rng.gauss(80, 4)) for _ in range(30)))
        usual = await refund(app, "acme", 83)
        spike = await refund(app, "acme", 2500)
        # Another merchant has its own (empty) baseline: 2,500 there is not judged by acme's.
        other = await refund(app, "globex", 2500)
        learned = await baseline(app, "acme")
        async with app.services.sessions() as session:
            stored = await session.scalar(
                select(EventRecord.body).where(EventRecord.request_id == spike["request_id"])
            )

    assert usual["decision"] == "auto_approve"
    assert spike["decision"] == "route"
    assert other["decision"] == "route"
    assert learned is not None and learned.count == 42
    assert 75 < learned.mean < 86  # the spike was clamped before it was learned
    # What the approver's card and the audit see: the score and the baseline it came from.
    assert stored["anomaly"]["score"] > 10 and 75 < stored["anomaly"]["baseline"] < 86

    async with running_app(settings) as app:  # a restart: the baseline comes from the database
        after_restart = await refund(app, "acme", 81)
        again = await refund(app, "acme", 2600)
    assert after_restart["decision"] == "auto_approve"
    assert again["decision"] == "route"


async def test_a_repeated_delivery_is_learned_once(db_url: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    async with running_app(settings_for(db_url, SIGNOFF_POLICY_PATH=str(policy))) as app:
        body = event_body(attributes={"amount": 50, "merchant": "initech"})
        for _ in range(3):
            response = await app.client.post("/v1/events", **_signed(body, "msg_same"))
            assert response.status == 202
        learned = await baseline(app, "initech")
    assert learned is not None and learned.count == 1
