"""Every SQLite connection Signoff opens (the async engine's, a runner's on its database
thread or inline) is tuned the same: write-ahead log, commits synced to disk, foreign keys."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from storage.db import TransactionRunner, create_engine

FULL = 2  # what PRAGMA synchronous answers for FULL


def pragmas(session: Session) -> tuple[str, int, int]:
    return (
        session.execute(text("PRAGMA journal_mode")).scalar_one(),
        session.execute(text("PRAGMA synchronous")).scalar_one(),
        session.execute(text("PRAGMA foreign_keys")).scalar_one(),
    )


@pytest.mark.parametrize("inline", [False, True], ids=["database thread", "inline"])
async def test_every_connection_syncs_its_commits(tmp_path: Path, inline: bool) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'signoff.db'}")
    runner = TransactionRunner(engine, inline=inline)
    try:
        async with engine.connect() as conn:
            journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            synchronous = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
            foreign_keys = (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one()
        assert (journal, synchronous, foreign_keys) == ("wal", FULL, 1)
        assert await runner.run(pragmas) == ("wal", FULL, 1)
        assert await runner.run(pragmas, read_only=True) == ("wal", FULL, 1)
    finally:
        runner.close()
        await engine.dispose()
