"""Who is who in Slack: user group members, and which Slack user an event's actor is.

Membership is cached for a TTL. A clicker missing from a cached group triggers one refresh of
that group (at most once per `miss_refresh` seconds per group), so someone just added to a
group can approve without waiting for the TTL, and a stream of clicks from non-approvers cannot
turn into a stream of Slack API calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot.settings import SettingsError
from policies.model import ApproverGroup

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    members: frozenset[str]
    fetched_at: float
    last_miss_refresh: float = 0.0


def is_user_id(value: str) -> bool:
    return value[:1] in ("U", "W") and value[1:].isalnum() and value.isupper()


class Directory:
    def __init__(
        self,
        client: AsyncWebClient,
        *,
        ttl: float = 300.0,
        miss_refresh: float = 30.0,
        actor_map: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._ttl = ttl
        self._miss_refresh = miss_refresh
        self._clock = clock
        # Explicit actor -> Slack user mapping from config wins over email lookup.
        self._actor_map = dict(actor_map or {})
        self._groups: dict[str, _Entry] = {}
        self._handles: dict[str, str] | None = None
        self._emails: dict[str, tuple[str | None, float]] = {}
        self._lock = asyncio.Lock()

    async def groups_of(self, user_id: str, approvers: list[ApproverGroup]) -> list[str]:
        """Labels of the approver entries `user_id` belongs to."""
        labels = []
        for entry in approvers:
            if entry.users is not None:
                if user_id in entry.users:
                    labels.append(entry.label)
            elif entry.group is not None and await self.in_group(user_id, entry.group):
                labels.append(entry.label)
        return labels

    async def in_group(self, user_id: str, group: str) -> bool:
        now = self._clock()
        entry = self._cached(group, now)
        if entry is None:
            entry = await self._fetch(group)
        elif user_id not in entry.members and now - entry.last_miss_refresh >= self._miss_refresh:
            # A member added since the last fetch: look again, at most once per interval.
            entry = await self._fetch(group)
            entry.last_miss_refresh = now
        return user_id in entry.members

    async def members(self, group: str) -> frozenset[str]:
        """The group's members, from the cache while it is fresh."""
        entry = self._cached(group, self._clock()) or await self._fetch(group)
        return entry.members

    def _cached(self, group: str, now: float) -> _Entry | None:
        """The group's cached entry while it is fresh, else None."""
        entry = self._groups.get(group)
        return entry if entry is not None and now - entry.fetched_at <= self._ttl else None

    async def _fetch(self, group: str) -> _Entry:
        group_id = await self.group_id(group)
        members: frozenset[str] = frozenset()
        if group_id is not None:
            response = await self._client.usergroups_users_list(usergroup=group_id)
            members = frozenset(response.get("users", []))
        previous = self._groups.get(group)
        entry = _Entry(members, self._clock(), previous.last_miss_refresh if previous else 0.0)
        self._groups[group] = entry
        return entry

    async def group_id(self, group: str) -> str | None:
        """The id (`S...`) of a group named by id (`S0123`) or handle (`finance-leads`,
        `@finance-leads`); None if Slack has no such group."""
        handle = group.removeprefix("@")
        if handle[:1] == "S" and handle.isupper() and handle.isalnum():
            return handle
        async with self._lock:
            if self._handles is None or handle not in self._handles:
                response = await self._client.usergroups_list()
                groups: list[dict[str, str]] = response.get("usergroups", [])
                self._handles = {g["handle"]: g["id"] for g in groups if "handle" in g}
        return self._handles.get(handle)

    def known_user_for(self, *, actor_id: str, email: str) -> str | None:
        """`slack_user_for` from what is known without asking Slack: the map, an actor id that
        is a Slack id, an email looked up before (and still fresh)."""
        return self._known(actor_id, email)[1]

    def _known(self, actor_id: str, email: str) -> tuple[bool, str | None]:
        """(whether the answer is known without a Slack call, the answer)."""
        # Explicit actor -> Slack user mapping from config wins over email lookup.
        if actor_id in self._actor_map:
            return True, self._actor_map[actor_id]
        if email in self._actor_map:
            return True, self._actor_map[email]
        if is_user_id(actor_id):
            return True, actor_id
        if not email:
            return True, None
        cached = self._emails.get(email)
        if cached is not None and self._clock() - cached[1] <= self._ttl:
            return True, cached[0]
        return False, None

    async def slack_user_for(self, *, actor_id: str, email: str) -> str | None:
        """The Slack user who is the event's actor, if one can be found."""
        known, user_id = self._known(actor_id, email)
        if known:
            return user_id
        try:
            response = await self._client.users_lookupByEmail(email=email)
            user_id = response["user"]["id"]
        except SlackApiError as exc:
            if exc.response.get("error") != "users_not_found":
                raise
            user_id = None
        self._emails[email] = (user_id, self._clock())
        return user_id


def load_user_map(path: Path) -> dict[str, str]:
    """`SIGNOFF_SLACK_USER_MAP`: a YAML (or JSON) mapping of an actor's id or email to a Slack
    user id, for sources whose actors have no Slack email."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"SIGNOFF_SLACK_USER_MAP {path}: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and is_user_id(v) for k, v in data.items()
    ):
        raise SettingsError(
            f"SIGNOFF_SLACK_USER_MAP {path}: must map actor ids or emails to Slack user ids (U...)"
        )
    return dict(data)
