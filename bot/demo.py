"""`signoff demo`: the real service on a throwaway SQLite database, fed the webhook connector's
sample events over HTTP, with a local source system receiving the signed sync-backs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

import httpx
from aiohttp import web

from bot.http import build_app
from bot.service import Services
from bot.settings import load_settings
from connectors.webhook.signature import StandardWebhooks
from storage import audit
from storage.requests import get_request

DEMO_POLICY = Path(__file__).with_name("demo_policy.yaml")
FIXTURES = resources.files("connectors.webhook") / "fixtures"
SAMPLES = ("small_refund.json", "refund.json", "deploy.json", "heartbeat.json")


@dataclass
class SourceSystem:
    """A stand-in for the system that sent the events: verifies and records callbacks."""

    verifier: StandardWebhooks
    out: TextIO
    received: list[dict[str, Any]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.verifier.verify(body, request.headers)
        payload = json.loads(body)
        self.received.append(payload)
        self.out.write(
            f"  ← callback  {payload['request_id']}  {payload['status']}  "
            f"signature ok, webhook-id {request.headers['webhook-id']}\n"
        )
        self.arrived.set()
        return web.json_response({"ok": True})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_demo(*, keep: bool, out: TextIO) -> int:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    verifier = StandardWebhooks(secret)
    with tempfile.TemporaryDirectory(prefix="signoff-demo-") as tmp:
        database = Path(tmp) / "signoff.db"
        port, source_port = _free_port(), _free_port()
        settings = load_settings(
            SIGNOFF_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
            SIGNOFF_POLICY_PATH=str(DEMO_POLICY),
            SIGNOFF_WEBHOOK_SECRET=secret,
            SIGNOFF_API_TOKEN=secrets.token_urlsafe(24),
            SIGNOFF_PORT=port,
        )
        source = SourceSystem(verifier, out)
        source_app = web.Application()
        source_app.router.add_post("/approvals", source.handle)
        source_runner = web.AppRunner(source_app, access_log=None)
        await source_runner.setup()
        await web.TCPSite(source_runner, "127.0.0.1", source_port).start()

        services = await Services.start(settings)
        runner = web.AppRunner(build_app(services), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}"
        out.write(f"Signoff demo: service on {base}, database {database}\n")
        out.write(f"policy {DEMO_POLICY}\n\n")
        try:
            answers = await _send_samples(base, verifier, source_port, out)
            expected = sum(1 for a in answers if a["status"] in ("approved", "rejected"))
            await _wait_for(source, expected)
            await _summary(services, answers, source, out)
            if keep:
                out.write(
                    f"\nStill serving on {base} (Ctrl-C to stop). In another shell:\n"
                    f"  SIGNOFF_DATABASE_URL=sqlite+aiosqlite:///{database} signoff requests list\n"
                )
                await _until_interrupted()
        finally:
            services.stopping.set()
            await runner.cleanup()
            await services.close()
            await source_runner.cleanup()
    return 0


async def _send_samples(
    base: str, verifier: StandardWebhooks, source_port: int, out: TextIO
) -> list[dict[str, Any]]:
    answers = []
    async with httpx.AsyncClient() as client:
        for name in SAMPLES:
            body = json.loads((FIXTURES / name).read_text())
            body["callback_url"] = f"http://127.0.0.1:{source_port}/approvals"
            raw = json.dumps(body).encode()
            headers = verifier.headers(msg_id=f"msg_{secrets.token_hex(8)}", body=raw)
            response = await client.post(f"{base}/v1/events", content=raw, headers=headers)
            answer = response.json()
            answers.append({**answer, "title": body["title"]})
            out.write(
                f"→ {body['title']}\n"
                f"  {response.status_code}  decision {answer['decision']} by rule "
                f"{answer['rule']}, status {answer['status'] or '-'}\n"
            )
        # The same delivery again (a source retrying) changes nothing.
        out.write("→ the last delivery again, same webhook-id (a retrying source)\n")
        response = await client.post(f"{base}/v1/events", content=raw, headers=headers)
        out.write(f"  {response.status_code}  same answer: {response.json() == answer}\n")
        bad = dict(headers, **{"webhook-signature": "v1,Zm9yZ2Vk"})
        response = await client.post(f"{base}/v1/events", content=raw, headers=bad)
        out.write(f"→ a forged signature\n  {response.status_code}  {response.json()['error']}\n")
    return answers


async def _wait_for(source: SourceSystem, count: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while len(source.received) < count:
                source.arrived.clear()
                await source.arrived.wait()


async def _summary(
    services: Services, answers: list[dict[str, Any]], source: SourceSystem, out: TextIO
) -> None:
    out.write("\nRequests\n")
    async with services.sessions() as session:
        for answer in answers:
            if answer["request_id"] is None:
                out.write(f"  -                      ignored    {answer['title']}\n")
                continue
            view = await get_request(session, answer["request_id"])
            route = view.request.route or {}
            where = f" → {route.get('channel')}" if route else ""
            out.write(f"  {view.request.id}  {view.request.status:<9}  {answer['title']}{where}\n")
            winner = next((s for s in reversed(view.event.decision.get("trace", []))), None)
            if winner:
                out.write(f"      why: {winner['rule']} {winner['outcome']} {winner['detail']}\n")
        verified = await audit.verify(session)
    out.write(
        f"\n{len(source.received)} decision(s) synced back to the source, each signed.\n"
        f"Audit chain: {verified.checked} records, "
        f"{'intact' if verified.ok else 'BROKEN: ' + verified.problem}.\n"
        "Routed requests wait for approvers in Slack (see README: Slack).\n"
    )


async def _until_interrupted() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
