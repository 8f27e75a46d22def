"""The outbox handler that applies a final decision back to its source, for any connector."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from connectors.base import Connector, FinalDecision, SyncReceipt
from connectors.errors import TerminalSyncError
from storage.db import TransactionRunner
from storage.errors import NotFound
from storage.outbox import ClaimedJob
from storage.requests import read_decision, read_decisions


class SyncBack:
    """Runs `connector.apply` for one decided request. The decision is read when the job is
    claimed, so a replay sends the decision as it stands."""

    def __init__(self, runner: TransactionRunner, connector: Connector) -> None:
        # The runner, not an async session: on SQLite both reads are one hop to its thread
        # instead of a round trip through the event loop each.
        self._runner = runner
        self._connector = connector

    def prepare(self, session: Session, jobs: Sequence[ClaimedJob]) -> dict[str, FinalDecision]:
        """The decisions of a claimed batch, read in the claim's transaction: no hop of its
        own per job. (Jobs for a request whose decision is read twice read it themselves.)"""
        keys: dict[str, str] = {}
        for job in jobs:
            keys.setdefault(str(job.payload.get("request_id")), job.idempotency_key)
        decisions = read_decisions(session, keys)
        return {
            job.id: decision
            for job in jobs
            if (decision := decisions.get(str(job.payload.get("request_id")))) is not None
            and decision.idempotency_key == job.idempotency_key
        }

    async def __call__(self, *, job: ClaimedJob) -> SyncReceipt | None:
        if isinstance(job.prepared, FinalDecision):
            return await self._connector.apply(decision=job.prepared)
        request_id = str(job.payload["request_id"])
        try:
            decision = await self._runner.run(
                lambda session: read_decision(
                    session, request_id, idempotency_key=job.idempotency_key
                ),
                background=True,
                read_only=True,
            )
        except NotFound:
            raise TerminalSyncError(f"request {request_id} no longer exists") from None
        return await self._connector.apply(decision=decision)
