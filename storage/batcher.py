"""Group commit: concurrent deliveries share one transaction.

One commit per delivery caps intake at what the disk's fsync (SQLite) or the database round trip
(PostgreSQL) allows, around 900 a second here. A single writer task instead takes everything
that queued up while the previous batch was committing and writes it in one transaction, so the
batch grows with the load and a lone request still commits at once, without waiting for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from storage import ledger
from storage.db import TransactionRunner
from storage.ledger import Cancel, CancelResult, Intake, IntakeResult, Refusal

log = logging.getLogger(__name__)

_LINGER_PASSES = 8

_Result = IntakeResult | CancelResult
_Item = tuple[Intake | Cancel | Refusal, "asyncio.Future[_Result | None]"]


class WriteBatcher:
    def __init__(
        self,
        runner: TransactionRunner,
        *,
        max_batch: int = 500,
        on_commit: Callable[[Sequence[_Result]], None] | None = None,
    ) -> None:
        self._runner = runner
        self._max_batch = max_batch
        self._on_commit = on_commit
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="signoff-write-batcher")

    async def stop(self) -> None:
        """Write what is queued, then stop. Nothing accepted is dropped."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def submit(self, item: Intake) -> IntakeResult:
        result = await self._enqueue(item)
        assert isinstance(result, IntakeResult)
        return result

    async def cancel(self, item: Cancel) -> CancelResult:
        result = await self._enqueue(item)
        assert isinstance(result, CancelResult)
        return result

    async def refuse(self, refusal: Refusal) -> None:
        await self._enqueue(refusal)

    async def _enqueue(self, item: Intake | Cancel | Refusal) -> _Result | None:
        if self._task is None:
            raise RuntimeError("WriteBatcher.start() was not called")
        future: asyncio.Future[_Result | None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await self._linger()
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _linger(self) -> None:
        """Let deliveries that are already being handled join this batch.

        Under a steady load the requests of one batch are answered together and come back
        together; without a pause the writer would take the first of them alone and leave the
        rest for the next commit. A few passes of the event loop (bounded by `_LINGER_PASSES`)
        cost microseconds when the queue stops growing, so a lone request still commits at once.
        """
        size = -1
        for _ in range(_LINGER_PASSES):
            if self._queue.qsize() == size:
                return
            size = self._queue.qsize()
            await asyncio.sleep(0)

    async def _write(self, batch: list[_Item]) -> None:
        intakes = [(item, fut) for item, fut in batch if not isinstance(item, Refusal)]
        refusals = [(item, fut) for item, fut in batch if isinstance(item, Refusal)]
        try:
            results = await ledger.record(
                self._runner, [i for i, _ in intakes], [r for r, _ in refusals]
            )
        except Exception as exc:
            # The writer must outlive a failed batch (database restarting, disk full): every
            # caller in the batch gets the error and answers 503; the next batch tries again.
            log.exception("writing a batch of %d deliveries failed", len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(intakes, results, strict=True):
            if not future.done():
                future.set_result(result)
        for _, future in refusals:
            if not future.done():
                future.set_result(None)
        if self._on_commit is not None:
            self._on_commit(results)
