"""Outbox job handlers that apply a decision back to its source."""

from __future__ import annotations

import httpx
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connectors.errors import TerminalSyncError
from connectors.webhook.callback import callback_payload, deliver_callback
from storage.errors import NotFound
from storage.outbox import ClaimedJob
from storage.requests import get_decision


class WebhookCallback:
    """`webhook.callback`: POST the decision to the event's `callback_url`, signed."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        client: httpx.AsyncClient,
        *,
        secret: str,
        timeout: float,
    ) -> None:
        self._sessions = sessions
        self._client = client
        self._secret = secret
        self._timeout = timeout

    async def __call__(self, *, job: ClaimedJob) -> None:
        request_id = str(job.payload["request_id"])
        try:
            async with self._sessions() as session:
                decision = await get_decision(session, request_id)
        except NotFound:
            raise TerminalSyncError(f"request {request_id} no longer exists") from None
        url = decision["event"].get("callback_url")
        if not url:
            raise TerminalSyncError(f"request {request_id} has no callback_url")
        # Built from the request as stored now: a replay sends the decision as it stands.
        await deliver_callback(
            self._client,
            url=url,
            payload=callback_payload(decision),
            webhook_id=job.idempotency_key,
            secret=self._secret,
            timeout=self._timeout,
        )
