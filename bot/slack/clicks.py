"""One place where a click becomes a vote: resolve who the clicker is, authorize against the
route, write the vote durably (with every side effect it causes as outbox jobs), audit refusals.

Listeners call this and nothing else, so authorization and auditing are not copied into each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot import logs
from bot.metrics import Metrics
from bot.slack.client import SlackFailure
from bot.slack.directory import Directory
from policies.model import Route
from storage.db import TransactionRunner, reading
from storage.models import EventRecord, Request, RequestStatus
from storage.votes import (
    Ballot,
    Choice,
    Refusal,
    Refused,
    SlackJobs,
    VoteRefused,
    VoteResult,
    VoteWriter,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Click:
    request_id: str
    version: str
    user_id: str
    user_name: str
    choice: Choice
    reason: str = ""
    # What the clicker picked beyond yes or no (a silence duration).
    params: Mapping[str, Any] = field(default_factory=dict)

    def ballot(
        self, groups: Sequence[str] = (), *, is_actor: bool = False, in_actor_team: bool = False
    ) -> Ballot:
        """This click as storage judges it, with what the directory knows of the clicker."""
        return Ballot(
            request_id=self.request_id,
            version=self.version,
            user_id=self.user_id,
            user_name=self.user_name,
            choice=self.choice,
            reason=self.reason,
            groups=groups,
            is_actor=is_actor,
            in_actor_team=in_actor_team,
            now=datetime.now(UTC),
            params=self.params,
        )


@dataclass(frozen=True)
class _Target:
    """What authorization needs to know about a request; fixed once the request exists."""

    route: Route | None
    actor_id: str
    actor_email: str
    actor_team: str


class ClickService:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        runner: TransactionRunner,
        directory: Directory,
        jobs: SlackJobs,
        on_change: Callable[[str], None] = lambda _request_id: None,
        metrics: Metrics | None = None,
    ) -> None:
        self._sessions = sessions
        # Clicks handled at the same time share a transaction (group commit).
        self._votes = VoteWriter(runner, jobs)
        self._directory = directory
        self._jobs = jobs
        self._on_change = on_change
        self._metrics = metrics or Metrics()
        # Route and actor never change for a request id, so they are read once.
        self._targets: dict[str, _Target | None] = {}

    async def _target(self, request_id: str) -> _Target | None:
        if request_id in self._targets:
            return self._targets[request_id]
        async with reading(self._sessions) as session:
            row = (
                await session.execute(
                    select(Request.route, EventRecord.body)
                    .join(EventRecord, EventRecord.id == Request.event_id)
                    .where(Request.id == request_id)
                )
            ).one_or_none()
        if row is None:
            return None  # not cached: a request id may be typed before it exists
        actor: dict[str, Any] = row.body.get("actor") or {}
        target = _Target(
            route=Route.model_validate(row.route) if row.route else None,
            actor_id=str(actor.get("id", "")),
            actor_email=str(actor.get("email", "")),
            actor_team=str(actor.get("team", "")),
        )
        if len(self._targets) > 10_000:
            self._targets.clear()
        self._targets[request_id] = target
        return target

    async def _ballot(self, click: Click, target: _Target) -> Ballot:
        route = target.route
        assert route is not None
        groups = await self._directory.groups_of(click.user_id, route.approvers)
        is_actor = False
        if "actor" in route.forbid and (target.actor_id or target.actor_email):
            actor_user = await self._directory.slack_user_for(
                actor_id=target.actor_id, email=target.actor_email
            )
            is_actor = actor_user == click.user_id
        in_team = False
        if "actor_team" in route.forbid and target.actor_team:
            # The actor's team is the Slack user group whose handle is the team's name.
            in_team = await self._directory.in_group(click.user_id, target.actor_team)
        return click.ballot(groups, is_actor=is_actor, in_actor_team=in_team)

    async def precheck(self, click: Click) -> Refusal | None:
        """Would this click be refused? Used before opening the reject modal, so nobody types
        a reason for a click that cannot count. Writes nothing; the vote itself re-checks."""
        logs.bind(click.request_id[:64])
        target = await self._target(click.request_id)
        if target is None:
            return Refusal.not_found
        async with reading(self._sessions) as session:
            row = (
                await session.execute(
                    select(Request.status, Request.version, Request.superseded_by).where(
                        Request.id == click.request_id
                    )
                )
            ).one()
        if row.status != RequestStatus.pending.value:
            return Refusal.superseded if row.superseded_by else Refusal.decided
        if row.version != click.version:
            return Refusal.superseded
        if target.route is None:
            return Refusal.decided
        try:
            ballot = await self._ballot(click, target)
        except SlackFailure:
            return Refusal.unverified
        return None if ballot.groups else Refusal.not_approver

    async def vote(self, click: Click) -> VoteResult | Refusal:
        # The request id is the event's correlation id (bot.logs); the ids are Slack's and ours,
        # but bounded here since the button value came over the wire.
        logs.bind(click.request_id[:64])
        target = await self._target(click.request_id)
        ballot: Ballot | None = None
        refused: Refusal | None = None
        detail = ""
        if target is None:
            refused = Refusal.not_found
        elif target.route is None:
            refused = Refusal.decided
        else:
            try:
                ballot = await self._ballot(click, target)
            except SlackFailure as exc:
                # A rate-limited or unreachable Slack used to escape as a 500 to Slack, which
                # shows the clicker a bare error and keeps no trace of the click. Refuse it,
                # audited, and tell the clicker to try again: nothing was decided.
                detail = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                refused = Refusal.unverified
        if ballot is None:
            assert refused is not None
            await self._votes.refuse(Refused(click.ballot(), refused, detail))
            return self._refused(click, refused)
        # Written, or refused and audited, in one transaction with the clicks around it.
        outcome = await self._votes.cast(ballot)
        if isinstance(outcome, VoteRefused):
            return self._refused(click, outcome.refusal)
        log.info(
            "vote by %s (%s) counted; request is %s",
            click.user_id[:32],
            click.choice.value,
            outcome.status.value,
        )
        if outcome.decided_after is not None:
            self._metrics.decided("vote", outcome.decided_after)
        self._on_change(click.request_id)
        return outcome

    def _refused(self, click: Click, refusal: Refusal) -> Refusal:
        self._metrics.refusals.labels("slack", refusal.name).inc()
        log.info(
            "click by %s refused: %s",
            click.user_id[:32],
            refusal.name,
            extra={"reason": refusal.name},
        )
        return refusal
