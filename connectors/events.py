"""The Event: what every connector emits and everything downstream consumes.

Validated by pydantic at the edge, before any logic runs. ``extra="forbid"`` everywhere on the
wire model so a misspelt field is a 400 that names it, not a silently ignored key.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AnyHttpUrl,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

# Identifiers that end up in metrics labels, CLI output and Slack: keep them boring.
Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=512, strip_whitespace=True)]


class Risk(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


class Actor(BaseModel):
    """Who initiated the action; used for separation of duties."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    name: Annotated[str, StringConstraints(max_length=256)] = ""
    email: Annotated[str, StringConstraints(max_length=320)] = ""
    team: Annotated[str, StringConstraints(max_length=256)] = ""


class ContextField(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    label: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    value: Annotated[str, StringConstraints(max_length=2000)]


class Link(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    title: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    url: AnyHttpUrl


class Anomaly(BaseModel):
    """An anomaly signal a connector attaches, or the gateway computes from a rolling baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # None while a gateway baseline is too young to judge (see policies.anomaly).
    score: float | None = None
    baseline: float | None = None
    # How many observations the baseline has seen (None: the connector scored it itself).
    samples: int | None = None
    detail: Annotated[str, StringConstraints(max_length=512)] = ""


class EventBody(BaseModel):
    """The fields a source sends (the `POST /v1/events` body)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Slug
    kind: Slug
    subject: ShortText
    version: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    title: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    summary: Annotated[str, StringConstraints(max_length=5000)] = ""
    actor: Actor | None = None
    risk: Risk = Risk.medium
    attributes: dict[str, Any] = Field(default_factory=dict)
    context: Annotated[list[ContextField], Field(max_length=50)] = Field(default_factory=list)
    links: Annotated[list[Link], Field(max_length=20)] = Field(default_factory=list)
    anomaly: Anomaly | None = None
    occurred_at: AwareDatetime | None = None
    callback_url: AnyHttpUrl | None = None

    @field_validator("attributes")
    @classmethod
    def _attribute_keys_are_identifiers(cls, value: dict[str, Any]) -> dict[str, Any]:
        # CEL reads attributes as `event.attributes.<key>`; a key that is not an identifier
        # could only be reached with index syntax, which policy authors will not expect.
        for key in value:
            if not key.isidentifier():
                raise ValueError(f"attribute key {key!r} must be an identifier")
        return value


class Event(EventBody):
    """An accepted event: the body plus what the connector adds (delivery id, sync-back data)."""

    delivery_id: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    received_at: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))
    # Connector-private data needed to apply the decision back to the source.
    sync: dict[str, Any] = Field(default_factory=dict)

    @property
    def effective_time(self) -> datetime:
        return self.occurred_at or self.received_at

    def to_cel(self) -> dict[str, Any]:
        """The event as policies see it (`event` in CEL). Built once per event, not per rule."""
        # An event without an actor still has the fields, empty, so conditions can test them.
        actor = self.actor or Actor.model_construct(id="", name="", email="", team="")
        return {
            "source": self.source,
            "kind": self.kind,
            "subject": self.subject,
            "version": self.version,
            "title": self.title,
            "summary": self.summary,
            "actor": {
                "id": actor.id,
                "name": actor.name,
                "email": actor.email,
                "team": actor.team,
            },
            "risk": self.risk.value,
            "attributes": self.attributes,
            "context": {field.label: field.value for field in self.context},
            # Only what is known: `event.anomaly.score` on a young baseline is an error (the
            # gateway fails closed), never a made-up 0.
            "anomaly": (
                {}
                if self.anomaly is None
                else {
                    name: value
                    for name, value in (
                        ("score", self.anomaly.score),
                        ("baseline", self.anomaly.baseline),
                        ("samples", self.anomaly.samples),
                    )
                    if value is not None
                }
            ),
            "occurred_at": self.effective_time,
        }
