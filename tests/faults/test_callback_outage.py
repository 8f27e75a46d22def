"""Case 1: the source's callback endpoint is down for a while, then back."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx

from tests.faults.conftest import Outcome, Source, serve_env, serving
from tests.support import CallbackSink, event_body, free_port

EVENTS = 12


async def test_callbacks_retried_through_an_outage_then_delivered_once(tmp_path: Path) -> None:
    """The receiver first refuses connections (process down), then answers 503 (up, not
    ready), then accepts: every decision arrives once, after failed attempts that were retried.

    "Down for a while" is a few seconds here: with SIGNOFF_OUTBOX_BACKOFF_MAX at 0.5 s that is
    still several attempts per job, which is what an outage of minutes does with the defaults.
    """
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'signoff.db'}"
    env = serve_env(db_url)
    sink = CallbackSink(port=free_port())  # not started: the endpoint is down
    source = Source()
    async with serving(env, tmp_path / "serve") as [serve], httpx.AsyncClient() as client:
        for n in range(EVENTS):
            # Small refunds: auto-approved, so each one queues its callback at once.
            body = event_body(attributes={"amount": 10 + n}, callback_url=sink.url)
            answer = await source.deliver(client, serve.url, body, f"msg_{uuid.uuid4().hex}")
            assert answer["status"] == "approved"

        async def failed_attempts() -> int:
            shown = serve.cli("audit", "export", "--format", "jsonl")
            kinds = [json.loads(line)["kind"] for line in shown.stdout.splitlines()]
            return kinds.count("sync.attempt_failed")

        await asyncio.sleep(2)
        refused = await failed_attempts()
        assert refused >= EVENTS, "every callback should have failed at least once by now"

        sink.fail_with = 503
        await sink.start()
        await asyncio.sleep(2)
        assert sink.attempts > 0 and not sink.deliveries, "503s are not deliveries"

        sink.fail_with = None
        await sink.wait_for(EVENTS, timeout=20)
        try:
            await Outcome(db_url, env, source, sinks=[sink]).check()
        finally:
            await sink.stop()
        assert await failed_attempts() > refused, "the 503s were recorded as failed attempts"
