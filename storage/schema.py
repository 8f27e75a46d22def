"""Schema upgrades through Alembic, from the CLI (`signoff db upgrade`) and at service start."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.db import is_sqlite
from storage.errors import StorageError

MIGRATIONS = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same for every replica.
_PG_MIGRATION_LOCK = 0x5160FF


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(_current)


async def upgrade(engine: AsyncEngine) -> None:
    """Bring the database to the newest schema. Safe to run from several replicas at once."""
    async with engine.begin() as conn:
        if not is_sqlite(engine):
            # Replicas starting together would otherwise race to create the same tables.
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK}
            )
        await conn.run_sync(_upgrade)


class SchemaOutOfDate(StorageError):
    """The database schema is older than this code; run `signoff db upgrade`."""


async def ensure_schema(engine: AsyncEngine) -> None:
    """At service start: create an empty database, refuse to run on an outdated one.

    An empty database (or any SQLite file, which one process owns) is upgraded in place. A shared
    PostgreSQL database that is behind is left alone: upgrading it under running replicas of the
    old version is an operator's call, made with `signoff db upgrade`.
    """
    current = await current_revision(engine)
    if current == head_revision():
        return
    if current is None or is_sqlite(engine):
        await upgrade(engine)
        return
    raise SchemaOutOfDate(
        f"database schema is at {current}, this Signoff needs {head_revision()}: "
        "run `signoff db upgrade`"
    )
