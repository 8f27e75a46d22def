"""The connector contract: what every source system plugs in through.

A connector does two things, and only these:

- `receive`: verify an inbound delivery (its signature or token) and parse it into Events,
  plus any cancellations it carries (a resolved alert withdraws its request). It raises an
  `InboundError` subclass for bad input, never anything else for input alone.
- `apply`: send a final decision back to the source. It runs inside an outbox job, so it must
  be idempotent (the job's `idempotency_key` is the same on every attempt) and must say how it
  failed: `RetryableSyncError` (timeout, 429, 5xx) or `TerminalSyncError` (anything else).

Connectors sit at the bottom of the dependency graph: they know nothing of storage, policies
or Slack. What `apply` needs of the stored request arrives as a `FinalDecision`; what it wants
remembered (a silence id) goes back as a `SyncReceipt`. `bot.connectors` is the registry that
builds the configured ones from settings; AGENTS.md has the checklist for adding one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from connectors.events import Event


@dataclass(frozen=True)
class Cancellation:
    """The source withdrew a subject: its pending request is cancelled, its card says why."""

    source: str
    subject: str
    reason: str
    delivery_id: str


@dataclass(frozen=True)
class Delivery:
    """Everything one inbound delivery carries. All of it is recorded in one transaction.

    `reply`: a delivery answered without recording anything (GitHub's `ping`): the HTTP body.
    `ignored`: why a well-formed delivery was acknowledged and dropped (an event type this
    connector does not handle), for the log.
    """

    events: Sequence[Event] = ()
    cancellations: Sequence[Cancellation] = ()
    reply: Mapping[str, Any] | None = None
    ignored: str = ""


@dataclass(frozen=True)
class Voter:
    """One vote on the request, as the sync-back sees it."""

    id: str
    name: str
    choice: str  # approve | reject
    reason: str = ""
    # What the voter picked beyond yes or no (e.g. {"silence": "4h"} on an alert).
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinalDecision:
    """A decided request and the event it was decided for: what `apply` sends back."""

    request_id: str
    subject: str
    version: str
    status: str  # approved | rejected | expired | cancelled
    decided_by: Sequence[Mapping[str, str]]
    reason: str
    decided_at: datetime | None
    # The event as stored: its body, including the connector's private `sync` data.
    event: Mapping[str, Any]
    votes: Sequence[Voter]
    # The outbox job's key: send it wherever the far side dedupes (a delivery id, a comment).
    idempotency_key: str

    @property
    def sync(self) -> Mapping[str, Any]:
        value = self.event.get("sync") or {}
        return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class SyncReceipt:
    """What a successful `apply` wants kept: shown in `requests show`, written to the audit."""

    detail: str = ""
    # Identifiers the source handed back (a silence id...). Never secrets.
    refs: Mapping[str, str] = field(default_factory=dict)


class Connector(Protocol):
    """One source system. `name` is its route (`/hooks/<name>`) and its events' source of
    delivery ids; `sync_kind` the outbox job kind its `apply` runs under (None: nothing is
    sent back)."""

    @property
    def name(self) -> str: ...

    @property
    def sync_kind(self) -> str | None: ...

    async def receive(self, *, body: bytes, headers: Mapping[str, str]) -> Delivery: ...

    async def apply(self, *, decision: FinalDecision) -> SyncReceipt | None: ...
