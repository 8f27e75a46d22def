"""The Alertmanager connector: `POST /hooks/alertmanager` in; on approval, a silence and/or the
alert's remediation callback out."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from connectors.alertmanager import intake
from connectors.alertmanager.silences import DURATIONS, SilencesAPI, marker
from connectors.base import Delivery, FinalDecision, SyncReceipt
from connectors.errors import TerminalSyncError
from connectors.outbound import Outbound
from connectors.redaction import redact_url
from connectors.webhook.callback import callback_payload, deliver_callback

# The outbox job kind of the sync-back.
SYNC_KIND = "alertmanager.apply"
# Longest `createdBy` and comment we send: Alertmanager has no limit, its UI and amtool do.
CREATED_BY_MAX = 200
REASON_MAX = 1000


class AlertmanagerConnector:
    name = intake.NAME
    sync_kind = SYNC_KIND

    def __init__(
        self,
        *,
        client: Outbound,
        timeout: float,
        callback_secret: str,
        api_url: str | None = None,
        token: str | None = None,
    ) -> None:
        """`api_url`: Alertmanager's base URL; without it no silence can be created, so cards
        do not offer one. `token`: the bearer token deliveries must carry (None: none needed).
        `callback_secret`: signs the remediation callback (SIGNOFF_WEBHOOK_SECRET)."""
        self._client = client
        self._timeout = timeout
        self._secret = callback_secret
        self._token = token
        self._silences = SilencesAPI(client, base_url=api_url, timeout=timeout) if api_url else None

    async def receive(self, *, body: bytes, headers: Mapping[str, str]) -> Delivery:
        return intake.receive(body, headers, token=self._token, silences=self._silences is not None)

    async def apply(self, *, decision: FinalDecision) -> SyncReceipt:
        if decision.status != "approved":
            # A rejected, expired or cancelled alert leaves Alertmanager as it is: the alert
            # keeps notifying, which is what not approving a silence means.
            return SyncReceipt(detail=f"{decision.status}: nothing to send to Alertmanager")
        done: list[str] = []
        refs: dict[str, str] = {}
        picked = _picked_durations(decision)
        if picked:
            silence_id, ends = await self._silence(decision, picked)
            refs["silence_id"] = silence_id
            done.append(f"silence {silence_id} until {ends}")
        remediation = str(decision.sync.get("remediation_url") or "")
        if remediation:
            payload: dict[str, Any] = {
                **callback_payload(decision),
                "labels": _labels(decision),
                "silence_id": refs.get("silence_id"),
            }
            # Its own webhook-id, the same on every attempt: the receiver dedupes on it.
            await deliver_callback(
                self._client,
                url=remediation,
                payload=payload,
                webhook_id=f"{decision.idempotency_key}-remediation",
                secret=self._secret,
                timeout=self._timeout,
            )
            done.append(f"remediation called at {redact_url(remediation)}")
        if not done:
            return SyncReceipt(detail="approved without a silence: nothing to send")
        return SyncReceipt(detail="; ".join(done), refs=refs)

    async def _silence(self, decision: FinalDecision, picked: list[str]) -> tuple[str, str]:
        if self._silences is None:
            raise TerminalSyncError(
                "a silence was picked but ALERTMANAGER_URL is not set: set it and replay the job"
            )
        labels = _labels(decision)
        if not labels:
            raise TerminalSyncError(f"request {decision.request_id} has no labels to silence")
        existing = await self._silences.find(
            labels=labels, idempotency_key=decision.idempotency_key
        )
        if existing is not None:
            return existing.id, existing.ends_at or "(as created)"
        # Several approvers may have picked different durations: the shortest is what they all
        # agreed to.
        shortest = min(picked, key=lambda choice: DURATIONS[choice])
        now = datetime.now(UTC).replace(microsecond=0)
        ends = now + DURATIONS[shortest]
        silencers = [v for v in decision.votes if v.choice == "approve"]
        created_by = ", ".join(v.name or v.id for v in silencers)[:CREATED_BY_MAX]
        reasons = "; ".join(v.reason.strip() for v in silencers if v.reason.strip())
        comment = (
            f"{reasons[:REASON_MAX] or 'approved in Signoff'}"
            f" (Signoff request {decision.request_id}, {shortest}) "
            f"{marker(decision.idempotency_key)}"
        )
        silence_id = await self._silences.create(
            labels=labels,
            starts_at=now,
            ends_at=ends,
            created_by=created_by or "signoff",
            comment=comment,
        )
        return silence_id, ends.isoformat()


def _labels(decision: FinalDecision) -> dict[str, str]:
    labels = decision.sync.get("labels")
    if not isinstance(labels, Mapping):
        return {}
    return {str(name): str(value) for name, value in labels.items()}


def _picked_durations(decision: FinalDecision) -> list[str]:
    """The silence durations approving voters picked; an unknown one is a bug or tampering."""
    picked = []
    for vote in decision.votes:
        choice = vote.params.get("silence") if vote.choice == "approve" else None
        if choice is None:
            continue
        if choice not in DURATIONS:
            raise TerminalSyncError(f"vote by {vote.id} picked an unknown silence {choice!r}")
        picked.append(str(choice))
    return picked
