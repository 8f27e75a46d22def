"""The group commit shared by votes and outbox outcomes (`storage.groupcommit`)."""

from __future__ import annotations

import asyncio

import pytest

from storage.groupcommit import GroupCommit


class Doubler(GroupCommit[int, int]):
    """Writes a batch by doubling each item; an item of -1 makes the whole write fail."""

    def __init__(self, **kw: int) -> None:
        super().__init__(**kw)
        self.batches: list[list[int]] = []

    async def submit(self, item: int) -> int:
        return await self._submit(item)

    async def _write(self, batch: list[tuple[int, asyncio.Future[int]]]) -> None:
        items = [item for item, _ in batch]
        self.batches.append(items)
        await asyncio.sleep(0.01)  # a commit: whatever arrives meanwhile waits for the next
        if -1 in items:
            raise ValueError("a bug in the write")
        for item, future in batch:
            future.set_result(item * 2)


async def test_callers_arriving_during_a_write_share_the_next_one() -> None:
    writer = Doubler()
    first = asyncio.create_task(writer.submit(1))
    await asyncio.sleep(0.001)  # the first write is under way
    rest = [asyncio.create_task(writer.submit(i)) for i in (2, 3, 4)]

    assert await asyncio.gather(first, *rest) == [2, 4, 6, 8]
    assert writer.batches == [[1], [2, 3, 4]]


async def test_max_batch_splits_and_lingering_gathers() -> None:
    writer = Doubler(max_batch=2, linger_passes=8)
    results = await asyncio.gather(*(writer.submit(i) for i in range(5)))

    assert results == [0, 2, 4, 6, 8]
    assert writer.batches == [[0, 1], [2, 3], [4]]


async def test_a_failing_write_fails_its_callers_and_not_the_next_batch() -> None:
    writer = Doubler()
    failing = asyncio.create_task(writer.submit(-1))
    await asyncio.sleep(0.001)
    later = asyncio.create_task(writer.submit(5))

    with pytest.raises(ValueError, match="a bug in the write"):
        await asyncio.wait_for(failing, timeout=1)
    assert await asyncio.wait_for(later, timeout=1) == 10
