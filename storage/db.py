"""Engines and sessions. SQLite is tuned for one busy process; PostgreSQL for several replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import event, orm
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry

from storage.writer_thread import WriterThread

try:
    import fcntl
except ImportError:  # Windows: SQLite's own busy handler is the only wait there
    fcntl = None  # type: ignore[assignment]

T = TypeVar("T")

log = logging.getLogger(__name__)

# PostgreSQL ends one of two transactions that wait for each other's row locks (a deadlock;
# also a serialization failure), and rolls it back whole: running it again is the remedy.
# Transactions here take their locks in one order (requests by id, then the audit head), but a
# row lock can still be taken in an order no one chose (an UPDATE of rows another replica's
# batch also updates), so the runner does not rely on that alone.
_RETRY_SQLSTATES = frozenset({"40P01", "40001"})
_ATTEMPTS = 4


def json_serializer(value: Any) -> str:
    """JSON columns' serializer: orjson (several times faster on the intake's hot path), with
    the standard library for what orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and `BEGIN IMMEDIATE` transactions."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(
            parsed,
            echo=echo,
            # A few connections: readers proceed under WAL while one writer holds the lock.
            pool_size=4,
            max_overflow=4,
            connect_args={"timeout": 30},
            json_serializer=json_serializer,
        )
        _tune_sqlite(engine)
        return engine
    return create_async_engine(
        parsed,
        echo=echo,
        pool_size=10,
        max_overflow=10,
        pool_pre_ping=True,
        json_serializer=json_serializer,
    )


def _tune_sqlite(engine: AsyncEngine | Engine, *, auto_checkpoint: bool = True) -> None:
    """WAL, durability, foreign keys, transaction start. Without `auto_checkpoint`, commits
    leave the log to a `Checkpointer`."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine

    @event.listens_for(sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take over transaction control from the driver (it would otherwise BEGIN lazily and
        # late), so that the "begin" hook below decides how transactions start.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # FULL: every commit reaches the disk before it returns, so a 202 or an acked vote
        # survives a power loss or an OS crash too (NORMAL would keep it only across a crash
        # of the process). Group commit makes that one fsync per batch: measured ~20% fewer
        # events/s than NORMAL here.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        if not auto_checkpoint:
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front. A deferred transaction that reads first and
        # writes later can fail with SQLITE_BUSY on upgrade even with a busy timeout. Sessions
        # that only read (`reading`) begin deferred: under WAL they neither take nor wait for
        # the write lock, so they never queue behind (or hold up) the writers.
        read_only = conn.get_execution_options().get(_READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


# Execution option marking a session's transaction as read-only (see `reading`).
_READ_ONLY = "signoff_read_only"


@contextlib.asynccontextmanager
async def reading(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session for reads only. On SQLite its transaction begins deferred instead of taking
    the write lock (as every other transaction here does), so reads that answer a request (long
    polls, `/metrics`, baseline lookups) do not queue behind the writers. A write in it is a
    bug: under contention SQLite refuses the upgrade with SQLITE_BUSY. PostgreSQL ignores the
    mark."""
    async with sessions() as session:
        await session.connection(execution_options={_READ_ONLY: True})
        yield session


class WriterLock:
    """An exclusive lock on a file beside an SQLite database (`<database>-writer.lock`), held
    by a process's database thread around each of its write transactions.

    SQLite lets one connection write at a time, and one that finds the database locked sleeps
    in its busy handler (1, 2, 5, 10... ms a try) whether or not the lock comes free meanwhile.
    With the outbox worker in a process of its own (`SIGNOFF_WORKER_PROCESSES`), the two
    processes' writes would meet there: measured, click acks then had a p99 of 200-500 ms. A
    writer waiting for `flock` instead wakes as soon as the holder lets go, and in the kernel,
    without the GIL. Readers take no lock (WAL). Where there is no `fcntl` (Windows), or no
    file (an in-memory database), there is nothing to take: the busy handler is left to wait.
    """

    def __init__(self, database: str | None) -> None:
        self._path = (
            Path(f"{database}-writer.lock")
            if fcntl is not None and database and database != ":memory:"
            else None
        )
        self._fd: int | None = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        if self._path is None:
            yield
            return
        if self._fd is None:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Checkpointer:
    """Copies SQLite's write-ahead log into the database file every `interval` seconds, on a
    thread and a connection of its own, so that no commit has to.

    By default the commit that takes the log past 1,000 pages checkpoints it itself, inside
    its transaction: it copies the pages and fsyncs the file while it holds the write lock.
    Measured under the clicks bench, such commits took 50-600 ms (an fsync of a few MB here
    takes 2 ms, now and then 100), and every writer of both processes waited for them. A
    PASSIVE checkpoint holds no lock a writer waits for, and the next writer after a complete
    one starts the log over, so it stays about as long as an interval's writes.
    """

    def __init__(self, database: str, *, interval: float = 1.0) -> None:
        self._database = database
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="signoff-sqlite-checkpoint")
        self._thread.daemon = True
        self._thread.start()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(self._database, timeout=30)
        except sqlite3.Error as exc:
            log.warning("SQLite checkpoints are off: cannot open %s: %s", self._database, exc)
            return
        try:
            while not self._stop.wait(self._interval):
                self._checkpoint(connection)
            self._checkpoint(connection)  # what the last interval wrote
        finally:
            connection.close()

    @staticmethod
    def _checkpoint(connection: sqlite3.Connection) -> None:
        try:
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            # The thread must outlive a bad moment (disk full, file replaced): commits go on
            # meanwhile, and the log waits for the next try.
            log.warning("SQLite checkpoint failed: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class TransactionRunner:
    """Runs a synchronous unit of work in one transaction, in as few round trips as can be.

    Hot paths (the intake ledger) write a whole batch with a dozen statements. Through
    aiosqlite every statement is a hop to its thread and back through the event loop, measured
    at 0.24 ms each here and far more while the loop is busy serving requests, so on SQLite the
    whole transaction runs in one hop instead: on a dedicated thread with the synchronous
    driver (same file, same tuning). On PostgreSQL each statement is a network round trip
    anyway, and the work runs through `AsyncSession.run_sync` on the async engine.

    Either way the unit of work is the same plain function of a `Session`: one implementation.
    On PostgreSQL a unit that loses a deadlock is run again (its transaction rolled back whole),
    so a unit must change nothing outside its session until it has returned.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        inline: bool = False,
        checkpoint_every: float | None = 1.0,
    ) -> None:
        """`inline`: on SQLite, run units on the calling thread (the event loop) rather than
        a database thread, for a process whose loop has no side effects to keep apart from its
        requests (`serve`'s processes when worker processes run the outbox). A unit on a thread
        holds the `WriterLock` while it waits for the interpreter, up to the switch interval
        (5 ms) each time it gets it back after a statement, and the other process's writes wait
        for that lock; handing every unit to a thread and back, and the two threads taking
        turns at the interpreter, also cost a third of the intake's CPU. Inline, a unit blocks
        the loop for as long as it runs, which is why sweeps come in small batches.

        `checkpoint_every`: on a SQLite file, the seconds between this runner's checkpoints
        (`Checkpointer`; its commits never checkpoint), or None when another process's
        runner checkpoints the file (a worker process's: its `serve` does). Some runner of a
        file must checkpoint, or the write-ahead log grows without end; a second one (a CLI
        command's, while `serve` runs) does no harm, as a checkpoint that meets another
        skips."""
        self._engine = engine
        self._sessions = sessionmaker(engine)
        self._sync_sessions: orm.sessionmaker[orm.Session] | None = None
        self._thread: WriterThread | None = None
        self._checkpointer: Checkpointer | None = None
        if is_sqlite(engine):
            url = engine.url.set(drivername="sqlite+pysqlite")
            sync_engine = sa_create_engine(
                url, pool_size=1, max_overflow=0, json_serializer=json_serializer
            )
            _tune_sqlite(sync_engine, auto_checkpoint=False)
            self._sync_sessions = orm.sessionmaker(sync_engine, expire_on_commit=False)
            if not inline:
                # One thread owns the connection; SQLite allows one writer at a time anyway.
                self._thread = WriterThread("signoff-sqlite-writer")
            database = engine.url.database
            if checkpoint_every is not None and database and database != ":memory:":
                self._checkpointer = Checkpointer(database, interval=checkpoint_every)
        self._lock = WriterLock(engine.url.database if is_sqlite(engine) else None)

    @property
    def shared(self) -> bool:
        """Whether several processes may send the same card's updates: replicas on
        PostgreSQL. On SQLite one process runs the outbox (`SIGNOFF_WORKER_PROCESSES` is 0 or
        1, and `signoff worker` is refused)."""
        return self._sync_sessions is None

    async def run(
        self,
        work: Callable[[orm.Session], T],
        *,
        background: bool = False,
        read_only: bool = False,
    ) -> T:
        """Run `work` in a transaction and return what it returns. `background`: the unit
        answers no request (a side effect, a sweep), and on SQLite waits while units that do
        are queued (see `storage.writer_thread`). `read_only`: the unit writes nothing, so on
        SQLite it begins deferred and takes neither the write lock nor the `WriterLock` (as
        `reading` does); a write in it is a bug."""
        if self._sync_sessions is None:
            return await self._run_async(work)
        sync_sessions = self._sync_sessions
        lock = self._lock

        def in_thread() -> T:
            if read_only:
                with sync_sessions() as session, session.begin():
                    session.connection(execution_options={_READ_ONLY: True})
                    return work(session)
            with lock.held(), sync_sessions.begin() as session:
                return work(session)

        if self._thread is None:
            return in_thread()
        return await asyncio.wrap_future(self._thread.submit(in_thread, background=background))

    async def quiet(self, most: float) -> None:
        """Wait until no unit that answers a request is queued, running or just finished on
        SQLite's database thread, for at most `most` seconds: background work (the outbox
        worker) yields to requests under a burst and catches up as it eases."""
        if self._thread is None:
            return
        deadline = asyncio.get_running_loop().time() + most
        while self._thread.foreground_busy and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.002)

    async def _run_async(self, work: Callable[[orm.Session], T]) -> T:
        attempt = 1
        while True:
            try:
                async with self._sessions.begin() as session:
                    return await session.run_sync(work)
            except DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None)
                if code not in _RETRY_SQLSTATES or attempt >= _ATTEMPTS:
                    raise
                log.warning(
                    "transaction aborted by the database (%s), running it again (attempt %d)",
                    code,
                    attempt + 1,
                )
            # A short random pause, so the two sides of a deadlock do not meet again at once.
            await asyncio.sleep(random.uniform(0, 0.005 * attempt))  # noqa: S311 (jitter)
            attempt += 1

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._lock.close()
        if self._sync_sessions is not None:
            bind = self._sync_sessions.kw["bind"]
            assert isinstance(bind, Engine)
            bind.dispose()
