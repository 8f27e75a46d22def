"""Timers and digests: what is due for each pending request, and which digests went out

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import storage.types
from policies.model import parse_duration

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch_op:
        # The route's channel, as a column: digests and `/signoff pending` filter on it.
        batch_op.add_column(sa.Column("channel", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column("sla_due_at", storage.types.UTCDateTime(timezone=True), nullable=True)
        )
        # The earliest moment something is due for this pending request (an escalation level,
        # the SLA reminder, the expiry warning, the expiry); NULL when nothing is.
        batch_op.add_column(
            sa.Column("next_due_at", storage.types.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(
            sa.Column("escalation_level", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("sla_reminded", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("expiry_warned", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.create_index("ix_requests_status_next_due", ["status", "next_due_at"])
        batch_op.create_index("ix_requests_channel_status", ["channel", "status", "created_at"])
    # Existing requests get their channel and SLA from the stored route; pending ones are due
    # at once, so the first sweep works out where each stands on its ladder.
    requests = sa.table(
        "requests",
        sa.column("id", sa.String),
        sa.column("route", sa.JSON),
        sa.column("status", sa.String),
        sa.column("created_at", storage.types.UTCDateTime()),
        sa.column("channel", sa.String),
        sa.column("sla_due_at", storage.types.UTCDateTime()),
        sa.column("next_due_at", storage.types.UTCDateTime()),
    )
    connection = op.get_bind()
    rows = connection.execute(
        sa.select(requests.c.id, requests.c.route, requests.c.status, requests.c.created_at)
    ).all()
    for row in rows:
        route = json.loads(row.route) if isinstance(row.route, str) else row.route
        if not isinstance(route, dict) or not route.get("channel"):
            continue
        sla = parse_duration(route["sla"]) if route.get("sla") else None
        connection.execute(
            requests.update()
            .where(requests.c.id == row.id)
            .values(
                channel=str(route["channel"])[:64],
                sla_due_at=row.created_at + sla if sla else None,
                next_due_at=row.created_at if row.status == "pending" else None,
            )
        )
    op.create_table(
        "digest_runs",
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("due_at", storage.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_at", storage.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("channel", "due_at", name=op.f("pk_digest_runs")),
    )


def downgrade() -> None:
    op.drop_table("digest_runs")
    with op.batch_alter_table("requests") as batch_op:
        batch_op.drop_index("ix_requests_channel_status")
        batch_op.drop_index("ix_requests_status_next_due")
        for column in (
            "expiry_warned",
            "sla_reminded",
            "escalation_level",
            "next_due_at",
            "sla_due_at",
            "channel",
        ):
            batch_op.drop_column(column)
