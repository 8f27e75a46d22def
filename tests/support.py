"""Test helpers: signed deliveries, a real callback receiver, free ports."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

# A throwaway Standard Webhooks secret used by every test.
SECRET = "whsec_" + base64.b64encode(b"signoff-tests-secret-0123456789ab").decode()
POLICY = Path(__file__).parent / "fixtures" / "policy.yaml"


def run_signoff(
    *args: str, env: Mapping[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`signoff ARGS` as a real process with exactly `env` as its environment."""
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (Linux /proc): `serve`'s outbox worker processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its parent has not reaped it yet


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def event_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "source": "payments",
        "kind": "refund",
        "subject": f"refund/{uuid.uuid4().hex[:8]}",
        "version": "1",
        "title": "Refund $4,200 to ACME Corp",
        "summary": "Customer reports double charge",
        "actor": {"id": "u-42", "name": "Dana", "email": "dana@example.com"},
        "risk": "high",
        "attributes": {"amount": 4200, "currency": "USD", "env": "prod"},
        "context": [{"label": "Customer", "value": "ACME Corp"}],
        "links": [{"title": "Open in Stripe", "url": "https://dashboard.example.com/re_123"}],
    }
    body.update(overrides)
    return body


def sign(
    body: bytes | dict[str, Any],
    *,
    msg_id: str | None = None,
    timestamp: int | None = None,
    secret: str = SECRET,
) -> tuple[bytes, dict[str, str]]:
    """The body as bytes and the three Standard Webhooks headers for it."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    moment = int(time.time()) if timestamp is None else timestamp
    ident = msg_id or f"msg_{uuid.uuid4().hex}"
    from datetime import UTC, datetime

    signature = Webhook(secret).sign(ident, datetime.fromtimestamp(moment, tz=UTC), raw.decode())
    return raw, {
        "content-type": "application/json",
        "webhook-id": ident,
        "webhook-timestamp": str(moment),
        "webhook-signature": signature,
    }


@dataclass
class Delivery:
    webhook_id: str
    body: dict[str, Any]


@dataclass
class CallbackSink:
    """A source system's callback endpoint: verifies signatures, records deliveries.

    `fail_with` makes it answer that status instead (and record nothing); `stop()` and `start()`
    take it down and bring it back on the same port.
    """

    port: int = field(default_factory=free_port)
    secret: str = SECRET
    fail_with: int | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    attempts: int = 0
    refused_signatures: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/approvals"

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        raw = await request.read()
        try:
            Webhook(self.secret).verify(raw, dict(request.headers))
        except WebhookVerificationError:
            self.refused_signatures += 1
            return web.json_response({"error": "bad signature"}, status=401)
        if self.fail_with is not None:
            return web.json_response({"error": "failing on purpose"}, status=self.fail_with)
        self.deliveries.append(Delivery(request.headers["webhook-id"], json.loads(raw)))
        self._arrived.set()
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/approvals", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def unique_deliveries(self) -> dict[str, list[Delivery]]:
        by_id: dict[str, list[Delivery]] = {}
        for delivery in self.deliveries:
            by_id.setdefault(delivery.webhook_id, []).append(delivery)
        return by_id

    async def wait_for(self, count: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} deliveries, got {len(self.deliveries)} "
                    f"after {self.attempts} attempts"
                )
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), min(remaining, 0.2))
            except TimeoutError:
                pass


async def wait_for_a_lock_wait(conn: Any) -> None:
    """PostgreSQL: until some transaction on `conn`'s database waits for a row lock."""
    from sqlalchemy import text

    for _ in range(500):
        waiting = await conn.scalar(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND wait_event_type = 'Lock'"
            )
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no transaction came to wait for a lock")
