"""`signoff demo`: the whole flow on this machine with no Slack account.

The real service runs on a throwaway SQLite file, wired to a local Slack stand-in (the same one
the tests use), a local GitHub API stand-in and a local "source system" that receives the
signed sync-backs. Sample deliveries of every connector go in over HTTP, signed as their sources
sign them: the generic webhook's events, a GitHub deployment protection rule and Alertmanager
alerts (firing, then resolved). Cards are printed as the stand-in received them; clicks are sent
as Slack sends them, signed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import signal
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from slack_sdk.models.blocks import Block
from slack_sdk.signature import SignatureVerifier

from bot.http import build_app
from bot.service import Services
from bot.settings import load_settings
from bot.slack.cards import Card, button_value
from bot.slack.standin import DEFAULT_TOKEN, SlackStandIn
from bot.slack.terminal import render_text
from connectors.github.standin import GitHubStandIn
from connectors.webhook.signature import StandardWebhooks
from storage import audit
from storage.requests import get_request

DEMO_POLICY = Path(__file__).with_name("demo_policy.yaml")
FIXTURES = resources.files("connectors.webhook") / "fixtures"
GITHUB_FIXTURES = resources.files("connectors.github") / "fixtures"
ALERT_FIXTURES = resources.files("connectors.alertmanager") / "fixtures"
GITHUB_APP_ID = "424242"
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
    http: aiohttp.ClientSession
    answers: list[dict[str, Any]] = field(default_factory=list)

    async def post(
        self, path: str, body: bytes | str, headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """POST to the running service as a source (or Slack) would: its status and JSON."""
        async with self.http.post(f"{self.base}{path}", data=body, headers=headers) as response:
            return response.status, await response.json()

    async def send_samples(self, source_url: str) -> list[dict[str, Any]]:
        answers = []
        for name in SAMPLES:
            body = json.loads((FIXTURES / name).read_text())
            body["callback_url"] = source_url
            raw = json.dumps(body).encode()
            headers = self.verifier.headers(msg_id=f"msg_{secrets.token_hex(8)}", body=raw)
            status, answer = await self.post("/v1/events", raw, headers)
            answers.append({**answer, "title": body["title"], "version": body["version"]})
            self.out.write(
                f"→ {body['title']}\n"
                f"  {status}: {answer['decision']} by rule {answer['rule']}, "
                f"status {answer['status'] or '-'}\n"
            )
        self.out.write("→ the last delivery again, same webhook-id (a source retrying)\n")
        again, _ = await self.post("/v1/events", raw, headers)
        self.out.write(f"  {again}: same answer, nothing new stored\n")
        forged = dict(headers, **{"webhook-signature": "v1,Zm9yZ2Vk"})
        status, refused = await self.post("/v1/events", raw, forged)
        self.out.write(f"→ a forged signature\n  {status}: {refused['error']}\n")
        return answers

    async def show_card(self, channel: str, heading: str, *, latest: bool = False) -> str:
        cards = [m for m in self.slack.messages(channel) if not m.thread_ts]
        message = cards[-1] if latest else cards[0]
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
        async with self.http.post(
            f"{self.base}/slack/events", data=body, headers=headers
        ) as response:
            await response.read()
        took = (time.perf_counter() - started) * 1000
        self.out.write(
            f"→ {USERS[user]['real_name']} clicks Approve: acked {response.status} "
            f"in {took:.1f} ms\n"
        )
        seen = len(self.slack.ephemerals)
        await asyncio.sleep(0.3)
        for note in self.slack.ephemerals[seen:]:
            self.out.write(f"  (only {USERS[note.user]['real_name']} sees) {note.text}\n")

    async def github_deployment(self, secret: str) -> dict[str, Any]:
        """GitHub asking whether a workflow run may deploy, signed as GitHub signs it."""
        raw = (GITHUB_FIXTURES / "deployment_protection_rule.requested.json").read_bytes()
        digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        headers = {
            "content-type": "application/json",
            "X-GitHub-Event": "deployment_protection_rule",
            "X-GitHub-Delivery": str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={digest}",
        }
        status, answered = await self.post("/hooks/github", raw, headers)
        [answer] = answered["requests"]
        self.out.write(
            f"→ GitHub: may workflow run 5453085689 deploy sample-app to production?\n"
            f"  {status}: {answer['decision']} by rule {answer['rule']}\n"
        )
        return {**answer, "version": await self._version(answer["request_id"])}

    async def alerts(self, name: str, token: str) -> dict[str, Any]:
        raw = (ALERT_FIXTURES / name).read_bytes()
        headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
        _, answer = await self.post("/hooks/alertmanager", raw, headers)
        return answer

    async def _version(self, request_id: str) -> str:
        async with self.services.sessions() as session:
            view = await get_request(session, request_id)
        return view.request.version

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
        channels={"C0FINANCE", "C0DEPLOYS", "C0ONCALL", "C0APPROVALS"},
        users=USERS,
        usergroups=GROUPS,
        usergroup_handles=HANDLES,
    )
    await slack.start()
    # A throwaway GitHub App: its key exists for this run only.
    app_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    github = GitHubStandIn(app_id=GITHUB_APP_ID, public_key=app_key.public_key())
    await github.start()
    github_secret, alert_token = secrets.token_hex(16), secrets.token_urlsafe(24)
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
            GITHUB_WEBHOOK_SECRET=github_secret,
            GITHUB_APP_ID=GITHUB_APP_ID,
            GITHUB_APP_PRIVATE_KEY=app_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
            GITHUB_API_URL=github.url,
            # The Alertmanager hook with a token and no ALERTMANAGER_URL: cards, no silences.
            ALERTMANAGER_WEBHOOK_TOKEN=alert_token,
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
            async with aiohttp.ClientSession() as http:
                demo = Demo(base, services, slack, source, verifier, signing_secret, out, http)
                await _story(demo, f"http://127.0.0.1:{source_port}/approvals")
                await _github_story(demo, github, github_secret)
                await _alert_story(demo, alert_token)
                await _summary(demo, demo.answers)
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
            await github.stop()
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
    demo.answers.extend(answers)


async def _github_story(demo: Demo, github: GitHubStandIn, secret: str) -> None:
    out = demo.out
    out.write("\nGitHub deployment protection rule:\n")
    request = await demo.github_deployment(secret)
    demo.answers.append({**request, "title": "GitHub: deploy sample-app to production"})
    await demo.wait(lambda: len(demo.slack.messages("C0DEPLOYS")) >= 2)
    ts = await demo.show_card("C0DEPLOYS", "GitHub asks", latest=True)
    await demo.click(request, "C0DEPLOYS", ts, "USRE")
    [review] = await github.wait_for_reviews(1)
    out.write(
        f"  ← GitHub API got the review for run {review.run_id}: {review.body['state']} "
        f"({review.body['environment_name']}), with an installation token\n"
        f"    comment: {review.body['comment'].splitlines()[0]}\n"
    )


async def _alert_story(demo: Demo, token: str) -> None:
    out = demo.out
    out.write("\nAlertmanager:\n")
    firing = await demo.alerts("firing.json", token)
    for answer in firing["requests"]:
        demo.answers.append({**answer, "title": "Alert DiskRunningFull"})
    out.write(f"→ two alerts firing: {len(firing['requests'])} requests routed to #C0ONCALL\n")
    await demo.wait(lambda: len(demo.slack.messages("C0ONCALL")) >= 2)
    await demo.show_card("C0ONCALL", "An alert")
    resolved = await demo.alerts("resolved.json", token)
    out.write(
        f"→ one alert resolved: {len(resolved['cancelled'])} request cancelled, "
        "its card says so; the other fired again (a new version supersedes the old)\n"
    )
    for answer in resolved["requests"]:
        demo.answers.append({**answer, "title": "Alert DiskRunningFull (fired again)"})
    await demo.wait(lambda: len(demo.slack.calls_to("chat.update")) >= 3)


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
