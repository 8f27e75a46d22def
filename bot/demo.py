"""`signoff demo`: the whole flow on this machine with no Slack account.

The real service runs on a throwaway SQLite file, wired to a local Slack stand-in (the same one
the tests use) and to a local "source system" that receives the signed sync-backs. The webhook
connector's sample events go in over HTTP; cards are printed as the stand-in received them;
clicks are sent as Slack sends them, signed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import signal
import socket
import tempfile
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import httpx
from aiohttp import web
from slack_sdk.models.blocks import Block
from slack_sdk.signature import SignatureVerifier

from bot.http import build_app
from bot.service import Services
from bot.settings import load_settings
from bot.slack.cards import Card, button_value
from bot.slack.standin import DEFAULT_TOKEN, SlackStandIn
from bot.slack.terminal import render_text
from connectors.webhook.signature import StandardWebhooks
from storage import audit
from storage.requests import get_request

DEMO_POLICY = Path(__file__).with_name("demo_policy.yaml")
FIXTURES = resources.files("connectors.webhook") / "fixtures"
SAMPLES = ("small_refund.json", "refund.json", "deploy.json", "heartbeat.json")

# The demo workspace: who is who in the stand-in.
USERS = {
    "U0CFO": {"name": "casey", "real_name": "Casey (CFO)", "email": "cfo@example.com"},
    "UANA": {"name": "ana", "real_name": "Ana (finance lead)", "email": "ana@example.com"},
    "USRE": {"name": "sam", "real_name": "Sam (SRE lead)", "email": "sam.sre@example.com"},
    "UMONA": {"name": "mona", "real_name": "Mona Lisa", "email": "mona@example.com"},
    "UNOPE": {"name": "riley", "real_name": "Riley (not an approver)", "email": "r@example.com"},
}
GROUPS = {"S0FIN": ["UANA", "U0CFO"], "S0SRE": ["USRE", "UMONA"], "S0APP": ["UANA", "USRE"]}
HANDLES = {"finance-leads": "S0FIN", "sre-leads": "S0SRE", "approvers": "S0APP"}


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
        who = ", ".join(d["name"] or d["id"] for d in payload["decided_by"])
        self.out.write(
            f"  ← source system got {payload['request_id']}: {payload['status']} by {who} "
            f"(signature verified, webhook-id {request.headers['webhook-id']})\n"
        )
        self.arrived.set()
        return web.json_response({"ok": True})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Demo:
    base: str
    services: Services
    slack: SlackStandIn
    source: SourceSystem
    verifier: StandardWebhooks
    signing_secret: str
    out: TextIO
    http: httpx.AsyncClient

    async def send_samples(self, source_url: str) -> list[dict[str, Any]]:
        answers = []
        for name in SAMPLES:
            body = json.loads((FIXTURES / name).read_text())
            body["callback_url"] = source_url
            raw = json.dumps(body).encode()
            headers = self.verifier.headers(msg_id=f"msg_{secrets.token_hex(8)}", body=raw)
            response = await self.http.post(f"{self.base}/v1/events", content=raw, headers=headers)
            answer = response.json()
            answers.append({**answer, "title": body["title"], "version": body["version"]})
            self.out.write(
                f"→ {body['title']}\n"
                f"  {response.status_code}: {answer['decision']} by rule {answer['rule']}, "
                f"status {answer['status'] or '-'}\n"
            )
        self.out.write("→ the last delivery again, same webhook-id (a source retrying)\n")
        again = await self.http.post(f"{self.base}/v1/events", content=raw, headers=headers)
        self.out.write(f"  {again.status_code}: same answer, nothing new stored\n")
        forged = dict(headers, **{"webhook-signature": "v1,Zm9yZ2Vk"})
        response = await self.http.post(f"{self.base}/v1/events", content=raw, headers=forged)
        error = response.json()["error"]
        self.out.write(f"→ a forged signature\n  {response.status_code}: {error}\n")
        return answers

    async def show_card(self, channel: str, heading: str) -> str:
        message = next(m for m in self.slack.messages(channel) if not m.thread_ts)
        card = Card(blocks=[b for b in map(Block.parse, message.blocks or []) if b], text="")
        self.out.write(f"\n┌─ {heading}: the card in #{channel}\n")
        for line in render_text(card).splitlines():
            self.out.write(f"│ {line}\n")
        self.out.write("└─\n")
        return message.ts

    async def click(self, request: dict[str, Any], channel: str, ts: str, user: str) -> None:
        """An Approve click as Slack sends it: a signed, urlencoded block_actions payload."""
        payload = {
            "type": "block_actions",
            "user": {"id": user, "username": USERS[user]["name"], "name": USERS[user]["name"]},
            "team": {"id": "T0DEMO", "domain": "demo"},
            "api_app_id": "A0SIGNOFF",
            "container": {"type": "message", "message_ts": ts, "channel_id": channel},
            "channel": {"id": channel},
            "trigger_id": f"{time.time_ns()}.demo",
            "actions": [
                {
                    "type": "button",
                    "action_id": "signoff_approve",
                    "block_id": "signoff",
                    "value": button_value(request["request_id"], request["version"]),
                    "action_ts": str(time.time()),
                }
            ],
        }
        body = urlencode({"payload": json.dumps(payload)})
        stamp = str(int(time.time()))
        signature = SignatureVerifier(self.signing_secret).generate_signature(
            timestamp=stamp, body=body
        )
        assert signature is not None
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            "x-slack-request-timestamp": stamp,
            "x-slack-signature": signature,
        }
        started = time.perf_counter()
        response = await self.http.post(f"{self.base}/slack/events", content=body, headers=headers)
        took = (time.perf_counter() - started) * 1000
        self.out.write(
            f"→ {USERS[user]['real_name']} clicks Approve: acked {response.status_code} "
            f"in {took:.1f} ms\n"
        )
        seen = len(self.slack.ephemerals)
        await asyncio.sleep(0.3)
        for note in self.slack.ephemerals[seen:]:
            self.out.write(f"  (only {USERS[note.user]['real_name']} sees) {note.text}\n")

    async def wait(self, check: Any, timeout: float = 10.0) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not check():
                    await asyncio.sleep(0.05)


async def run_demo(*, keep: bool, out: TextIO) -> int:
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    signing_secret = secrets.token_hex(16)
    verifier = StandardWebhooks(secret)
    slack = SlackStandIn(
        channels={"C0FINANCE", "C0DEPLOYS", "C0APPROVALS"},
        users=USERS,
        usergroups=GROUPS,
        usergroup_handles=HANDLES,
    )
    await slack.start()
    with tempfile.TemporaryDirectory(prefix="signoff-demo-") as tmp:
        database = Path(tmp) / "signoff.db"
        port, source_port = _free_port(), _free_port()
        settings = load_settings(
            SIGNOFF_DATABASE_URL=f"sqlite+aiosqlite:///{database}",
            SIGNOFF_POLICY_PATH=str(DEMO_POLICY),
            SIGNOFF_WEBHOOK_SECRET=secret,
            SIGNOFF_API_TOKEN=secrets.token_urlsafe(24),
            SIGNOFF_PORT=port,
            SLACK_BOT_TOKEN=DEFAULT_TOKEN,
            SLACK_SIGNING_SECRET=signing_secret,
            SLACK_API_URL=slack.url,
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
        out.write(
            f"Signoff demo: service on {base}, Slack stand-in on {slack.url}\n"
            f"database {database}\npolicy {DEMO_POLICY}\n\n"
        )
        try:
            async with httpx.AsyncClient() as http:
                demo = Demo(base, services, slack, source, verifier, signing_secret, out, http)
                await _story(demo, f"http://127.0.0.1:{source_port}/approvals")
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
            await slack.stop()
    return 0


async def _story(demo: Demo, source_url: str) -> None:
    out = demo.out
    answers = await demo.send_samples(source_url)
    by_title = {a["title"]: a for a in answers}
    deploy = by_title["Deploy api 9f2c1e7 to prod"]
    await demo.wait(lambda: len(demo.source.received) >= 1)
    await demo.wait(
        lambda: bool(demo.slack.messages("C0DEPLOYS") and demo.slack.messages("C0FINANCE"))
    )
    await demo.show_card("C0FINANCE", "Routed to finance")
    ts = await demo.show_card("C0DEPLOYS", "Routed to SRE")

    out.write("\nClicks on the deploy card:\n")
    await demo.click(deploy, "C0DEPLOYS", ts, "UNOPE")
    await demo.click(deploy, "C0DEPLOYS", ts, "UMONA")
    await demo.click(deploy, "C0DEPLOYS", ts, "USRE")
    await demo.wait(lambda: len(demo.source.received) >= 2)
    await demo.wait(lambda: bool(demo.slack.calls_to("chat.update")))
    await demo.show_card("C0DEPLOYS", "After the approval")
    dm = demo.slack.dm_channel("UMONA")
    if dm:
        await demo.wait(lambda: bool(demo.slack.messages(dm)))
        for message in demo.slack.messages(dm):
            out.write(f"  DM to Mona (the requester): {message.text}\n")
    await _summary(demo, answers)


async def _summary(demo: Demo, answers: list[dict[str, Any]]) -> None:
    out = demo.out
    out.write("\nRequests\n")
    async with demo.services.sessions() as session:
        for answer in answers:
            if answer["request_id"] is None:
                out.write(f"  {'-':<18}  ignored    {answer['title']}\n")
                continue
            view = await get_request(session, answer["request_id"])
            out.write(f"  {view.request.id}  {view.request.status:<9}  {answer['title']}\n")
        verified = await audit.verify(session)
    out.write(
        f"\n{len(demo.source.received)} decision(s) synced back to the source, each signed; "
        f"{len(demo.slack.calls)} Slack API calls made to the stand-in.\n"
        f"Audit chain: {verified.checked} records, "
        f"{'intact' if verified.ok else 'BROKEN: ' + verified.problem}.\n"
    )


async def _until_interrupted() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
