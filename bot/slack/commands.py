"""`/signoff`: one place that reads the command, authorizes it, acts through storage and says
what happened. The answer goes back in the ack (ephemeral): every subcommand is a few indexed
queries, well inside the three seconds Slack gives a slash command.

Who may do what: anyone in the workspace may read (`status`, `pending`, `mine`), as anyone in a
channel can read its cards; `replay` changes state, so it is for `SIGNOFF_OPERATORS` only, and
both a replay and a refused one are audited with the Slack user as the actor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.slack.client import SlackFailure
from bot.slack.command_blocks import (
    LIST_MAX,
    Answer,
    echo,
    help_answer,
    list_answer,
    note_answer,
    status_answer,
)
from bot.slack.directory import Directory
from bot.slack.mrkdwn import escape_mrkdwn
from policies.model import Route
from storage import audit, outbox
from storage.audit import AuditEntry
from storage.errors import InvalidTransition, NotFound
from storage.queries import PendingItem, pending_in_channel, unvoted_pending
from storage.requests import get_request, get_status

log = logging.getLogger(__name__)

# Ids are `r_` / `j_` and 16 characters; anything much longer is not one of ours.
ID_MAX = 40


class Commands:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        directory: Directory,
        operators: frozenset[str],
        card_kind: str,
        on_change: Callable[[str], None] = lambda _request_id: None,
    ) -> None:
        self._sessions = sessions
        self._directory = directory
        self._operators = operators
        self._card_kind = card_kind
        # Wakes the outbox worker (and long polls) after a replay queued something.
        self._on_change = on_change

    async def answer(self, *, user_id: str, channel_id: str, text: str) -> Answer:
        words = text.split()
        sub = words[0].lower() if words else "help"
        args = words[1:]
        now = datetime.now(UTC)
        if sub == "help":
            return help_answer()
        if sub in ("pending", "mine") and args:
            return help_answer(f"`{sub}` takes no arguments")
        if sub == "pending":
            return await self._pending(channel_id, now)
        if sub == "mine":
            return await self._mine(user_id, now)
        if sub == "replay" and user_id not in self._operators:
            # Refused before the id is even looked at: a non-operator learns nothing from it.
            return await self._refuse_replay(user_id, " ".join(args), now)
        if sub in ("status", "replay"):
            if len(args) != 1:
                return help_answer(f"`{sub}` needs one id")
            if len(args[0]) > ID_MAX:
                return help_answer(f"`{echo(args[0])}` is not a request or job id")
            if sub == "status":
                return await self._status(args[0], now)
            return await self._replay(user_id, args[0], now)
        return help_answer(f"unknown command `{echo(sub)}`")

    async def _status(self, request_id: str, now: datetime) -> Answer:
        try:
            async with self._sessions() as session:
                view = await get_request(session, request_id)
        except NotFound:
            return help_answer(f"no request `{echo(request_id)}`")
        return status_answer(view, now=now)

    async def _pending(self, channel_id: str, now: datetime) -> Answer:
        async with self._sessions() as session:
            page = await pending_in_channel(session, channel_id, limit=LIST_MAX)
        return list_answer(
            "*Pending in this channel*, oldest first",
            page.items,
            total=page.total,
            now=now,
            empty="Nothing is waiting here.",
        )

    async def _mine(self, user_id: str, now: datetime) -> Answer:
        """Pending requests the caller may approve and has not voted on.

        A route lists its approvers as users or Slack user groups; each distinct group is looked
        up once per command (through the directory's cache). A request the caller started is
        left out when the route forbids the actor and the directory already knows who the actor
        is without asking Slack; otherwise it is listed, and the card refuses the click.
        """
        async with self._sessions() as session:
            candidates = await unvoted_pending(session, user_id)
        membership: dict[str, bool] = {}
        unreachable: list[str] = []
        mine: list[PendingItem] = []
        for candidate in candidates:
            route = Route.model_validate(candidate.route)
            if not await self._may_approve(user_id, route, membership, unreachable):
                continue
            if "actor" in route.forbid:
                actor = self._directory.known_user_for(
                    actor_id=candidate.actor_id, email=candidate.actor_email
                )
                if actor == user_id:
                    continue
            mine.append(candidate.item)
        answer = list_answer(
            "*Waiting for your approval*, oldest first",
            mine,
            total=len(mine),
            now=now,
            empty="Nothing is waiting for you.",
            show_channel=True,
        )
        if unreachable:
            groups = ", ".join(f"`{echo(group)}`" for group in unreachable[:5])
            warning = f":warning: Slack did not say who is in {groups}: this list may be short."
            answer.blocks.insert(1, note_answer(warning).blocks[0])
        return answer

    async def _may_approve(
        self, user_id: str, route: Route, membership: dict[str, bool], unreachable: list[str]
    ) -> bool:
        for entry in route.approvers:
            if entry.users is not None and user_id in entry.users:
                return True
            if entry.group is None:
                continue
            if entry.group not in membership:
                try:
                    membership[entry.group] = await self._directory.in_group(user_id, entry.group)
                except SlackFailure:
                    # A list is still worth showing without this group; say it is incomplete.
                    log.warning("could not read user group %s", entry.group, exc_info=True)
                    membership[entry.group] = False
                    unreachable.append(entry.group)
            if membership[entry.group]:
                return True
        return False

    async def _refuse_replay(self, user_id: str, target: str, now: datetime) -> Answer:
        entry = AuditEntry(
            kind="operator.replay_refused",
            actor=f"slack:{user_id}",
            data={"target": target[:100], "reason": "not in SIGNOFF_OPERATORS"},
            at=now,
        )
        async with self._sessions.begin() as session:
            await audit.append(session, [entry])
        return note_answer(
            ":no_entry: Only operators may replay, and you are not one"
            " (`SIGNOFF_OPERATORS` lists them). Nothing was changed."
        )

    async def _replay(self, user_id: str, ident: str, now: datetime) -> Answer:
        """A job id replays that dead job; a request id replays each of its dead jobs and
        queues its card if it was never queued (`signoff replay` does the same, minus the card)."""
        operator = f"slack:{user_id}"
        if ident.startswith("j_"):
            try:
                job = await outbox.replay(self._sessions, ident, operator=operator, now=now)
            except NotFound:
                return help_answer(f"no job `{echo(ident)}`")
            except InvalidTransition as exc:
                return note_answer(
                    f":information_source: {escape_mrkdwn(str(exc))}. Nothing was changed."
                )
            if job.request_id:
                self._on_change(job.request_id)
            return note_answer(f":repeat: Re-queued `{job.id}` ({escape_mrkdwn(job.kind)}).")
        async with self._sessions() as session:
            if await get_status(session, ident) is None:
                return help_answer(f"no request or job `{echo(ident)}`")
            dead = await outbox.dead_jobs_of(session, ident)
        lines = []
        for job_id in dead:
            try:
                job = await outbox.replay(self._sessions, job_id, operator=operator, now=now)
            except InvalidTransition:
                continue  # another operator replayed it a moment ago: it is queued either way
            lines.append(f":repeat: Re-queued `{job.id}` ({escape_mrkdwn(job.kind)})")
        card = await outbox.queue_lost_card(
            self._sessions, ident, kind=self._card_kind, operator=operator, now=now
        )
        if card is not None:
            lines.append(f":repeat: Queued the card, which was never posted (`{card}`)")
        if not lines:
            return note_answer(
                f"Nothing to replay for `{escape_mrkdwn(ident)}`: no dead jobs, and its card is"
                " posted or on its way. Nothing was changed."
            )
        self._on_change(ident)
        return note_answer("\n".join(lines))
