"""Connectors: what a vote picked, what a sync-back got back, anomaly baselines

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import storage.types

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("votes") as batch_op:
        # What the voter picked beyond yes or no, e.g. {"silence": "4h"} on an alert.
        batch_op.add_column(sa.Column("params", JSON, nullable=True))
    with op.batch_alter_table("outbox_jobs") as batch_op:
        # What a finished sync-back got back from the source (a silence id...).
        batch_op.add_column(sa.Column("result", JSON, nullable=True))
    op.create_table(
        "anomaly_baselines",
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("field", sa.String(length=200), nullable=False),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("mean", sa.Float(), nullable=False),
        sa.Column("variance", sa.Float(), nullable=False),
        sa.Column("updated_at", storage.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint(
            "source", "kind", "field", "key", name=op.f("pk_anomaly_baselines")
        ),
    )


def downgrade() -> None:
    op.drop_table("anomaly_baselines")
    with op.batch_alter_table("outbox_jobs") as batch_op:
        batch_op.drop_column("result")
    with op.batch_alter_table("votes") as batch_op:
        batch_op.drop_column("params")
