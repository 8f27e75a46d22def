"""Read-only sessions on SQLite: they neither take nor wait for the write lock."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from sqlalchemy import func, select

from storage.db import create_engine, reading, sessionmaker
from storage.models import OutboxJob
from storage.schema import ensure_schema


async def test_a_reading_session_reads_while_another_connection_holds_the_write_lock(
    sqlite_url: str, tmp_path: Path
) -> None:
    engine = create_engine(sqlite_url)
    await ensure_schema(engine)
    sessions = sessionmaker(engine)
    writer = sqlite3.connect(tmp_path / "signoff.db", isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # a writer mid-transaction (the intake's batch)
        # A session that began with the write lock would wait the 30 s busy timeout here.
        async with asyncio.timeout(5), reading(sessions) as session:
            count = await session.scalar(select(func.count()).select_from(OutboxJob))
        assert count == 0
        writer.execute("ROLLBACK")
        # Ordinary sessions still begin IMMEDIATE: a write lock held elsewhere makes them wait.
        writer.execute("BEGIN IMMEDIATE")

        async def plain_read() -> int | None:
            async with sessions() as session:
                return await session.scalar(select(func.count()).select_from(OutboxJob))

        waiting = asyncio.create_task(plain_read())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        writer.execute("ROLLBACK")
        async with asyncio.timeout(5):
            assert await waiting == 0
    finally:
        writer.close()
        await engine.dispose()
