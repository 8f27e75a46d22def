"""The audit chain: append-only records, each hash covering the previous record's hash.

`append` runs inside the caller's transaction, so a record exists exactly when the change it
describes does. The single `audit_head` row is locked while appending (`FOR UPDATE` on
PostgreSQL; SQLite transactions here already hold the database write lock), which orders
appenders across replicas and gives the previous hash without scanning the table.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from connectors.redaction import may_hold_secret, redact
from storage.models import AuditHead, AuditRecord, table_of

GENESIS = "0" * 64
_HEAD_ID = 1


@dataclass(frozen=True)
class AuditEntry:
    """What happened, to what, by whom. `data` is redacted before it is stored."""

    kind: str
    actor: str
    data: Mapping[str, Any] = field(default_factory=dict)
    request_id: str | None = None
    event_id: str | None = None
    at: datetime | None = None


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 as is: one text for one value.

    Verification hashes the stored text, never a re-serialisation, so all that matters is that
    one write produces one text; orjson does it several times faster than the standard library.
    """
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        # orjson refuses integers beyond 64 bits, which JSON input can carry.
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(
    *,
    seq: int,
    at: datetime,
    kind: str,
    actor: str,
    request_id: str | None,
    event_id: str | None,
    data_json: str,
    prev_hash: str,
) -> str:
    """SHA-256 over the record's fields and the previous record's hash."""
    header = canonical_json(
        [
            seq,
            at.astimezone(UTC).isoformat(timespec="microseconds"),
            kind,
            actor,
            request_id,
            event_id,
            prev_hash,
        ]
    )
    return hashlib.sha256(f"{header}\n{data_json}".encode()).hexdigest()


# Built once: constructing these per append showed up in the intake profile.
# On Core tables and run on the session's connection: the ORM's handling of a statement
# (compile state, result wrapping) cost more than the statement itself, three times a vote.
_HEAD = table_of(AuditHead)
_LOCK_HEAD = select(_HEAD.c.seq, _HEAD.c.hash).where(_HEAD.c.id == _HEAD_ID).with_for_update()
_INSERT_RECORDS = table_of(AuditRecord).insert()
_MOVE_HEAD = (
    update(_HEAD)
    .where(_HEAD.c.id == _HEAD_ID)
    .values(seq=bindparam("new_seq"), hash=bindparam("new_hash"))
)


async def append(session: AsyncSession, entries: Sequence[AuditEntry]) -> list[int]:
    """Append `entries` in order inside the caller's transaction; returns their sequence numbers."""
    return await session.run_sync(append_sync, entries)


def append_sync(session: Session, entries: Sequence[AuditEntry]) -> list[int]:
    """`append` for units of work that run synchronously (see `storage.db.TransactionRunner`)."""
    if not entries:
        return []
    # The head row is created by the first migration; locking it orders appenders.
    # Core statements on the head row: the ORM would track the row and synchronise its update,
    # measured at a tenth of a vote's cost for nothing.
    connection = session.connection()
    head = connection.execute(_LOCK_HEAD).one()
    seq, prev = head.seq, head.hash
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    for entry in entries:
        seq += 1
        # Microseconds are the finest every backend keeps; the hash must see what is stored.
        at = (entry.at or now).astimezone(UTC)
        data_json = canonical_json(entry.data)
        if may_hold_secret(data_json):  # most records hold none: one scan instead of a walk
            data_json = canonical_json(redact(dict(entry.data)))
        digest = record_hash(
            seq=seq,
            at=at,
            kind=entry.kind,
            actor=entry.actor,
            request_id=entry.request_id,
            event_id=entry.event_id,
            data_json=data_json,
            prev_hash=prev,
        )
        rows.append(
            {
                "seq": seq,
                "at": at,
                "kind": entry.kind,
                "actor": entry.actor,
                "request_id": entry.request_id,
                "event_id": entry.event_id,
                "data": data_json,  # the column is `data`; the attribute `data_json`
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    # Core insert: the ORM's bulk path costs more per row and tracks nothing we need here.
    connection.execute(_INSERT_RECORDS, rows)
    connection.execute(_MOVE_HEAD, {"new_seq": seq, "new_hash": prev})
    return [row["seq"] for row in rows]


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    problem: str = ""


async def _records(
    session: AsyncSession, since: datetime | None = None
) -> AsyncIterator[AuditRecord]:
    query = select(AuditRecord).order_by(AuditRecord.seq)
    if since is not None:
        query = query.where(AuditRecord.at >= since)
    stream = await session.stream_scalars(query.execution_options(yield_per=1000))
    async for record in stream:
        yield record


async def verify(session: AsyncSession) -> VerifyResult:
    """Walk the chain in order; name the first record that was changed, removed or moved."""
    expected_seq = 1
    prev = GENESIS
    checked = 0
    async for record in _records(session):
        if record.seq != expected_seq:
            return VerifyResult(
                False,
                checked,
                expected_seq,
                f"record {expected_seq} is missing (next present is {record.seq})",
            )
        if record.prev_hash != prev:
            return VerifyResult(
                False,
                checked,
                record.seq,
                f"record {record.seq} does not follow record {record.seq - 1} "
                "(removed, reordered or rewritten)",
            )
        digest = record_hash(
            seq=record.seq,
            at=record.at,
            kind=record.kind,
            actor=record.actor,
            request_id=record.request_id,
            event_id=record.event_id,
            data_json=record.data_json,
            prev_hash=record.prev_hash,
        )
        if digest != record.hash:
            return VerifyResult(False, checked, record.seq, f"record {record.seq} was changed")
        prev = record.hash
        expected_seq += 1
        checked += 1
    head = (await session.execute(select(AuditHead))).scalar_one_or_none()
    last_seq = expected_seq - 1
    if head is None:
        return VerifyResult(False, checked, 1, "the chain head is missing")
    if head.seq != last_seq or head.hash != prev:
        return VerifyResult(
            False,
            checked,
            last_seq + 1,
            f"the chain ends at record {last_seq} but its head says {head.seq}: "
            "records were removed from the end",
        )
    return VerifyResult(True, checked)


EXPORT_FIELDS = (
    "seq",
    "at",
    "kind",
    "actor",
    "request_id",
    "event_id",
    "data",
    "prev_hash",
    "hash",
)


def _as_row(record: AuditRecord) -> dict[str, Any]:
    return {
        "seq": record.seq,
        "at": record.at.isoformat(timespec="microseconds"),
        "kind": record.kind,
        "actor": record.actor,
        "request_id": record.request_id,
        "event_id": record.event_id,
        "data": record.data,
        "prev_hash": record.prev_hash,
        "hash": record.hash,
    }


async def export(
    session: AsyncSession, out: TextIO, *, fmt: str, since: datetime | None = None
) -> int:
    """Write records (from `since`, if given) as JSON lines or CSV; returns how many."""
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"unknown export format {fmt!r} (jsonl or csv)")
    writer = None
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
        writer.writeheader()
    count = 0
    async for record in _records(session, since):
        row = _as_row(record)
        if writer is None:
            out.write(canonical_json(row) + "\n")
        else:
            writer.writerow({**row, "data": record.data_json})
        count += 1
    return count
