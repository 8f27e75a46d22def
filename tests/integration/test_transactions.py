"""The transaction runner on PostgreSQL: a transaction the database ends to break a deadlock
is run again, so the caller never sees a failure that a second run resolves."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from storage.db import TransactionRunner, create_engine
from tests.support import wait_for_a_lock_wait

pytestmark = pytest.mark.postgres


async def _deadlock(postgres_url: str) -> tuple[object, list[int]]:
    """Run a unit that locks rows 1 then 2 while another transaction holds 2 and then asks for
    1. The unit's side detects the deadlock (the other waits 10 s before it looks) and is
    ended by PostgreSQL. Returns what the runner gave back (or raised) and each run's rows."""
    engine = create_engine(postgres_url)
    runs: list[int] = []
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE t (id int PRIMARY KEY)"))
            await conn.execute(text("INSERT INTO t VALUES (1), (2)"))
        runner = TransactionRunner(engine)

        def work(session: Session) -> int:
            runs.append(len(runs) + 1)
            for row in (1, 2):
                session.execute(text("SELECT id FROM t WHERE id = :id FOR UPDATE"), {"id": row})
            return len(runs)

        async with engine.connect() as other, engine.connect() as watcher:
            # The unit's connection is made now, not while `other` holds its lock: a backend
            # starting up then did not always show in pg_stat_activity within the wait below.
            await runner.run(lambda session: session.execute(text("SELECT 1")))
            await other.execute(text("SET deadlock_timeout = '10s'"))
            await other.execute(text("SELECT id FROM t WHERE id = 2 FOR UPDATE"))
            unit = asyncio.create_task(runner.run(work))
            await wait_for_a_lock_wait(watcher)
            # Waits for row 1, which the unit holds: PostgreSQL ends the unit after ~1 s.
            await other.execute(text("SELECT id FROM t WHERE id = 1 FOR UPDATE"))
            await other.commit()
            try:
                result: object = await unit
            except DBAPIError as exc:
                result = exc
        runner.close()
        return result, runs
    finally:
        await engine.dispose()


async def test_a_deadlocked_transaction_is_run_again(postgres_url: str) -> None:
    result, runs = await _deadlock(postgres_url)
    assert runs == [1, 2], "the unit ran once: the deadlock was not retried"
    assert result == 2


async def test_other_database_errors_are_not_retried(postgres_url: str) -> None:
    """A unit that fails on its own (here: a table that does not exist) fails at once."""
    engine = create_engine(postgres_url)
    runner = TransactionRunner(engine)
    runs: list[int] = []

    def work(session: Session) -> None:
        runs.append(1)
        session.execute(text("SELECT id FROM no_such_table"))

    try:
        with pytest.raises(DBAPIError, match="no_such_table"):
            await runner.run(work)
        assert runs == [1]
    finally:
        runner.close()
        await engine.dispose()
