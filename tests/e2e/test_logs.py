"""`signoff serve` as a real process with every secret set: its log is JSON lines, a correlation
id follows an event from intake to its sync-back, and no secret ever reaches it."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from aiohttp import web

from bot.slack.cards import button_value
from bot.slack.standin import SlackStandIn
from tests.e2e.conftest import API_TOKEN, Serve
from tests.github_support import APP_ID, app_key_pem, github_signed
from tests.integration.conftest import SLACK_USERS
from tests.slack_support import block_action, signed
from tests.support import SECRET, event_body, free_port, sign

BOT_TOKEN = "xoxb-e2e-logs-bot-token-4f8a1c"
SIGNING_SECRET = "e2e-logs-signing-secret-0b7e9d2a"
GITHUB_SECRET = "e2e-logs-github-webhook-secret-77c1"
ALERTMANAGER_TOKEN = "e2e-logs-alertmanager-token-5d3e"


class EchoingSource:
    """A source whose callback endpoint fails with a body that echoes credentials back, as a
    misconfigured proxy or a chatty error page does."""

    def __init__(self) -> None:
        self.port = free_port()
        self.attempts = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/approvals"

    async def _handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        await request.read()
        # Secrets no pattern recognises come first: the answer is cut at 300 bytes.
        echo = (
            f"upstream refused: api={API_TOKEN} am={ALERTMANAGER_TOKEN} gh={GITHUB_SECRET} "
            f"sig={SIGNING_SECRET} bot={BOT_TOKEN} hook={SECRET}"
        )
        return web.Response(status=500, text=echo)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/approvals", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def secrets_of(env: dict[str, str]) -> list[str]:
    pem = env["GITHUB_APP_PRIVATE_KEY"]
    key_lines = [line for line in pem.splitlines() if len(line) > 20 and "PRIVATE KEY" not in line]
    return [
        SECRET,
        SECRET.removeprefix("whsec_"),
        API_TOKEN,
        BOT_TOKEN,
        SIGNING_SECRET,
        GITHUB_SECRET,
        ALERTMANAGER_TOKEN,
        *key_lines,
    ]


async def test_json_lines_correlation_and_no_secrets(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    standin = SlackStandIn(
        token=BOT_TOKEN,
        channels={"C0FINANCE", "C0APPROVALS"},
        users=SLACK_USERS,
        usergroups={"S0FIN": ["UA1", "UA2", "UDANA"], "S0APP": ["UA1", "UA2"]},
        usergroup_handles={"finance-leads": "S0FIN", "approvers": "S0APP"},
    )
    await standin.start()
    source = EchoingSource()
    await source.start()
    port = free_port()
    env = {
        **serve_env,
        "SIGNOFF_PORT": str(port),
        # DEBUG: the libraries' own chatter (HTTP clients, Bolt) must be clean too.
        "SIGNOFF_LOG_LEVEL": "DEBUG",
        "SIGNOFF_LOG_FORMAT": "json",
        "SLACK_BOT_TOKEN": BOT_TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": standin.url,
        "GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
        "GITHUB_APP_ID": APP_ID,
        "GITHUB_APP_PRIVATE_KEY": app_key_pem(),
        "GITHUB_API_URL": "http://127.0.0.1:9",  # never called: no GitHub event is accepted
        "SIGNOFF_MAX_BODY_BYTES": str(256 * 1024),
        "ALERTMANAGER_WEBHOOK_TOKEN": ALERTMANAGER_TOKEN,
    }
    serve = Serve(env, port, tmp_path / "stdout.log")
    errors = tmp_path / "stderr.log"
    try:
        with serve.log.open("ab") as out, errors.open("ab") as err:
            serve.process = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "serve"], env=env, stdout=out, stderr=err
            )
        await _ready(serve, errors)
        async with httpx.AsyncClient(base_url=serve.url, timeout=10) as client:
            # Intake: an auto-approved event whose sync-back fails with the echo, and a routed one.
            raw, headers = sign(
                event_body(attributes={"amount": 50}, callback_url=source.url),
                msg_id="msg_logs_auto",
            )
            auto = (await client.post("/v1/events", content=raw, headers=headers)).json()
            assert auto["status"] == "approved"
            raw, headers = sign(event_body(), msg_id="msg_logs_routed")
            routed = (await client.post("/v1/events", content=raw, headers=headers)).json()
            assert routed["status"] == "pending"
            # Refusals: a forged intake, a GitHub delivery signed with another secret, a wrong
            # Alertmanager token, a Slack request signed with another secret.
            forged = await client.post(
                "/v1/events", content=raw, headers={**headers, "webhook-signature": "v1,AAAA"}
            )
            assert forged.status_code == 401
            raw_gh, gh_headers = github_signed(b"{}", secret="not-" + GITHUB_SECRET)
            assert (
                await client.post("/hooks/github", content=raw_gh, headers=gh_headers)
            ).status_code == 401
            wrong = {"Authorization": "Bearer not-the-token-at-all-0000"}
            assert (
                await client.post("/hooks/alertmanager", content=b"{}", headers=wrong)
            ).status_code == 401
            # Clicks: one refused (not an approver), one counted.
            for user in ("UNOPE", "UA1"):
                body = block_action(
                    action_id="signoff_approve",
                    value=button_value(routed["request_id"], "1"),
                    user=user,
                )
                answer = await client.post(
                    "/slack/events", content=body, headers=signed(body, secret=SIGNING_SECRET)
                )
                assert answer.status_code == 200
            bad_slack = await client.post(
                "/slack/events", content=body, headers=signed(body, secret="another-secret")
            )
            assert bad_slack.status_code == 401
            await _wait_for(errors, "dead-lettered")
            await client.get("/metrics")
        assert source.attempts == 3
        assert serve.stop() == 0
    finally:
        if serve.process is not None:
            serve.stop(signal.SIGKILL)
        await source.stop()
        await standin.stop()

    text = errors.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert lines
    for line in lines:
        assert {"timestamp", "level", "logger", "message", "correlation_id"} <= line.keys()
    for secret in secrets_of(env):
        assert secret not in text, f"a secret reached the log: {secret[:6]}…"
    assert "[redacted]" in text, "the echoed credentials reached the log masked"

    # The auto-approved event: its intake line and its sync-back attempts share one id.
    [intake] = [line for line in lines if line.get("delivery_id") == "webhook:msg_logs_auto"]
    assert intake["correlation_id"] == auto["request_id"]
    attempts = [line for line in lines if line.get("job_kind") == "webhook.callback"]
    assert [line["outcome"] for line in attempts] == ["retry", "retry", "dead"]
    assert {line["correlation_id"] for line in attempts} == {auto["request_id"]}
    # The routed one: intake, the card's post and the counted click.
    routed_lines = [line for line in lines if line["correlation_id"] == routed["request_id"]]
    assert any(line.get("delivery_id") == "webhook:msg_logs_routed" for line in routed_lines)
    assert any(line.get("job_kind") == "slack.post_card" for line in routed_lines)
    assert any("vote by UA1" in line["message"] for line in routed_lines)
    assert any("refused" in line["message"] and "UNOPE" in line["message"] for line in routed_lines)
    refusals = [line for line in lines if line.get("reason") == "bad_signature"]
    assert {line["source"] for line in refusals} >= {"webhook", "github", "alertmanager"}
    assert {r["correlation_id"] for r in refusals if r["source"] == "webhook"} == {
        "webhook:msg_logs_routed"
    }


async def _ready(serve: Serve, errors: Path) -> None:
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            assert serve.process is not None
            if serve.process.poll() is not None:
                raise AssertionError(f"signoff serve exited:\n{errors.read_text()}")
            try:
                if (await client.get(f"{serve.url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"signoff serve did not become ready:\n{errors.read_text()}")


async def _wait_for(path: Path, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never logged:\n{path.read_text()[-3000:]}")
        await asyncio.sleep(0.1)
