"""`serve`'s outbox worker processes (bot.processes), as real processes: side effects leave
from a process of their own, its metrics reach `/metrics`, it is started again when it dies,
and it never outlives its `serve`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import fresh_postgres_database
from tests.e2e.conftest import Serve
from tests.e2e.test_serve import post_event
from tests.support import CallbackSink, alive, children, event_body, free_port, run_signoff


async def until(condition, what: str, timeout: float = 20):
    for _ in range(int(timeout / 0.1)):
        value = condition()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def scrape(serve: Serve) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{serve.url}/metrics")
    assert response.status_code == 200
    return response.text


def sample(text: str, series: str) -> float | None:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


DONE = 'signoff_outbox_attempts_total{kind="webhook.callback",outcome="done"}'


def worker_of(serve: Serve) -> int:
    assert serve.process is not None
    [worker] = children(serve.process.pid)
    cmdline = Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")
    assert b"worker" in cmdline and b"--control-fd" in cmdline, cmdline
    return worker


async def test_callbacks_leave_from_the_worker_process_and_its_metrics_reach_metrics(
    serve: Serve,
) -> None:
    worker = worker_of(serve)
    sink = CallbackSink(port=free_port())
    await sink.start()
    try:
        answers = [
            await post_event(serve, event_body(attributes={"amount": 10}, callback_url=sink.url))
            for _ in range(3)
        ]
        await sink.wait_for(3)
        assert {d.body["request_id"] for d in sink.deliveries} == {a["request_id"] for a in answers}
        # The worker counted them; the HTTP process's /metrics shows its figures (it sends
        # them at most every second) beside its own.
        text = ""
        for _ in range(50):
            text = await scrape(serve)
            if sample(text, DONE) == 3.0:
                break
            await asyncio.sleep(0.1)
        assert sample(text, DONE) == 3.0, text
        assert sample(text, "signoff_worker_processes") == 1.0
        accepted = 'signoff_events_received_total{outcome="accepted",source="webhook"}'
        assert sample(text, accepted) == 3.0
        # One exposition: each family once.
        assert text.count("# TYPE signoff_outbox_attempts_total counter") == 1
    finally:
        await sink.stop()
    assert serve.stop() == 0
    assert not alive(worker)


async def test_a_killed_worker_process_is_started_again(serve: Serve) -> None:
    first = worker_of(serve)
    os.kill(first, signal.SIGKILL)
    assert serve.process is not None
    pid = serve.process.pid
    second = await until(
        lambda: [c for c in children(pid) if c != first and alive(c)], "a new worker"
    )
    sink = CallbackSink(port=free_port())
    await sink.start()
    try:
        answer = await post_event(
            serve, event_body(attributes={"amount": 10}, callback_url=sink.url)
        )
        await sink.wait_for(1)
        assert sink.deliveries[0].body["request_id"] == answer["request_id"]
    finally:
        await sink.stop()
    log = serve.log.read_text()
    assert re.search(r"outbox worker process 0 \(pid \d+\) exited with -9", log), log
    assert serve.stop() == 0
    assert not alive(second[0])


async def test_a_worker_process_does_not_outlive_a_killed_serve(serve: Serve) -> None:
    worker = worker_of(serve)
    assert serve.stop(signal.SIGKILL) == -signal.SIGKILL
    # Linux's parent-death signal: it stops by itself, gracefully.
    await until(lambda: not alive(worker), "the orphaned worker to exit")


async def test_the_write_ahead_log_is_checkpointed_while_serve_runs(
    serve: Serve, tmp_path: Path
) -> None:
    """Both processes' commits leave the log to serve's checkpointer (storage.db.Checkpointer):
    the database file grows while they write, not only when serve stops. Without it the log
    would grow for as long as serve runs."""
    database = tmp_path / "signoff.db"
    before = database.stat().st_size
    sink = CallbackSink(port=free_port())
    await sink.start()
    try:
        notes = "n" * 20_000  # ~2 MB in all: well under SQLite's own 4 MB threshold
        for _ in range(100):
            await post_event(
                serve,
                event_body(attributes={"amount": 10, "notes": notes}, callback_url=sink.url),
            )
        await sink.wait_for(100)
        await until(
            lambda: database.stat().st_size > before + 1_500_000, "the log to be checkpointed"
        )
    finally:
        await sink.stop()


async def test_without_worker_processes_serve_runs_the_outbox_itself(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    serve = Serve(
        {**serve_env, "SIGNOFF_PORT": str(port), "SIGNOFF_WORKER_PROCESSES": "0"},
        port,
        tmp_path / "serve.log",
    )
    await serve.start()
    sink = CallbackSink(port=free_port())
    await sink.start()
    try:
        assert serve.process is not None
        assert children(serve.process.pid) == []
        await post_event(serve, event_body(attributes={"amount": 10}, callback_url=sink.url))
        await sink.wait_for(1)
        text = await scrape(serve)
        assert sample(text, DONE) == 1.0
        assert sample(text, "signoff_worker_processes") == 0.0
    finally:
        await sink.stop()
        serve.stop()


def test_sqlite_allows_one_worker_process_and_no_worker_of_its_own(
    serve_env: dict[str, str],
) -> None:
    result = run_signoff("serve", env={**serve_env, "SIGNOFF_WORKER_PROCESSES": "2"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "signoff: invalid setting SIGNOFF_WORKER_PROCESSES: must be 0 or 1 on SQLite "
        "(one writer at a time); use PostgreSQL"
    ]
    alone = run_signoff("worker", env=serve_env)
    assert alone.returncode == 2
    assert "a `signoff worker` of its own needs PostgreSQL" in alone.stderr


@pytest.mark.postgres
async def test_a_worker_of_its_own_delivers_what_serve_left_queued(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    """`signoff worker` alone (PostgreSQL): the jobs a stopped `serve` could not deliver (its
    receiver was down) are delivered by it, once, and SIGTERM stops it cleanly."""
    sink = CallbackSink(port=free_port())
    async with fresh_postgres_database() as url:
        env = {
            **serve_env,
            "SIGNOFF_DATABASE_URL": url,
            # The first attempt fails (the sink is down); the retry waits past the stop below.
            "SIGNOFF_OUTBOX_BACKOFF_BASE": "1",
            "SIGNOFF_OUTBOX_BACKOFF_MAX": "1",
            "SIGNOFF_OUTBOX_MAX_ATTEMPTS": "10",
        }
        port = free_port()
        serve = Serve({**env, "SIGNOFF_PORT": str(port)}, port, tmp_path / "serve.log")
        await serve.start()
        try:
            answer = await post_event(
                serve, event_body(attributes={"amount": 10}, callback_url=sink.url)
            )
            await asyncio.sleep(0.5)  # its first attempt: refused
        finally:
            assert serve.stop() == 0
        await sink.start()
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "worker"], env=env, stdout=log, stderr=log
        )
        try:
            await sink.wait_for(1, timeout=30)
            assert [d.body["request_id"] for d in sink.deliveries] == [answer["request_id"]]
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
            assert len(sink.deliveries) == 1
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            log.close()
            await sink.stop()
