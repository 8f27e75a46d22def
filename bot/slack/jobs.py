"""Outbox handlers for everything Signoff says in Slack: post the card, update it, reply in its
thread, tell the requester the outcome. Each renders from the database when it runs, so a
retried or replayed job sends the request as it stands, never a stale copy."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from slack_sdk.errors import SlackObjectFormationError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from bot.slack.cards import build_card, outcome_dm, vote_reply_text
from bot.slack.client import SlackFailure, classify
from bot.slack.directory import Directory
from connectors.errors import RetryableSyncError, TerminalSyncError
from storage.db import TransactionRunner
from storage.errors import NotFound
from storage.models import OutboxJob, Request, RequestStatus
from storage.outbox import ClaimedJob
from storage.requests import EventCache, RequestView, VoteCache, read_request
from storage.votes import SlackJobs, reply_votes

POST_CARD = "slack.post_card"
UPDATE_CARD = "slack.update_card"
THREAD_REPLY = "slack.thread_reply"
DM_OUTCOME = "slack.dm_outcome"
JOBS = SlackJobs(update_card=UPDATE_CARD, thread_reply=THREAD_REPLY, dm_outcome=DM_OUTCOME)
# How often a card's ts that could not be stored (the database is away) is tried again.
STORE_RETRY = timedelta(seconds=0.5)
# How often one card update sends again because the request changed while it was sent.
_RESENDS = 4

log = logging.getLogger(__name__)


class SlackJobHandlers:
    def __init__(
        self, client: AsyncWebClient, directory: Directory, runner: TransactionRunner
    ) -> None:
        # Reads and writes go through the runner: one hop for the request and its votes.
        # Through the async sessions each query was a hop of its own, and on SQLite the read's
        # transaction held the database's write lock across all of them while the event loop
        # was busy, so a click's vote waited for a card update's read (half its time at one
        # connection). Reads are `read_only` units: they take no write lock at all.
        self._runner = runner
        self._events = EventCache()
        self._votes = VoteCache()
        self._client = client
        self._directory = directory
        # Per request: [its lock, how many updates hold or wait for it].
        self._card_locks: dict[str, list[Any]] = {}

    @contextlib.asynccontextmanager
    async def _one_update_at_a_time(self, request_id: str) -> AsyncIterator[None]:
        """Updates of one card render and send one after another. Concurrent updates could
        otherwise land in any order (a rate-limited one is re-sent by the client after its
        Retry-After), and an older render landing last would show a stale card, buttons and
        all, for a decided request. In sequence, the last one sent is the last one rendered."""
        entry = self._card_locks.setdefault(request_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._card_locks[request_id]

    def handlers(self) -> dict[str, Any]:
        return {
            POST_CARD: self.post_card,
            UPDATE_CARD: self.update_card,
            THREAD_REPLY: self.thread_reply,
            DM_OUTCOME: self.dm_outcome,
        }

    async def view(self, job: ClaimedJob) -> RequestView:
        """The request and its votes as they are now (not its outbox jobs: nothing Signoff
        says in Slack shows them, except `/signoff status`, which reads its own)."""
        request_id = str(job.payload["request_id"])
        try:
            return await self._runner.run(
                lambda session: read_request(
                    session, request_id, jobs=False, events=self._events, votes=self._votes
                ),
                background=True,
                read_only=True,
            )
        except NotFound:
            raise TerminalSyncError(f"request {request_id} no longer exists") from None

    async def call(self, method: str, **kwargs: Any) -> Any:
        try:
            return await self._client.api_call(method, json=kwargs)
        except SlackFailure as exc:
            raise classify(method, exc) from exc

    def _card_payload(self, view: RequestView, now: datetime | None = None) -> dict[str, Any]:
        try:
            return build_card(view, now=now or datetime.now(UTC)).as_payload()
        except SlackObjectFormationError as exc:
            # A card we cannot build will not build on retry either: say so and stop.
            raise TerminalSyncError(f"the card breaks a Slack limit: {exc}") from exc

    async def post_card(self, *, job: ClaimedJob) -> None:
        view = await self.view(job)
        request = view.request
        if request.card_ts:
            # Posted by an earlier attempt that crashed before finishing: bring it up to date.
            await self._update(job)
            return
        if request.route is None:
            raise TerminalSyncError(f"request {request.id} has no route, so no channel")
        channel = str(request.route["channel"])
        response = await self.call("chat.postMessage", channel=channel, **self._card_payload(view))
        await self._remember_card(job, request.id, str(response["channel"]), str(response["ts"]))
        view = await self.view(job)
        if view.request.status != RequestStatus.pending.value:
            # Decided (or superseded) while the post was in flight: show the outcome.
            await self._update(job)

    async def _remember_card(self, job: ClaimedJob, request_id: str, channel: str, ts: str) -> None:
        """Store where the card went. The post is done and Slack cannot dedupe a second one:
        if this write were lost (the database restarting, failing over), the job's retry
        would post the card again. So a database that is away is waited for while the job's
        claim lasts, as the worker does for outcomes."""
        remember = (
            update(Request)
            .where(Request.id == request_id, Request.card_ts.is_(None))
            .values(card_channel=channel, card_ts=ts)
        )
        while True:
            try:
                # Through the runner, as every other write of the outbox's: on SQLite one hop
                # on the database thread, under its WriterLock, instead of holding SQLite's
                # write lock across event-loop hops where the other process's writes sleep.
                await self._runner.run(lambda session: session.execute(remember), background=True)
                return
            except (SQLAlchemyError, OSError):
                if datetime.now(UTC) + STORE_RETRY >= job.locked_until:
                    raise
                log.warning("card of %s posted, storing its ts failed; retrying", request_id)
                await asyncio.sleep(STORE_RETRY.total_seconds())

    async def require_card(self, view: RequestView) -> tuple[str, str]:
        request = view.request
        if request.card_channel and request.card_ts:
            return request.card_channel, request.card_ts
        post = await self._runner.run(
            lambda session: session.scalar(
                select(OutboxJob.status).where(OutboxJob.idempotency_key == f"card-{request.id}")
            ),
            background=True,
            read_only=True,
        )
        if post is None:
            raise TerminalSyncError(f"request {request.id} has no card to update")
        # Updates and replies wait for the card, so they always land after it, in order.
        raise RetryableSyncError(f"the card of {request.id} is not posted yet ({post})")

    async def _update(self, job: ClaimedJob) -> None:
        request_id = str(job.payload["request_id"])
        async with self._one_update_at_a_time(request_id):
            # Read inside the lock: the render reflects every change before this update.
            view = await self.view(job)
            channel, ts = await self.require_card(view)
            now = datetime.now(UTC)
            payload = self._card_payload(view, now)
            for _ in range(_RESENDS + 1):
                await self.call("chat.update", channel=channel, ts=ts, **payload)
                if not self._runner.shared:
                    return
                # Replicas: another one's update of this card, rendered later, may have reached
                # Slack first, so this one left the card showing older state (buttons on a
                # decided request). Render again from the database: if the card would read
                # differently, send that. A request changes a bounded number of times (votes,
                # then its decision), so this ends, and the update that reaches Slack last is
                # one that found nothing newer.
                latest = self._card_payload(await self.view(job), now)
                if latest == payload:
                    return
                payload = latest
        raise RetryableSyncError(f"the card of {request_id} kept changing while it was updated")

    async def update_card(self, *, job: ClaimedJob) -> None:
        await self._update(job)

    async def thread_reply(self, *, job: ClaimedJob) -> None:
        view = await self.view(job)
        channel, ts = await self.require_card(view)
        wanted = reply_votes(job.payload)
        votes = [vote for vote in view.votes if vote.id in wanted]
        if len(votes) != len(set(wanted)):
            raise TerminalSyncError(f"votes {wanted} of {view.request.id} no longer all exist")
        await self.call(
            "chat.postMessage", channel=channel, thread_ts=ts, text=vote_reply_text(votes, view)
        )

    async def dm_outcome(self, *, job: ClaimedJob) -> None:
        view = await self.view(job)
        actor = view.event.body.get("actor") or {}
        try:
            user = await self._directory.slack_user_for(
                actor_id=str(actor.get("id", "")), email=str(actor.get("email", ""))
            )
        except SlackFailure as exc:
            raise classify("users.lookupByEmail", exc) from exc
        if user is None:
            return  # the requester is not a Slack user we know: nobody to tell
        opened = await self.call("conversations.open", users=user)
        text, blocks = outcome_dm(view)
        channel = opened["channel"]["id"]
        await self.call("chat.postMessage", channel=channel, text=text, blocks=blocks)
