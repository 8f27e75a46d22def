"""The generic connector: Standard Webhooks in (`POST /v1/events`), a signed callback out."""

from __future__ import annotations

from collections.abc import Mapping

from connectors.base import Delivery, FinalDecision, SyncReceipt
from connectors.errors import TerminalSyncError
from connectors.outbound import Outbound
from connectors.redaction import redact_url
from connectors.webhook import intake
from connectors.webhook.callback import callback_payload, deliver_callback
from connectors.webhook.signature import StandardWebhooks


class WebhookConnector:
    name = intake.NAME
    sync_kind = intake.SYNC_KIND

    def __init__(
        self,
        *,
        secret: str,
        tolerance_seconds: int,
        client: Outbound,
        timeout: float,
    ) -> None:
        self.verifier = StandardWebhooks(secret, tolerance_seconds=tolerance_seconds)
        self._secret = secret
        self._client = client
        self._timeout = timeout

    async def receive(self, *, body: bytes, headers: Mapping[str, str]) -> Delivery:
        return Delivery(events=[intake.receive(body, headers, verifier=self.verifier)])

    async def apply(self, *, decision: FinalDecision) -> SyncReceipt:
        url = decision.event.get("callback_url")
        if not url:
            raise TerminalSyncError(f"request {decision.request_id} has no callback_url")
        # Built from the request as stored now: a replay sends the decision as it stands.
        await deliver_callback(
            self._client,
            url=str(url),
            payload=callback_payload(decision),
            webhook_id=decision.idempotency_key,
            secret=self._secret,
            timeout=self._timeout,
        )
        return SyncReceipt(detail=f"delivered to {redact_url(str(url))}")
