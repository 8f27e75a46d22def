"""The decision callback: a POST to the event's `callback_url`, signed per Standard Webhooks.

The far side verifies it exactly as Signoff verifies intake (`webhook-id`, `webhook-timestamp`,
`webhook-signature`). `webhook-id` is the outbox job's idempotency key, the same on every retry,
so a receiver that dedupes on it applies the decision once however often it is delivered. The
timestamp is fresh per attempt: receivers reject stale timestamps (five minutes by default in
the reference libraries), and a retry may come hours after the first attempt.
"""

from __future__ import annotations

import binascii
import json
import math
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from connectors.base import FinalDecision
from connectors.errors import TerminalSyncError
from connectors.outbound import Outbound, send

USER_AGENT = "Signoff-Callback/1"


def callback_payload(decision: FinalDecision) -> dict[str, Any]:
    """The callback body (DESIGN.md, "Wire formats"). Only the documented fields: votes,
    trace and routing stay inside Signoff."""
    return {
        "request_id": decision.request_id,
        "subject": decision.subject,
        "version": decision.version,
        "status": decision.status,
        "decided_by": [
            {"id": str(who.get("id", "")), "name": str(who.get("name", ""))}
            for who in decision.decided_by
        ],
        "reason": decision.reason,
        "decided_at": decision.decided_at.isoformat() if decision.decided_at else None,
    }


async def deliver_callback(
    client: Outbound,
    *,
    url: str,
    payload: dict[str, Any],
    webhook_id: str,
    secret: str,
    timeout: float,
) -> None:
    """POST `payload` to `url`; return on 2xx, otherwise raise a SyncBackError subclass.

    RetryableSyncError: timeout, connection failure, 429 (with the receiver's Retry-After), 5xx.
    TerminalSyncError: any other answer (3xx is not followed: a callback URL should not move),
    and a URL or secret that can never work.
    """
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    sent_at = datetime.now(UTC)
    try:
        signature = Webhook(secret).sign(webhook_id, sent_at, body)
    except (binascii.Error, ValueError, EmptyWebhookSecretError):
        # Never echo the secret; fixing it and replaying the job is the operator's move.
        raise TerminalSyncError("the callback signing secret is empty or not base64") from None
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(math.floor(sent_at.timestamp())),
        "webhook-signature": signature,
    }
    await send(
        client,
        "POST",
        url,
        what="callback",
        timeout=timeout,
        content=body.encode(),
        headers=headers,
    )
