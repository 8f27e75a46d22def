"""Case 5: PostgreSQL restarted under load."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.faults.conftest import (
    Outcome,
    PrivatePostgres,
    Source,
    callback_sink,
    serve_env,
    serving,
    slack_standin,
)
from tests.support import event_body

SENDERS = 4
OUTAGE_SECONDS = 2.0


@pytest.mark.timeout(240)
async def test_postgres_restart_under_load(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    """Sources keep sending while the database stops and comes back. During the outage every
    delivery is answered 503 with a retry hint and the source sends the same delivery again;
    afterwards every accepted delivery has its event, request and audit records, each side
    effect happened once, the chain verifies, and the same process serves on: no restart.

    The server is a private cluster (see `PrivatePostgres`): the shared one on :5432 serves
    other tests and must not be stopped. A fast shutdown ends every connection at once, as a
    failover or a restart for an upgrade does.
    """
    db_url = private_postgres.url
    source = Source()
    readiness: list[int] = []
    async with slack_standin() as slack, callback_sink() as sink:
        env = serve_env(db_url, slack=slack)
        async with (
            serving(env, tmp_path / "serve") as [serve],
            httpx.AsyncClient(timeout=30) as client,
        ):
            assert serve.process is not None
            pid = serve.process.pid
            sending = True

            async def sender(n: int) -> None:
                sent = 0
                while sending:
                    # Auto-approved (a callback) and routed (a card), in turn.
                    amount = 4200 if (n + sent) % 2 else 10
                    body = event_body(attributes={"amount": amount}, callback_url=sink.url)
                    await source.deliver(client, serve.url, body, f"m_{uuid.uuid4().hex}")
                    sent += 1

            async def probe() -> None:
                while sending:
                    readiness.append((await client.get(f"{serve.url}/readyz")).status_code)
                    await asyncio.sleep(0.2)

            tasks = [asyncio.create_task(sender(n)) for n in range(SENDERS)]
            tasks.append(asyncio.create_task(probe()))
            await asyncio.sleep(1.5)
            before = len(source.accepted)
            assert before > 0, "no load before the outage"
            await asyncio.to_thread(private_postgres.stop, "fast")
            await asyncio.sleep(OUTAGE_SECONDS)
            await asyncio.to_thread(private_postgres.start)
            restarted = time.monotonic()
            # The load goes on until the service has answered again for a while.
            while time.monotonic() - restarted < 3 or len(source.accepted) <= before:
                await asyncio.sleep(0.2)
            sending = False
            await asyncio.gather(*tasks)

            assert source.unavailable, "no delivery met the outage"
            assert source.refused_connections == 0, "the service itself went away"
            assert 503 in readiness and readiness[-1] == 200, readiness
            assert serve.process.poll() is None and serve.process.pid == pid
            # Recovered without a restart: a new delivery is accepted at the first attempt.
            raw_body = event_body(attributes={"amount": 20}, callback_url=sink.url)
            response = await source.post(client, serve.url, raw_body, f"m_{uuid.uuid4().hex}")
            assert response.status_code == 202, response.text

            # A callback whose outcome could not be written before the database went away is
            # sent again once its claim's lease (60 s) runs out: allow for that wait.
            await Outcome(db_url, env, source, sinks=[sink], slack=slack).check(settle=120)
