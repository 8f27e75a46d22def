"""What a policy decides: the Decision, its Route and its trace. Plain data, JSON-serialisable,
stored with every request so a decision can be explained long after the policy changed."""

from __future__ import annotations

import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

_DURATION_PART = re.compile(r"(\d+)([dhms])")
_DURATION_WHOLE = re.compile(r"^(?:\d+[dhms])+$")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """`30m`, `2h`, `1h30m`, `1d`, `45s` -> timedelta. Anything else is a ValueError."""
    cleaned = text.strip()
    if not _DURATION_WHOLE.match(cleaned):
        raise ValueError(f"unknown duration {text!r} (use e.g. 45s, 30m, 2h, 1d, 1h30m)")
    seconds = sum(int(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(cleaned))
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    parts = []
    for unit, size in _UNIT_SECONDS.items():
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def _to_duration(value: object) -> object:
    return parse_duration(value) if isinstance(value, str) else value


Duration = Annotated[
    timedelta,
    BeforeValidator(_to_duration),
    PlainSerializer(format_duration, return_type=str),
]


class DecisionKind(StrEnum):
    auto_approve = "auto_approve"
    auto_reject = "auto_reject"
    route = "route"
    ignore = "ignore"


class OnExpiry(StrEnum):
    expire = "expire"
    approve = "approve"
    reject = "reject"


class ApproverGroup(BaseModel):
    """`min` approvals are needed from this group: a Slack user group, or a list of users."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: str | None = None
    users: list[str] | None = None
    min: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ApproverGroup:
        if (self.group is None) == (self.users is None):
            raise ValueError("an approver entry needs exactly one of `group` or `users`")
        if self.users is not None and not self.users:
            raise ValueError("`users` must not be empty")
        if self.users is not None and self.min > len(self.users):
            raise ValueError(f"`min` is {self.min} but only {len(self.users)} users are listed")
        return self

    @property
    def label(self) -> str:
        return self.group if self.group is not None else ", ".join(self.users or [])


class Escalation(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    after: Duration
    notify: list[str] = Field(min_length=1)


def _forbid_actor() -> list[Literal["actor", "actor_team"]]:
    return ["actor"]


class Route(BaseModel):
    """Where a routed request goes and what it takes to decide it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(min_length=1)
    approvers: list[ApproverGroup] = Field(min_length=1)
    # Separation of duties is on unless a policy says otherwise: the actor may not approve.
    forbid: list[Literal["actor", "actor_team"]] = Field(default_factory=_forbid_actor)
    sla: Duration | None = None
    escalate: list[Escalation] = Field(default_factory=list)
    expires_after: Duration | None = None
    on_expiry: OnExpiry = OnExpiry.expire
    # How long before expiry the card's thread is warned (default: a quarter of
    # `expires_after`, at most an hour).
    warn_before: Duration | None = None

    @property
    def expiry_warning(self) -> timedelta | None:
        if self.expires_after is None:
            return None
        if self.warn_before is not None:
            return min(self.warn_before, self.expires_after)
        return min(self.expires_after / 4, timedelta(hours=1))


class TraceOutcome(StrEnum):
    matched = "matched"
    no_match = "no_match"
    error = "error"
    shadow_match = "shadow_match"
    default = "default"


class TraceStep(BaseModel):
    """One rule as evaluated for one event: what it said and why."""

    model_config = ConfigDict(frozen=True)

    rule: str
    outcome: TraceOutcome
    detail: str = ""


class ShadowDecision(BaseModel):
    """A shadow rule matched: what it would have decided. Recorded, never acted on."""

    model_config = ConfigDict(frozen=True)

    rule: str
    decide: DecisionKind


class Decision(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: DecisionKind
    rule: str
    route: Route | None = None
    trace: list[TraceStep] = Field(default_factory=list)
    shadow: list[ShadowDecision] = Field(default_factory=list)
    # A condition errored before the winner, so an automatic approval was refused.
    failed_closed: bool = False

    def explain(self) -> str:
        """One line per evaluated rule, for the CLI, the API and the card."""
        return "\n".join(
            f"{step.rule}: {step.outcome.value}" + (f" ({step.detail})" if step.detail else "")
            for step in self.trace
        )
