"""Case 2: `kill -9` of `signoff serve` between a vote and its sync-back, then a restart."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from sqlalchemy import func, select

from storage.models import OutboxJob, Request
from tests.faults.conftest import (
    Outcome,
    Source,
    click,
    database,
    request_ids_with_cards,
    serve_env,
    serving,
    slack_standin,
    wait_until,
)
from tests.support import CallbackSink, event_body, free_port


class HoldingSink(CallbackSink):
    """A receiver that holds its first delivery open and never finishes it: the source crashed
    or was cut off mid-request, so that attempt took no effect."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.Response:
        if not self.holding.is_set():
            self.holding.set()
            await self.release.wait()
            return web.json_response({"error": "went away"}, status=503)
        return await super()._handle(request)


async def job_state(db_url: str, key: str) -> tuple[str, int]:
    async with database(db_url) as sessions, sessions() as session:
        row = (
            await session.execute(
                select(OutboxJob.status, OutboxJob.attempts).where(OutboxJob.idempotency_key == key)
            )
        ).one()
        return row.status, row.attempts


async def status_of(db_url: str, request_id: str) -> str:
    async with database(db_url) as sessions, sessions() as session:
        status = await session.scalar(select(Request.status).where(Request.id == request_id))
        return str(status)


@pytest.mark.timeout(240)
async def test_kill_9_between_vote_and_sync_back_then_one_delivery(tmp_path: Path) -> None:
    """Two approved requests whose callbacks are caught by the kill: one in flight (its
    receiver holds the attempt open), one waiting to retry (its receiver is down). After the
    restart each is delivered once and the votes, cards and audit chain are intact.

    The in-flight job is claimed again only when its lease runs out, which is at least 60 s
    (`bot.service`: max(60, 3 x SIGNOFF_CALLBACK_TIMEOUT)): that wait is the fault itself, a
    crashed worker's claim, so it is waited for in real time.
    """
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'signoff.db'}"
    holding = HoldingSink()
    down = CallbackSink(port=free_port())  # not started
    source = Source()
    await holding.start()
    try:
        async with slack_standin() as slack, httpx.AsyncClient(timeout=30) as client:
            # The held attempt must still be open when the process dies.
            env = serve_env(db_url, slack=slack, SIGNOFF_CALLBACK_TIMEOUT="15")
            async with serving(env, tmp_path / "serve") as [serve]:
                request_ids = []
                for sink in (holding, down):
                    # The default route: one approval from @approvers (UA1, UA2).
                    body = event_body(kind="login", attributes={}, callback_url=sink.url)
                    answer = await source.deliver(client, serve.url, body, f"m_{uuid.uuid4().hex}")
                    assert answer["status"] == "pending"
                    request_ids.append(answer["request_id"])
                held_id, waiting_id = request_ids

                async def cards() -> bool:
                    return set(await request_ids_with_cards(db_url)) == set(request_ids)

                await wait_until(cards, what="both cards")
                await click(client, serve.url, waiting_id, "UA1")
                await click(client, serve.url, held_id, "UA2")
                assert await status_of(db_url, held_id) == "approved"
                assert await status_of(db_url, waiting_id) == "approved"
                await asyncio.wait_for(holding.holding.wait(), 10)

                async def failed_once() -> bool:
                    status, attempts = await job_state(db_url, f"sync-{waiting_id}")
                    return status == "pending" and attempts >= 1

                await wait_until(failed_once, what="a failed attempt at the down receiver")

                # The Slack side of both votes (card update, thread reply, the requester's DM)
                # is done, so the kill catches only the sync-backs.
                async def slack_done() -> bool:
                    posts = [c.params for c in slack.calls_to("chat.postMessage") if c.ok]
                    replies = [p for p in posts if p.get("thread_ts")]
                    dms = [p for p in posts if str(p.get("channel")).startswith("D")]
                    updates = [c for c in slack.calls_to("chat.update") if c.ok]
                    if not (len(replies) == 2 and len(dms) == 2 and len(updates) >= 2):
                        return False
                    # Recorded done too: a job killed between its Slack call and its outcome
                    # runs again (delivery is at least once), which is not what this case tests.
                    async with database(db_url) as sessions, sessions() as session:
                        unfinished = await session.scalar(
                            select(func.count()).where(
                                OutboxJob.kind.startswith("slack."), OutboxJob.status != "done"
                            )
                        )
                    return unfinished == 0

                await wait_until(slack_done, what="card updates and thread replies")
                assert serve.crash() == -signal.SIGKILL
                holding.release.set()
                assert (await job_state(db_url, f"sync-{held_id}"))[0] == "running"
                assert holding.deliveries == [] and down.deliveries == []

                await down.start()
                await serve.start()
                await down.wait_for(1, timeout=20)
                await holding.wait_for(1, timeout=120)
                await Outcome(db_url, env, source, sinks=[holding, down], slack=slack).check(
                    thread_replies={held_id: 1, waiting_id: 1}
                )
    finally:
        holding.release.set()
        await holding.stop()
        await down.stop()
