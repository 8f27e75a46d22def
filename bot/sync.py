"""The outbox handler that applies a final decision back to its source, for any connector."""

from __future__ import annotations

from connectors.base import Connector, SyncReceipt
from connectors.errors import TerminalSyncError
from storage.db import TransactionRunner
from storage.errors import NotFound
from storage.outbox import ClaimedJob
from storage.requests import read_decision


class SyncBack:
    """Runs `connector.apply` for one decided request. The decision is read when the job runs,
    so a replay sends the decision as it stands."""

    def __init__(self, runner: TransactionRunner, connector: Connector) -> None:
        # The runner, not an async session: on SQLite both reads are one hop to its thread
        # instead of a round trip through the event loop each.
        self._runner = runner
        self._connector = connector

    async def __call__(self, *, job: ClaimedJob) -> SyncReceipt | None:
        request_id = str(job.payload["request_id"])
        try:
            decision = await self._runner.run(
                lambda session: read_decision(
                    session, request_id, idempotency_key=job.idempotency_key
                )
            )
        except NotFound:
            raise TerminalSyncError(f"request {request_id} no longer exists") from None
        return await self._connector.apply(decision=decision)
