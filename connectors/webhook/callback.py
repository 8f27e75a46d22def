"""The decision callback: a POST to the event's `callback_url`, signed per Standard Webhooks.

The far side verifies it exactly as Signoff verifies intake (`webhook-id`, `webhook-timestamp`,
`webhook-signature`). `webhook-id` is the outbox job's idempotency key, the same on every retry,
so a receiver that dedupes on it applies the decision once however often it is delivered. The
timestamp is fresh per attempt: receivers reject stale timestamps (five minutes by default in
the reference libraries), and a retry may come hours after the first attempt.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError

from connectors.errors import RetryableSyncError, TerminalSyncError
from connectors.redaction import redact_text, redact_url

# A receiver asking for more than an hour is treated as asking for an hour: the worker's own
# backoff and attempt budget still apply, and an operator can replay a dead job.
MAX_RETRY_AFTER = 3600.0
# Enough of an error body to say what went wrong; the rest is not read at all.
SNIPPET_BYTES = 300
USER_AGENT = "Signoff-Callback/1"


def callback_payload(request: Mapping[str, Any]) -> dict[str, Any]:
    """The callback body (DESIGN.md, "Wire formats") from a request as `RequestView.as_json()`
    gives it. Only the documented fields: votes, trace and routing stay inside Signoff."""
    return {
        "request_id": request["id"],
        "subject": request["subject"],
        "version": request["version"],
        "status": request["status"],
        "decided_by": [
            {"id": str(who.get("id", "")), "name": str(who.get("name", ""))}
            for who in request.get("decided_by") or []
        ],
        "reason": request.get("reason") or "",
        "decided_at": request.get("decided_at"),
    }


async def deliver_callback(
    client: httpx.AsyncClient,
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
    where = redact_url(url)
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
    try:
        # httpx's timeout bounds each phase (connect, each read...); a receiver trickling bytes
        # could stretch the whole exchange past it, so the total is bounded too.
        async with (
            asyncio.timeout(timeout),
            client.stream(
                "POST",
                url,
                content=body.encode(),
                headers=headers,
                timeout=timeout,
                follow_redirects=False,
            ) as response,
        ):
            status = response.status_code
            if 200 <= status < 300:
                return
            snippet = await _snippet(response)
            retry_after = _retry_after(response.headers.get("retry-after"), now=sent_at)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise RetryableSyncError(f"callback to {where} timed out after {timeout:g}s") from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise TerminalSyncError(
            f"callback URL {where} cannot be used: {_describe(exc, url, where)}"
        ) from exc
    except httpx.TransportError as exc:
        # Connection refused or reset, DNS failure, broken HTTP: the receiver may be back later.
        raise RetryableSyncError(
            f"callback to {where} failed: {type(exc).__name__}: {_describe(exc, url, where)}"
        ) from exc

    message = f"callback to {where} answered HTTP {status}" + (f": {snippet}" if snippet else "")
    # 429 and 503 may carry Retry-After (RFC 9110 §10.2.3); honour it on any 5xx that does.
    if status == 429 or status >= 500:
        raise RetryableSyncError(message, retry_after=retry_after)
    raise TerminalSyncError(message)


def _describe(exc: Exception, url: str, where: str) -> str:
    # httpx's own messages may quote the URL, query and all.
    return redact_text(str(exc).replace(url, where)[:400])[:200]


async def _snippet(response: httpx.Response) -> str:
    """The start of the body, one line, secrets masked; the rest is never downloaded."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= SNIPPET_BYTES:
            break
    text = head[:SNIPPET_BYTES].decode("utf-8", errors="replace")
    text = re.sub(r"\s+", " ", text).strip()
    if len(head) >= SNIPPET_BYTES:
        text += "…"
    return redact_text(text)


def _retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date), capped."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # unparseable: fall back to the worker's backoff
        if when.tzinfo is None:
            # RFC 9110 HTTP-dates are always GMT; email.utils leaves "-0000" zones naive.
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
