"""The outbox handler that applies a final decision back to its source, for any connector."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from connectors.base import Connector, SyncReceipt
from connectors.errors import TerminalSyncError
from storage.errors import NotFound
from storage.outbox import ClaimedJob
from storage.requests import get_decision


class SyncBack:
    """Runs `connector.apply` for one decided request. The decision is read when the job runs,
    so a replay sends the decision as it stands."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], connector: Connector) -> None:
        self._sessions = sessions
        self._connector = connector

    async def __call__(self, *, job: ClaimedJob) -> SyncReceipt | None:
        request_id = str(job.payload["request_id"])
        try:
            async with self._sessions() as session:
                decision = await get_decision(
                    session, request_id, idempotency_key=job.idempotency_key
                )
        except NotFound:
            raise TerminalSyncError(f"request {request_id} no longer exists") from None
        return await self._connector.apply(decision=decision)
