"""The tables. Schema changes go through Alembic (`storage/migrations`), never `create_all`."""

from __future__ import annotations

import base64
import json
import secrets
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from storage.types import UTCDateTime

# JSONB on PostgreSQL (indexable, compact); plain JSON text elsewhere.
JSONType = JSON().with_variant(postgresql.JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# Crockford's base32 alphabet, lower case: no i, l, o, u to misread when typed from a card.
_BASE32_TO_CROCKFORD = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", b"0123456789abcdefghjkmnpqrstvwxyz"
)


def new_id(prefix: str) -> str:
    """Short, unguessable, copy-pasteable ids: `r_3kq8v0x2m5t7c9w1` (prefix says what it is).

    80 random bits. Built from one `token_bytes` call: drawing 16 characters one by one with
    `secrets.choice` cost ~90 µs per id, a tenth of the intake's budget per event.
    """
    encoded = base64.b32encode(secrets.token_bytes(10)).translate(_BASE32_TO_CROCKFORD)
    return f"{prefix}_{encoded.decode()}"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def table_of(model: type[Base]) -> Table:
    """A model's Core table, for multi-row statements that skip the ORM's per-row work."""
    return cast(Table, model.__table__)


class RequestStatus(StrEnum):
    pending = "pending"
    approved = "approved"
    rejected = "rejected"
    expired = "expired"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self is not RequestStatus.pending


class JobStatus(StrEnum):
    pending = "pending"  # waiting for next_attempt_at
    running = "running"  # claimed by a worker until locked_until
    done = "done"
    dead = "dead"  # dead-lettered: an operator may replay it


class EventRecord(Base):
    """Every accepted event, as received (the body is kept whole so it can be synced back)."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    # Namespaced by connector ("webhook:<webhook-id>"): the same id again is the same delivery.
    delivery_id: Mapped[str] = mapped_column(String(300), unique=True)
    source: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(512))
    version: Mapped[str] = mapped_column(String(128))
    body: Mapped[dict[str, Any]] = mapped_column(JSONType)
    decision: Mapped[dict[str, Any]] = mapped_column(JSONType)
    decision_kind: Mapped[str] = mapped_column(String(20))
    rule: Mapped[str] = mapped_column(String(200))
    request_id: Mapped[str | None] = mapped_column(String(40))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())

    __table_args__ = (Index("ix_events_source_kind_received", "source", "kind", "received_at"),)


class Request(Base):
    """One decision to make about one event version."""

    __tablename__ = "requests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id"))
    source: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(512))
    version: Mapped[str] = mapped_column(String(128))
    title: Mapped[str] = mapped_column(Text)
    actor_id: Mapped[str | None] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(20))
    decision_kind: Mapped[str] = mapped_column(String(20))
    rule: Mapped[str] = mapped_column(String(200))
    route: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decided_by: Mapped[list[dict[str, str]]] = mapped_column(JSONType, default=list)
    reason: Mapped[str] = mapped_column(Text, default="")
    superseded_by: Mapped[str | None] = mapped_column(String(40))
    # The outbox job kind that applies the final decision to the source ("webhook.callback"...);
    # None when the source asked for no answer.
    sync_kind: Mapped[str | None] = mapped_column(String(64))
    # Where the approval card was posted (set once chat.postMessage succeeded).
    card_channel: Mapped[str | None] = mapped_column(String(64))
    card_ts: Mapped[str | None] = mapped_column(String(32))
    # The route's channel (None for requests decided without people).
    channel: Mapped[str | None] = mapped_column(String(64))
    sla_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Timers (storage.timers): the earliest moment something is due for this pending request,
    # and how far along its ladder it is. A sweep claims a due request by moving next_due_at.
    next_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    escalation_level: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    sla_reminded: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    expiry_warned: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        # At most one pending request per subject: a second replica racing to create one for
        # the same subject fails here instead of leaving two live cards for one thing.
        Index(
            "uq_requests_pending_subject",
            "source",
            "subject",
            unique=True,
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_requests_status_created", "status", "created_at"),
        Index("ix_requests_status_next_due", "status", "next_due_at"),
        Index("ix_requests_channel_status", "channel", "status", "created_at"),
    )


class Vote(Base):
    __tablename__ = "votes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"))
    user_id: Mapped[str] = mapped_column(String(64))
    user_name: Mapped[str] = mapped_column(String(256), default="")
    choice: Mapped[str] = mapped_column(String(10))  # approve | reject
    reason: Mapped[str] = mapped_column(Text, default="")
    groups: Mapped[list[str]] = mapped_column(JSONType, default=list)
    # What the voter picked beyond yes or no, e.g. {"silence": "4h"} on an alert.
    params: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())

    # One vote per person per request, enforced by the database, not by a read-then-write.
    __table_args__ = (UniqueConstraint("request_id", "user_id", name="uq_votes_request_user"),)


class AuditRecord(Base):
    """Append-only, hash-chained. `hash` covers `prev_hash` and every other column."""

    __tablename__ = "audit_records"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    kind: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(300))
    request_id: Mapped[str | None] = mapped_column(String(40), index=True)
    event_id: Mapped[str | None] = mapped_column(String(40))
    # The canonical JSON text the hash covers, stored as is: what is verified is exactly what
    # was written, whatever a backend's JSON type would do to key order or numbers.
    data_json: Mapped[str] = mapped_column("data", Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    @property
    def data(self) -> dict[str, Any]:
        value = json.loads(self.data_json)
        assert isinstance(value, dict)
        return value


class AuditHead(Base):
    """The chain's last link, one row. Locking it serialises appenders across replicas, and it
    lets `audit verify` notice that records were cut off the end."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer)
    hash: Mapped[str] = mapped_column(String(64))


class OutboxJob(Base):
    """A side effect outside the database, written in the transaction that caused it."""

    __tablename__ = "outbox_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[str | None] = mapped_column(String(40), index=True)
    # Sent as the delivery id (e.g. `webhook-id`) on every attempt, so the far side can dedupe.
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # What a finished sync-back got back from the source (connectors.base.SyncReceipt).
    result: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    __table_args__ = (Index("ix_outbox_jobs_due", "status", "next_attempt_at"),)


class AnomalyBaseline(Base):
    """A rolling baseline of one numeric field, per (source, kind, key): see policies.anomaly."""

    __tablename__ = "anomaly_baselines"

    source: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), primary_key=True)
    field: Mapped[str] = mapped_column(String(200), primary_key=True)
    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    mean: Mapped[float] = mapped_column(Float)
    variance: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DigestRun(Base):
    """One digest per channel per scheduled time: whoever inserts the row sends it."""

    __tablename__ = "digest_runs"

    channel: Mapped[str] = mapped_column(String(64), primary_key=True)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime(), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
