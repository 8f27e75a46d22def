"""Alertmanager's webhook body (`webhook_configs`, payload version 4), as pydantic models.

These models ignore fields they do not know: Alertmanager adds fields over time (0.25 added
`truncatedAlerts`), and a newer Alertmanager must not be refused for that. Only the Event that
comes out of them is strict.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

# The only payload version Alertmanager has shipped since 0.8; the field exists so receivers can
# refuse a format they do not know.
VERSION = "4"

LabelName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
LabelValue = Annotated[str, StringConstraints(max_length=4096)]

_TIME = TypeAdapter(AwareDatetime)


def parse_time(value: str) -> datetime:
    """An Alertmanager timestamp (RFC 3339, nanoseconds cut to microseconds)."""
    return _TIME.validate_python(value)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class Alert(_Lenient):
    status: Literal["firing", "resolved"]
    labels: dict[LabelName, LabelValue]
    annotations: dict[LabelName, LabelValue] = Field(default_factory=dict)
    # Kept as sent: the raw text is the alert occurrence's identity (version, delivery id);
    # parsing it would cut nanoseconds and make two occurrences look alike.
    starts_at: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        alias="startsAt"
    )
    # Firing alerts carry Go's zero time, `0001-01-01T00:00:00Z`.
    ends_at: Annotated[str, StringConstraints(max_length=64)] = Field("", alias="endsAt")
    generator_url: Annotated[str, StringConstraints(max_length=4096)] = Field(
        "", alias="generatorURL"
    )
    fingerprint: Annotated[str, StringConstraints(min_length=1, max_length=128)]


class Notification(_Lenient):
    version: str
    receiver: str = ""
    # The group's status: `firing` while any alert in it fires, even if others have resolved,
    # so each alert is judged by its own `status`.
    status: str = ""
    alerts: Annotated[list[Alert], Field(max_length=1000)]
    group_labels: dict[LabelName, LabelValue] = Field(default_factory=dict, alias="groupLabels")
    external_url: Annotated[str, StringConstraints(max_length=4096)] = Field(
        "", alias="externalURL"
    )
    group_key: str = Field("", alias="groupKey")
    truncated_alerts: int = Field(0, alias="truncatedAlerts")
