"""The migrations build exactly the schema the models describe, on both backends, and undo it."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.models import Base
from storage.schema import alembic_config


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
