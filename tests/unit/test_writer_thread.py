"""SQLite's database thread: units that answer a request go first, background units still
progress, and each caller gets its own result or error."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from storage.db import TransactionRunner, create_engine
from storage.writer_thread import FOREGROUND_RUN, RECENT, WriterThread


@pytest.fixture
def writer():
    thread = WriterThread("test-writer")
    yield thread
    thread.close()


def blocked(writer: WriterThread) -> threading.Event:
    """Occupy the thread until the returned event is set, so that what is submitted meanwhile
    queues up and the order it runs in shows."""
    release, started = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    writer.submit(hold, background=False)
    assert started.wait(10)
    return release


def test_request_units_run_before_background_units_queued_earlier(writer) -> None:
    ran: list[str] = []
    release = blocked(writer)
    futures = [writer.submit(lambda: ran.append("background"), background=True)]
    futures += [
        writer.submit(lambda i=i: ran.append(f"click {i}"), background=False) for i in range(2)
    ]
    release.set()
    concurrent.futures.wait(futures, timeout=10)
    assert ran == ["click 0", "click 1", "background"]


def test_a_steady_stream_of_request_units_does_not_starve_the_background(writer) -> None:
    ran: list[str] = []
    release = blocked(writer)
    futures = [writer.submit(lambda: ran.append("background"), background=True)]
    futures += [
        writer.submit(lambda i=i: ran.append(f"click {i}"), background=False)
        for i in range(FOREGROUND_RUN * 2)
    ]
    release.set()
    concurrent.futures.wait(futures, timeout=10)
    # The unit holding the thread counted as the first of the run.
    assert ran.index("background") == FOREGROUND_RUN - 1


def test_each_caller_gets_its_own_result_or_error(writer) -> None:
    def fail() -> None:
        raise ValueError("this unit's bug")

    good = writer.submit(lambda: 42, background=False)
    bad = writer.submit(fail, background=True)
    after = writer.submit(lambda: "still running", background=False)
    assert good.result(10) == 42
    with pytest.raises(ValueError, match="this unit's bug"):
        bad.result(10)
    assert after.result(10) == "still running"


def test_a_unit_cancelled_before_it_starts_does_not_run(writer) -> None:
    ran: list[str] = []
    release = blocked(writer)
    cancelled = writer.submit(lambda: ran.append("cancelled"), background=False)
    assert cancelled.cancel()
    kept = writer.submit(lambda: ran.append("kept"), background=False)
    release.set()
    kept.result(10)
    assert ran == ["kept"]


def test_close_runs_what_is_queued_then_refuses_more() -> None:
    writer = WriterThread("test-writer")
    ran: list[int] = []
    release = blocked(writer)
    futures = [writer.submit(lambda i=i: ran.append(i), background=bool(i % 2)) for i in range(4)]
    release.set()
    writer.close()
    assert all(future.done() for future in futures)
    assert sorted(ran) == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(lambda: None, background=False)


def test_foreground_counts_as_busy_while_queued_running_and_just_after(writer) -> None:
    assert not writer.foreground_busy
    writer.submit(lambda: None, background=True).result(10)
    assert not writer.foreground_busy  # background units never make it busy
    release = blocked(writer)
    assert writer.foreground_busy
    release.set()
    writer.submit(lambda: None, background=True).result(10)  # the held unit has finished
    assert writer.foreground_busy  # within RECENT of it
    time.sleep(RECENT * 2)
    assert not writer.foreground_busy


async def test_background_work_waits_for_a_lull_at_most_as_long_as_it_is_told(tmp_path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'quiet.db'}")
    runner = TransactionRunner(engine)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        await runner.quiet(5)
        assert loop.time() - started < 0.5, "nothing was busy: no wait"
        release = threading.Event()
        held = asyncio.ensure_future(runner.run(lambda _session: release.wait(10)))
        await asyncio.sleep(0.05)
        started = loop.time()
        await runner.quiet(0.2)
        assert loop.time() - started >= 0.2, "a request's unit was running: it waited"
        release.set()
        await held
        await asyncio.sleep(RECENT * 2)
        started = loop.time()
        await runner.quiet(5)
        assert loop.time() - started < 0.5
    finally:
        release.set()
        runner.close()
        await engine.dispose()
