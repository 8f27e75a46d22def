"""The SQLite writer lock (storage.db.WriterLock): while another process holds it, this
process's write transactions wait, and its read-only ones do not."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from storage.db import TransactionRunner, create_engine

# A process that takes the writer lock, says so, and lets go when told (a line on stdin).
HOLDER = """
import fcntl, sys
with open(sys.argv[1], "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()
"""


def count(session) -> int:
    return int(session.execute(text("SELECT count(*) FROM t")).scalar_one())


async def test_writes_wait_for_the_other_process_and_reads_do_not(tmp_path: Path) -> None:
    database = tmp_path / "signoff.db"
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    writer, reader = TransactionRunner(engine), TransactionRunner(engine)
    holder = None
    try:
        await writer.run(lambda s: s.execute(text("CREATE TABLE t (n INTEGER)")))
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, f"{database}-writer.lock"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "held"

        write = asyncio.create_task(
            writer.run(lambda s: s.execute(text("INSERT INTO t VALUES (1)")))
        )
        # A read-only unit takes no lock: it is answered while the other process holds it.
        assert await asyncio.wait_for(reader.run(count, read_only=True), 10) == 0
        await asyncio.sleep(0.3)
        assert not write.done(), "the write did not wait for the other process's lock"

        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=10) == 0
        await asyncio.wait_for(write, 10)
        assert await reader.run(count, read_only=True) == 1
    finally:
        if holder is not None:
            if holder.poll() is None:
                holder.kill()
            holder.wait()
            for pipe in (holder.stdin, holder.stdout):
                if pipe is not None:
                    pipe.close()
        writer.close()
        reader.close()
        await engine.dispose()


@pytest.mark.parametrize("inline", [False, True], ids=["database thread", "inline"])
async def test_commits_leave_the_log_to_the_checkpointer(tmp_path: Path, inline: bool) -> None:
    """storage.db.Checkpointer: no commit of the runner copies the write-ahead log into the
    database file (that commit would hold every writer while it fsyncs); the checkpointer
    does, off the commit path, and once more when the runner closes."""
    database = tmp_path / "signoff.db"
    wal = Path(f"{database}-wal")
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    # An interval the test outlasts: only closing checkpoints.
    runner = TransactionRunner(engine, inline=inline, checkpoint_every=3600)
    try:
        await runner.run(lambda s: s.execute(text("CREATE TABLE t (b BLOB)")))
        for _ in range(12):  # ~6 MB: past SQLite's own 1,000-page threshold several times
            await runner.run(lambda s: s.execute(text("INSERT INTO t VALUES (randomblob(500000))")))
        assert wal.stat().st_size > 5_000_000
        assert database.stat().st_size < 1_000_000, "a commit checkpointed the log"
    finally:
        runner.close()
        await engine.dispose()
    assert database.stat().st_size > 5_000_000
