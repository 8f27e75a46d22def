"""Group commit on the event loop: callers that arrive while a transaction is being written go
into the next one together, and each waits for its own result.

Votes (`storage.votes.VoteWriter`) and the outbox worker's outcomes (`bot.worker`) share this
mechanism; the intake has its own long-lived writer task (`storage.batcher`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")


class GroupCommit(Generic[ItemT, ResultT]):
    """`_submit` queues an item and waits for its result. One flush task at a time takes what
    is queued (at most `max_batch`, all when None) and hands it to `_write`, which settles
    every future of the batch. A lone item is written at once, without waiting for a timer.

    `linger_passes`: event-loop passes a batch waits for callers already being handled to
    join it, while the queue still grows (0: none). Under a steady load the callers of one
    batch are answered together and come back together; a few passes cost microseconds.
    """

    def __init__(self, *, max_batch: int | None = None, linger_passes: int = 0) -> None:
        self._max_batch = max_batch
        self._linger_passes = linger_passes
        self._pending: list[tuple[ItemT, asyncio.Future[ResultT]]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def _submit(self, item: ItemT) -> ResultT:
        future: asyncio.Future[ResultT] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _write(self, batch: list[tuple[ItemT, asyncio.Future[ResultT]]]) -> None:
        """Write the batch and settle each of its futures (`_succeed` or `_fail`)."""
        raise NotImplementedError

    @staticmethod
    def _succeed(
        batch: list[tuple[ItemT, asyncio.Future[ResultT]]], results: Sequence[ResultT]
    ) -> None:
        """Give each caller of the batch its own result (in the batch's order)."""
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[ItemT, asyncio.Future[ResultT]]], exc: BaseException) -> None:
        """Give every caller of the batch the error."""
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    async def _flush(self) -> None:
        while self._pending:
            await self._linger()
            size = len(self._pending) if self._max_batch is None else self._max_batch
            batch = self._pending[:size]
            del self._pending[:size]
            try:
                await self._write(batch)
            except Exception as exc:
                # A bug in a write must not leave its callers waiting forever, nor stop the
                # batches queued behind it: each caller gets the error.
                log.exception("a group commit of %d item(s) failed", len(batch))
                self._fail(batch, exc)

    async def _linger(self) -> None:
        size = -1
        for _ in range(self._linger_passes):
            if len(self._pending) == size or (
                self._max_batch is not None and len(self._pending) >= self._max_batch
            ):
                return
            size = len(self._pending)
            await asyncio.sleep(0)
