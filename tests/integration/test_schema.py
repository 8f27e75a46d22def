"""The migrations build exactly the schema the models describe, on both backends, and undo it."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.models import Base
from storage.schema import alembic_config

NEW_IN_0004 = {
    "channel",
    "sla_due_at",
    "next_due_at",
    "escalation_level",
    "sla_reminded",
    "expiry_warned",
}


async def test_migrations_match_the_models(engine: AsyncEngine) -> None:
    def diff(connection):  # type: ignore[no-untyped-def]
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        return compare_metadata(context, Base.metadata)

    async with engine.connect() as conn:
        differences = await conn.run_sync(diff)
    assert differences == []


async def test_downgrade_to_base_removes_every_table(engine: AsyncEngine) -> None:
    def downgrade(connection):  # type: ignore[no-untyped-def]
        config = alembic_config()
        config.attributes["connection"] = connection
        command.downgrade(config, "base")
        return sorted(set(inspect(connection).get_table_names()) - {"alembic_version"})

    async with engine.begin() as conn:
        left = await conn.run_sync(downgrade)
    assert left == []


async def test_0004_fills_channel_sla_and_timers_of_existing_requests(db_url: str) -> None:
    """Requests stored before timers existed get their channel and SLA from their route, and
    pending ones become due at once so the first sweep places them on their ladder."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import Column, MetaData, Table, select

    from storage.db import create_engine
    from storage.models import EventRecord, Request, table_of

    created = datetime(2026, 1, 1, 12, tzinfo=UTC)
    engine = create_engine(db_url)

    def to(connection, revision: str) -> None:  # type: ignore[no-untyped-def]
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    def seed(connection) -> None:  # type: ignore[no-untyped-def]
        events = table_of(EventRecord)
        # The table as 0003 left it: a plain table, so no newer column or default sneaks in.
        old = Table(
            "requests",
            MetaData(),
            *(
                Column(c.name, c.type)
                for c in table_of(Request).columns
                if c.name not in NEW_IN_0004
            ),
        )
        route = {"channel": "C0FIN", "approvers": [{"users": ["U1"], "min": 1}], "sla": "30m"}
        for rid, status in (("r_pending", "pending"), ("r_done", "approved")):
            connection.execute(
                events.insert().values(
                    id=f"e_{rid}",
                    delivery_id=f"d:{rid}",
                    source="s",
                    kind="k",
                    subject=rid,
                    version="1",
                    body={},
                    decision={},
                    decision_kind="route",
                    rule="r",
                    request_id=rid,
                    received_at=created,
                )
            )
            row = {
                "id": rid,
                "event_id": f"e_{rid}",
                "source": "s",
                "kind": "k",
                "subject": rid,
                "version": "1",
                "title": "t",
                "actor_id": None,
                "status": status,
                "decision_kind": "route",
                "rule": "r",
                "route": route,
                "created_at": created,
                "expires_at": None,
                "decided_at": None,
                "decided_by": [],
                "reason": "",
                "superseded_by": None,
                "sync_kind": None,
                "card_channel": None,
                "card_ts": None,
            }
            connection.execute(old.insert().values(row))

    try:
        async with engine.begin() as conn:
            await conn.run_sync(to, "0003")
            await conn.run_sync(seed)
            await conn.run_sync(to, "head")
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        Request.id, Request.channel, Request.sla_due_at, Request.next_due_at
                    ).order_by(Request.id)
                )
            ).all()
    finally:
        await engine.dispose()
    assert [tuple(r) for r in rows] == [
        ("r_done", "C0FIN", created + timedelta(minutes=30), None),
        ("r_pending", "C0FIN", created + timedelta(minutes=30), created),
    ]
