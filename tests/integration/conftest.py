"""A running Signoff app (in this process, on a real local port) against each database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from aiohttp.test_utils import TestClient, TestServer
from sqlalchemy import func, select

from bot.clock import Clock
from bot.http import build_app
from bot.service import Services
from bot.settings import load_settings
from bot.slack.standin import DEFAULT_TOKEN, SlackStandIn
from storage.models import OutboxJob
from tests.slack_support import SIGNING_SECRET
from tests.support import POLICY, SECRET, CallbackSink

API_TOKEN = "test-api-token-0123456789"


@dataclass
class Running:
    services: Services
    client: TestClient  # type: ignore[type-arg]


@pytest.fixture
async def sink() -> AsyncIterator[CallbackSink]:
    receiver = CallbackSink()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()


def test_settings(db_url: str, **overrides: object) -> dict[str, object]:
    """The settings every in-process app runs with: fast retries, a small body limit."""
    return {
        "SIGNOFF_DATABASE_URL": db_url,
        "SIGNOFF_POLICY_PATH": str(POLICY),
        "SIGNOFF_WEBHOOK_SECRET": SECRET,
        "SIGNOFF_API_TOKEN": API_TOKEN,
        "SIGNOFF_MAX_BODY_BYTES": 16 * 1024,
        "SIGNOFF_OUTBOX_BACKOFF_BASE": 0.05,
        "SIGNOFF_OUTBOX_BACKOFF_MAX": 0.2,
        "SIGNOFF_OUTBOX_MAX_ATTEMPTS": 3,
        "SIGNOFF_CALLBACK_TIMEOUT": 2,
        "SIGNOFF_SHUTDOWN_GRACE": 5,
        **overrides,
    }


@contextlib.asynccontextmanager
async def running_app(
    settings: dict[str, object], *, clock: Clock | None = None
) -> AsyncIterator[Running]:
    """Signoff's app on a real local port, in this process. With a `clock`, scheduled work
    runs only when the test calls `services.scheduler.tick()`."""
    services = await Services.start(load_settings(**settings), clock=clock)
    client = TestClient(TestServer(build_app(services), host="127.0.0.1"))
    await client.start_server()
    try:
        yield Running(services, client)
    finally:
        await client.close()
        if not services.stopping.is_set():  # a test may have closed it already
            await services.close()


@pytest.fixture
async def running(db_url: str) -> AsyncIterator[Running]:
    async with running_app(test_settings(db_url)) as app:
        yield app


# --- Slack: the running app wired to a local Slack stand-in --------------------------------

SLACK_USERS = {
    "U0CFO": {"name": "cfo", "real_name": "Casey CFO", "email": "cfo@example.com"},
    "UA1": {"name": "ana", "real_name": "Ana Lead", "email": "ana@example.com"},
    "UA2": {"name": "bo", "real_name": "Bo Lead", "email": "bo@example.com"},
    "UDANA": {"name": "dana", "real_name": "Dana", "email": "dana@example.com"},
    "UNOPE": {"name": "nope", "real_name": "Not Approver", "email": "nope@example.com"},
}


@dataclass
class SlackRunning(Running):
    slack: SlackStandIn
    sink: CallbackSink


@contextlib.asynccontextmanager
async def slack_app(
    db_url: str, *, clock: Clock | None = None, **overrides: object
) -> AsyncIterator[SlackRunning]:
    """The app wired to a Slack stand-in (finance leads, approvers, a requester who is also a
    finance lead) and to a callback sink standing in for the source system."""
    standin = SlackStandIn(
        channels={"C0FINANCE", "C0APPROVALS"},
        users=SLACK_USERS,
        usergroups={"S0FIN": ["UA1", "UA2", "UDANA"], "S0APP": ["UA1", "UA2"]},
        usergroup_handles={"finance-leads": "S0FIN", "approvers": "S0APP"},
    )
    await standin.start()
    sink = CallbackSink()
    await sink.start()
    settings = test_settings(
        db_url,
        SLACK_BOT_TOKEN=DEFAULT_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=standin.url,
        **overrides,
    )
    try:
        async with running_app(settings, clock=clock) as app:
            yield SlackRunning(app.services, app.client, standin, sink)
    finally:
        await sink.stop()
        await standin.stop()


@pytest.fixture
async def slack_running(db_url: str) -> AsyncIterator[SlackRunning]:
    async with slack_app(db_url) as env:
        yield env


async def outbox_settled(running: Running, *, only_due: bool = False) -> None:
    """Until no outbox job is pending or running (the rest are done or dead). With
    `only_due`, pending jobs not due yet (a retry's backoff) do not count."""
    for _ in range(200):
        running.services.worker.wake()
        query = (
            select(func.count())
            .select_from(OutboxJob)
            .where(OutboxJob.status.in_(["pending", "running"]))
        )
        if only_due:
            query = query.where(OutboxJob.next_attempt_at <= datetime.now(UTC))
        async with running.services.sessions() as session:
            busy = await session.scalar(query)
        if not busy:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the outbox did not settle")
