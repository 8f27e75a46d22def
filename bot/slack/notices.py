"""Outbox handlers for what timers and schedules say in Slack: SLA breaches, escalations and
expiry warnings in the card's thread and by DM, and channel digests.

Each renders from the database when it runs. A notice for a request decided meanwhile is
dropped (the card already says the outcome); a reminder DM skips whoever has voted.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.clock import Clock
from bot.slack.blocks import span
from bot.slack.cards import progress_line
from bot.slack.client import SlackFailure, classify
from bot.slack.digest import digest_message
from bot.slack.directory import Directory
from bot.slack.jobs import SlackJobHandlers
from bot.slack.mrkdwn import date, escape_mrkdwn, group, is_group_id, is_user_id, user
from connectors.base import SyncReceipt
from policies.model import OnExpiry, Route, format_duration
from storage.digests import digest_stats
from storage.models import RequestStatus
from storage.outbox import ClaimedJob
from storage.requests import RequestView
from storage.timers import NoticeKind, TimerJobs

NOTICE = "slack.notice"
NOTICE_DM = "slack.notice_dm"
DIGEST = "slack.digest"
TIMER_JOBS = TimerJobs(
    notice=NOTICE,
    notice_dm=NOTICE_DM,
    update_card="slack.update_card",
    dm_outcome="slack.dm_outcome",
)

_EXPIRY_WORDS = {
    OnExpiry.expire: "it expires",
    OnExpiry.approve: "it is approved automatically (the route says so)",
    OnExpiry.reject: "it is rejected automatically (the route says so)",
}


class NoticeHandlers:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        client: AsyncWebClient,
        directory: Directory,
        cards: SlackJobHandlers,
        clock: Clock,
    ) -> None:
        self._sessions = sessions
        self._client = client
        self._directory = directory
        self._cards = cards
        self._clock = clock

    def handlers(self) -> dict[str, Any]:
        return {NOTICE: self.notice, NOTICE_DM: self.notice_dm, DIGEST: self.digest}

    async def _mention(self, target: str) -> str:
        """A real ping for a user id, a group id or a group handle Slack knows; else inert."""
        if is_user_id(target):
            return user(target)
        try:
            group_id = target if is_group_id(target) else await self._directory.group_id(target)
        except SlackFailure as exc:
            raise classify("usergroups.list", exc) from exc
        return group(group_id or target)

    async def _text(self, view: RequestView, kind: NoticeKind, level: int) -> tuple[str, str]:
        """(thread text, DM text) for a notice."""
        request = view.request
        route = Route.model_validate(request.route)
        title = escape_mrkdwn(request.title[:200])
        channel = f"<#{request.card_channel}>" if request.card_channel else "its channel"
        if kind is NoticeKind.escalation:
            step = route.escalate[level - 1]
            mentions = ", ".join([await self._mention(t) for t in step.notify])
            thread = (
                f":rotating_light: *Escalation, level {level}:* still pending after "
                f"{format_duration(step.after)}. {mentions}, please decide or find someone who can."
            )
            dm = (
                f":rotating_light: You are on escalation level {level} for *{title}*, pending "
                f"for {format_duration(step.after)} in {channel}. Still needed: "
                f"{progress_line(route, view.votes)}."
            )
            return thread, dm
        if kind is NoticeKind.sla_breached:
            sla = format_duration(route.sla) if route.sla else "its SLA"
            needs = progress_line(route, view.votes)
            thread = f":alarm_clock: *SLA of {sla} breached.* Still needed: {needs}."
            dm = (
                f":alarm_clock: *{title}* is past its SLA of {sla} in {channel} and still "
                f"needs your decision ({needs})."
            )
            return thread, dm
        expires = request.expires_at.replace(tzinfo=UTC) if request.expires_at else None
        when = f"{date(expires)} (in {span(expires - self._clock.now())})" if expires else "soon"
        thread = (
            f":hourglass: *Expires {when}.* Without a decision by then, "
            f"{_EXPIRY_WORDS[route.on_expiry]}."
        )
        return thread, thread

    async def _pending_view(self, job: ClaimedJob) -> RequestView | None:
        view = await self._cards.view(job)
        return view if view.request.status == RequestStatus.pending.value else None

    async def notice(self, *, job: ClaimedJob) -> SyncReceipt:
        view = await self._pending_view(job)
        if view is None:
            return SyncReceipt(detail="decided meanwhile: nothing to say")
        channel, ts = await self._cards.require_card(view)
        kind, level = NoticeKind(job.payload["notice"]), int(job.payload.get("level", 0))
        thread, _ = await self._text(view, kind, level)
        await self._cards.call("chat.postMessage", channel=channel, thread_ts=ts, text=thread)
        return SyncReceipt(detail=f"{kind.value} posted in the thread")

    async def notice_dm(self, *, job: ClaimedJob) -> SyncReceipt:
        view = await self._pending_view(job)
        if view is None:
            return SyncReceipt(detail="decided meanwhile: nobody to remind")
        kind, level = NoticeKind(job.payload["notice"]), int(job.payload.get("level", 0))
        target = str(job.payload["target"])
        try:
            users = (
                [target] if is_user_id(target) else sorted(await self._directory.members(target))
            )
        except SlackFailure as exc:
            raise classify("usergroups.users.list", exc) from exc
        voted = {vote.user_id for vote in view.votes}
        _, text = await self._text(view, kind, level)
        sent = 0
        for member in users:
            if member in voted:
                continue
            opened = await self._cards.call("conversations.open", users=member)
            await self._cards.call("chat.postMessage", channel=opened["channel"]["id"], text=text)
            sent += 1
        return SyncReceipt(detail=f"{kind.value}: {sent} DM(s) for {target}")

    async def digest(self, *, job: ClaimedJob) -> SyncReceipt:
        channel = str(job.payload["channel"])
        since = datetime.fromisoformat(str(job.payload["since"]))
        until = datetime.fromisoformat(str(job.payload["until"]))
        now = self._clock.now()
        async with self._sessions() as session:
            stats = await session.run_sync(
                lambda s: digest_stats(s, channel=channel, since=since, until=until, now=now)
            )
        text, blocks = digest_message(stats, now=now)
        await self._cards.call("chat.postMessage", channel=channel, text=text, blocks=blocks)
        return SyncReceipt(detail=f"digest posted to {channel}")
