"""The Slack app: Bolt listeners for the card's buttons, the reject modal and `/signoff`.

Bolt runs with `process_before_response=True`: a listener finishes before Slack gets its answer,
so the answer (the ack) is sent as soon as the vote is durable, with no polling. By default
Bolt's async dispatch polls for `ack()` every 10 ms, which put a floor of ~11 ms under every
click. Anything slow (opening a modal, an ephemeral note) runs after the ack, in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response
from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.request.async_request import AsyncBoltRequest
from slack_bolt.request.internals import parse_body
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.slack.cards import (
    APPROVE_ACTION,
    DETAILS_ACTION,
    REJECT_ACTION,
    SILENCE_ACTION,
    parse_button_value,
)
from bot.slack.clicks import Click, ClickService
from bot.slack.client import SlackFailure, close_client
from bot.slack.commands import Commands
from bot.slack.modals import (
    DURATION_ACTION,
    DURATION_BLOCK,
    REASON_ACTION,
    REASON_BLOCK,
    REASON_MIN,
    REJECT_CALLBACK,
    SILENCE_CALLBACK,
    build_details_modal,
    build_reject_modal,
    build_silence_modal,
)
from bot.slack.payload import shape_problem
from connectors.alertmanager.silences import DURATIONS
from storage.errors import NotFound
from storage.requests import RequestView, get_request
from storage.votes import Choice, Refusal

log = logging.getLogger(__name__)


def _user(body: dict[str, Any]) -> tuple[str, str]:
    user = body.get("user") or {}
    return str(user.get("id", "")), str(user.get("name") or user.get("username") or "")


def _submitted(body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(private metadata, state values) of a modal submission; {} for anything not ours."""
    view = body.get("view") or {}
    try:
        meta = json.loads(view.get("private_metadata") or "{}")
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        meta = {}  # not ours: the vote is refused as not found
    values = (view.get("state") or {}).get("values") or {}
    return meta, values if isinstance(values, dict) else {}


def _where(body: dict[str, Any]) -> tuple[str, str]:
    """(channel, message ts) of the card a button was clicked on."""
    container = body.get("container") or {}
    channel = container.get("channel_id") or (body.get("channel") or {}).get("id", "")
    ts = container.get("message_ts") or (body.get("message") or {}).get("ts", "")
    return str(channel), str(ts)


def _reason(values: dict[str, Any]) -> str:
    entered = (values.get(REASON_BLOCK, {}).get(REASON_ACTION, {}) or {}).get("value") or ""
    return str(entered).strip()


def _refused(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _WithoutTokenNotice(logging.Filter):
    """Bolt warns "`token` will be unused" whenever SLACK_BOT_TOKEN is in the environment and a
    client is given, which is always so here: the client carries that very token. It warns
    "`token` ... will be ignored" when `authorize` is given: `_authorize` returns that token."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "`token` will be unused" not in message and "will be ignored" not in message


_bolt_log = logging.getLogger("signoff.slack.bolt")
_bolt_log.addFilter(_WithoutTokenNotice())


class SlackBot:
    def __init__(
        self,
        *,
        client: AsyncWebClient,
        signing_secret: str,
        sessions: async_sessionmaker[AsyncSession],
        clicks: ClickService,
        commands: Commands,
    ) -> None:
        self._client = client
        self._sessions = sessions
        self._clicks = clicks
        self._commands = commands
        self._tasks: set[asyncio.Task[None]] = set()
        # Requests Bolt is handling now, over HTTP or Socket Mode: close() lets them finish.
        # slack_sdk's Socket Mode client does not track the envelopes it hands to Bolt.
        self._handling = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._identity: AuthorizeResult | None = None

        # Bolt passes arguments by the names in the function's signature, which for a bound
        # method includes `self`: hand it a plain function.
        async def authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
            return await self._authorize(enterprise_id, team_id)

        self._verifier = SignatureVerifier(signing_secret)
        self.app = AsyncApp(
            client=client,
            signing_secret=signing_secret,
            authorize=authorize,
            process_before_response=True,
            logger=_bolt_log,
        )
        self.app.action(APPROVE_ACTION)(self._tracked(self._on_approve))
        self.app.action(REJECT_ACTION)(self._tracked(self._on_reject))
        self.app.action(DETAILS_ACTION)(self._tracked(self._on_details))
        self.app.action(SILENCE_ACTION)(self._tracked(self._on_silence))
        self.app.view(REJECT_CALLBACK)(self._tracked(self._on_reject_reason))
        self.app.view(SILENCE_CALLBACK)(self._tracked(self._on_silence_choice))
        self.app.command("/signoff")(self._tracked(self._on_command))
        self.app.event("app_uninstalled")(self._on_uninstalled)
        self.app.event("tokens_revoked")(self._on_uninstalled)

    async def _authorize(self, enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
        """Bolt's own single-workspace authorization calls auth.test on the first request and,
        when Slack is rate-limiting or away at that moment, answers the click with "reinstall
        this app" and drops it, unaudited (found by the fault suite: the first click after a
        restart, during a rate limit). Every request is already verified by its signature and
        the app has one token; auth.test only adds the bot's ids, so it is asked once, and a
        failure does not stop the request."""
        token = self._client.token
        if self._identity is None:
            try:
                answer = await self._client.auth_test()
            except SlackFailure:
                log.warning("auth.test failed; going on without the bot's ids", exc_info=True)
                return AuthorizeResult(
                    enterprise_id=enterprise_id, team_id=team_id, bot_token=token
                )
            self._identity = AuthorizeResult.from_auth_test_response(
                auth_test_response=answer, bot_token=token
            )
        return self._identity

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp route for `POST /slack/events`: Slack's signature, then the payload's
        shape (`bot.slack.payload`), then Bolt. Bolt verifies the signature again; it is checked
        here first because Bolt parses the body before verifying it, and a body that does not
        parse (a `payload=` that is not JSON, bytes that are not UTF-8) made that a 500."""
        raw = await request.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _refused(401, "invalid request")  # Slack signs UTF-8 text: this is not it
        timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
        signature = request.headers.get("X-Slack-Signature", "")
        # slack_sdk's verifier calls int() on the timestamp: anything but digits is refused here.
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            return _refused(401, "invalid request")
        if not self._verifier.is_valid(body=text, timestamp=timestamp, signature=signature):
            return _refused(401, "invalid request")
        # Bolt's request is built here, not by the adapter, so the body is parsed once: the
        # URL-encoded JSON of a click took a tenth of its CPU, parsed twice. Bolt reads ids out
        # of the payload as it builds the request, which a payload shaped unlike Slack's can
        # break: then the body is parsed on its own to say what is wrong with it.
        bolt_request: AsyncBoltRequest | None
        try:
            bolt_request = AsyncBoltRequest(
                body=text,
                query=request.query_string,
                headers=request.headers,  # type: ignore[arg-type]
            )
            body: Any = bolt_request.body
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            bolt_request = None
            try:
                body = parse_body(text, request.content_type)
            except ValueError:
                return _refused(400, "payload is not JSON")
        if not isinstance(body, dict):
            return _refused(400, "payload is not a JSON object")
        problem = shape_problem(body)
        if problem is None and bolt_request is None:
            problem = "the payload is not shaped like anything Slack sends"
        if problem is not None:
            log.info("refused a signed Slack payload: %s", problem)
            return _refused(400, problem)
        assert bolt_request is not None
        return await to_aiohttp_response(await self.app.async_dispatch(bolt_request))

    def _tracked(self, listener: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        """The listener, counted while it runs. Bolt runs listeners after its middleware
        chain has returned, so the count has to be taken here, around each one; Bolt still
        sees the listener's own arguments through `functools.wraps`."""

        @functools.wraps(listener)
        async def run(**kwargs: Any) -> None:
            self._handling += 1
            self._idle.clear()
            try:
                await listener(**kwargs)
            finally:
                self._handling -= 1
                if not self._handling:
                    self._idle.set()

        return run

    async def close(self, grace: float = 10.0) -> None:
        """Let clicks being handled commit their votes (their acks may go unsent: Slack then
        shows an error, and the vote is there), then the work queued after acks."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._idle.wait()
        if self._handling:
            log.warning("%d Slack request(s) still running at shutdown", self._handling)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)

    async def close_client(self) -> None:
        """After `close` and after the outbox worker has stopped: they call Slack through it."""
        await close_client(self._client)

    def _later(self, work: Coroutine[Any, Any, object]) -> None:
        """Run after the ack; keep a reference so the task is not collected mid-flight."""
        task = asyncio.create_task(self._guard(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, work: Awaitable[object]) -> None:
        try:
            await work
        except SlackFailure:
            # Best effort by design (an ephemeral note, a modal); the vote itself is durable
            # and audited whatever happens here.
            log.warning("a Slack call after a click failed", exc_info=True)

    def _tell(self, body: dict[str, Any], text: str) -> None:
        user, _ = _user(body)
        channel, _ = _where(body)
        if channel and user:
            self._later(self._client.chat_postEphemeral(channel=channel, user=user, text=text))

    @staticmethod
    def _click(body: dict[str, Any], choice: Choice, reason: str = "") -> Click | None:
        actions = body.get("actions") or [{}]
        parsed = parse_button_value(str(actions[0].get("value", "")))
        if parsed is None:
            return None
        user_id, user_name = _user(body)
        return Click(parsed[0], parsed[1], user_id, user_name, choice, reason)

    async def _on_approve(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        click = self._click(body, Choice.approve)
        if click is None:
            await ack()
            self._tell(body, "This button is not one of Signoff's.")
            return
        outcome = await self._clicks.vote(click)
        await ack()
        if isinstance(outcome, Refusal):
            self._tell(body, f":no_entry: {outcome.value}. Nothing was changed.")

    async def _on_reject(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await self._ask(ack, body, Choice.reject, build_reject_modal)

    async def _on_silence(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await self._ask(ack, body, Choice.approve, build_silence_modal)

    async def _ask(
        self,
        ack: AsyncAck,
        body: dict[str, Any],
        choice: Choice,
        build: Callable[..., dict[str, Any]],
    ) -> None:
        """Open the modal that completes this vote, unless the click would be refused anyway:
        nobody types a reason for a click that cannot count."""
        click = self._click(body, choice)
        await ack()
        if click is None:
            self._tell(body, "This button is not one of Signoff's.")
            return
        refusal = await self._clicks.precheck(click)
        if refusal is not None:
            self._tell(body, f":no_entry: {refusal.value}. Nothing was changed.")
            return
        channel, ts = _where(body)
        async with self._sessions() as session:
            view: RequestView = await get_request(session, click.request_id)
        modal = build(view, channel=channel, ts=ts)
        self._later(self._open(str(body.get("trigger_id", "")), modal))

    async def _open(self, trigger_id: str, view: dict[str, Any]) -> None:
        await self._client.views_open(trigger_id=trigger_id, view=view)

    async def _on_details(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        click = self._click(body, Choice.approve)
        if click is None:
            return
        try:
            async with self._sessions() as session:
                view = await get_request(session, click.request_id)
        except NotFound:
            self._tell(body, "This request no longer exists.")
            return
        self._later(self._open(str(body.get("trigger_id", "")), build_details_modal(view)))

    async def _on_reject_reason(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        meta, values = _submitted(body)
        reason = _reason(values)
        if len(reason) < REASON_MIN:
            await ack(response_action="errors", errors={REASON_BLOCK: "Say why, in a few words."})
            return
        await self._vote_from_modal(ack, body, meta, Choice.reject, reason)

    async def _on_silence_choice(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        meta, values = _submitted(body)
        picked = (
            values.get(DURATION_BLOCK, {}).get(DURATION_ACTION, {}).get("selected_option") or {}
        ).get("value")
        if picked not in DURATIONS:
            # Slack only sends the options we offered; anything else was not typed in our modal.
            await ack(response_action="errors", errors={DURATION_BLOCK: "Pick a duration."})
            return
        reason = _reason(values)
        if len(reason) < REASON_MIN:
            await ack(response_action="errors", errors={REASON_BLOCK: "Say why, in a few words."})
            return
        await self._vote_from_modal(
            ack, body, meta, Choice.approve, reason, params={"silence": picked}
        )

    async def _vote_from_modal(
        self,
        ack: AsyncAck,
        body: dict[str, Any],
        meta: dict[str, Any],
        choice: Choice,
        reason: str,
        params: dict[str, Any] | None = None,
    ) -> None:
        user_id, user_name = _user(body)
        click = Click(
            str(meta.get("r", "")),
            str(meta.get("v", "")),
            user_id,
            user_name,
            choice,
            reason,
            params or {},
        )
        outcome = await self._clicks.vote(click)
        if isinstance(outcome, Refusal):
            await ack(response_action="errors", errors={REASON_BLOCK: f"{outcome.value}."})
            return
        await ack()

    async def _on_command(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        answer = await self._commands.answer(
            user_id=str(body.get("user_id", "")),
            channel_id=str(body.get("channel_id", "")),
            text=str(body.get("text", "")),
        )
        await ack(**answer.as_ack())

    async def _on_uninstalled(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        event = (body.get("event") or {}).get("type", "?")
        # Loud on purpose: from now on every card post will dead-letter.
        log.error("Slack sent %s: no card can be posted; reinstall from manifest.yml", event)
