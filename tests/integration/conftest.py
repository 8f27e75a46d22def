"""A running Signoff app (in this process, on a real local port) against each database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bot.http import build_app
from bot.service import Services
from bot.settings import load_settings
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


@pytest.fixture
async def running(db_url: str) -> AsyncIterator[Running]:
    settings = load_settings(
        SIGNOFF_DATABASE_URL=db_url,
        SIGNOFF_POLICY_PATH=str(POLICY),
        SIGNOFF_WEBHOOK_SECRET=SECRET,
        SIGNOFF_API_TOKEN=API_TOKEN,
        SIGNOFF_MAX_BODY_BYTES=16 * 1024,
        SIGNOFF_OUTBOX_BACKOFF_BASE=0.05,
        SIGNOFF_OUTBOX_BACKOFF_MAX=0.2,
        SIGNOFF_OUTBOX_MAX_ATTEMPTS=3,
        SIGNOFF_CALLBACK_TIMEOUT=2,
        SIGNOFF_SHUTDOWN_GRACE=5,
    )
    services = await Services.start(settings)
    client = TestClient(TestServer(build_app(services), host="127.0.0.1"))
    await client.start_server()
    try:
        yield Running(services, client)
    finally:
        await client.close()
        await services.close()
