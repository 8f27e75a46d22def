"""The audit chain: tampering of every kind is caught and the first bad record is named."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from bot.cli import main
from storage import audit
from storage.audit import AuditEntry
from storage.models import AuditRecord


async def fill(sessions: async_sessionmaker[AsyncSession], n: int = 6) -> None:
    # Two transactions, so the chain crosses a commit boundary.
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for half in (range(n // 2), range(n // 2, n)):
        async with sessions.begin() as session:
            await audit.append(
                session,
                [
                    AuditEntry(
                        kind="vote.cast",
                        actor=f"slack:U{i}",
                        data={"choice": "approve", "n": i, "note": "ünïcode ✓"},
                        request_id=f"r_{i}",
                        at=base + timedelta(hours=i),
                    )
                    for i in half
                ],
            )


async def verify(sessions: async_sessionmaker[AsyncSession]) -> audit.VerifyResult:
    async with sessions() as session:
        return await audit.verify(session)


async def test_intact_chain_verifies(sessions: async_sessionmaker[AsyncSession]) -> None:
    await fill(sessions)
    result = await verify(sessions)
    assert result.ok, result.problem
    assert result.checked == 6


async def test_edited_record_is_named(sessions: async_sessionmaker[AsyncSession]) -> None:
    await fill(sessions)
    async with sessions.begin() as session:
        await session.execute(
            update(AuditRecord).where(AuditRecord.seq == 3).values(data_json='{"choice":"reject"}')
        )
    result = await verify(sessions)
    assert not result.ok
    assert result.first_bad_seq == 3
    assert "changed" in result.problem


async def test_edited_actor_with_recomputed_hash_breaks_the_next_link(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    await fill(sessions)
    async with sessions.begin() as session:
        record = await session.get(AuditRecord, 2)
        assert record is not None
        record.actor = "slack:UEVIL"
        record.hash = audit.record_hash(
            seq=2,
            at=record.at,
            kind=record.kind,
            actor=record.actor,
            request_id=record.request_id,
            event_id=record.event_id,
            data_json=record.data_json,
            prev_hash=record.prev_hash,
        )
    result = await verify(sessions)
    assert (result.ok, result.first_bad_seq) == (False, 3)


async def test_deleted_record_is_named(sessions: async_sessionmaker[AsyncSession]) -> None:
    await fill(sessions)
    async with sessions.begin() as session:
        await session.execute(delete(AuditRecord).where(AuditRecord.seq == 4))
    result = await verify(sessions)
    assert (result.ok, result.first_bad_seq) == (False, 4)
    assert "missing" in result.problem


async def test_deleted_last_record_is_caught(sessions: async_sessionmaker[AsyncSession]) -> None:
    await fill(sessions)
    async with sessions.begin() as session:
        await session.execute(delete(AuditRecord).where(AuditRecord.seq == 6))
    result = await verify(sessions)
    assert (result.ok, result.first_bad_seq) == (False, 6)
    assert "removed from the end" in result.problem


async def test_reordered_records_are_named(sessions: async_sessionmaker[AsyncSession]) -> None:
    await fill(sessions)
    # Swap records 2 and 5 (their sequence numbers), as a reordering would.
    async with sessions.begin() as session:
        await session.execute(update(AuditRecord).where(AuditRecord.seq == 2).values(seq=-2))
        await session.execute(update(AuditRecord).where(AuditRecord.seq == 5).values(seq=2))
        await session.execute(update(AuditRecord).where(AuditRecord.seq == -2).values(seq=5))
    result = await verify(sessions)
    assert (result.ok, result.first_bad_seq) == (False, 2)


async def test_secrets_never_reach_a_record(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions.begin() as session:
        await audit.append(
            session,
            [
                AuditEntry(
                    kind="event.received",
                    actor="source:payments",
                    data={
                        "attributes": {"api_key": "sk_live_abcdef", "note": "xoxb-1234-abcdefgh"},
                        "callback": "https://user:hunter2@example.com/hook?token=abc",
                    },
                )
            ],
        )
    out = io.StringIO()
    async with sessions() as session:
        await audit.export(session, out, fmt="jsonl")
    text = out.getvalue()
    for secret in ("sk_live_abcdef", "xoxb-1234-abcdefgh", "hunter2", "token=abc"):
        assert secret not in text


async def test_export_jsonl_csv_and_since(sessions: async_sessionmaker[AsyncSession]) -> None:
    await fill(sessions)
    out = io.StringIO()
    async with sessions() as session:
        assert await audit.export(session, out, fmt="jsonl") == 6
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[0]["data"]["note"] == "ünïcode ✓"
    assert lines[1]["prev_hash"] == lines[0]["hash"]

    out = io.StringIO()
    since = datetime(2026, 1, 1, 3, tzinfo=UTC)
    async with sessions() as session:
        assert await audit.export(session, out, fmt="csv", since=since) == 3
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [row["seq"] for row in rows] == ["4", "5", "6"]
    assert json.loads(rows[0]["data"])["n"] == 3

    with pytest.raises(ValueError, match="format"):
        async with sessions() as session:
            await audit.export(session, io.StringIO(), fmt="xml")


async def test_cli_verify_exit_codes(
    sessions: async_sessionmaker[AsyncSession],
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await fill(sessions)
    monkeypatch.setenv("SIGNOFF_DATABASE_URL", db_url)
    # The CLI runs its own event loop, so it runs in a thread here.
    assert await asyncio.to_thread(main, ["audit", "verify"]) == 0
    assert "ok: 6 records" in capsys.readouterr().out
    async with sessions.begin() as session:
        await session.execute(update(AuditRecord).where(AuditRecord.seq == 5).values(kind="x"))
    assert await asyncio.to_thread(main, ["audit", "verify"]) == 1
    assert "record 5" in capsys.readouterr().out
