"""Anomaly baselines in the database: learned in the intake's transaction, read through a cache.

The gateway scores an event against the baseline as this process last saw it (`Baselines`, an
LRU cache filled from the database on a miss and refreshed with every committed update); the
update itself is applied under the row's lock inside the intake transaction (`learn`), so with
several replicas a baseline never loses an observation, and a replica's scores lag the others'
updates by at most the events it has not seen yet.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from policies.anomaly import BaselineId, BaselineState, Measurement, observe
from storage.db import reading
from storage.models import AnomalyBaseline, table_of

_COLUMNS = (
    AnomalyBaseline.source,
    AnomalyBaseline.kind,
    AnomalyBaseline.field,
    AnomalyBaseline.key,
)


def learn(
    session: Session, measurements: Sequence[Measurement], *, now: datetime
) -> dict[BaselineId, BaselineState]:
    """Add each value to its baseline, in order; return the baselines as they now stand."""
    if not measurements:
        return {}
    ids = sorted({m.baseline for m in measurements})
    # Locked in one fixed order, so two replicas learning the same baselines cannot deadlock.
    rows = session.execute(
        select(AnomalyBaseline)
        .where(tuple_(*_COLUMNS).in_(ids))
        .order_by(*_COLUMNS)
        .with_for_update()
    ).scalars()
    states = {
        (r.source, r.kind, r.field, r.key): BaselineState(r.count, r.mean, r.variance) for r in rows
    }
    existing = set(states)
    for m in measurements:
        states[m.baseline] = observe(
            states.get(m.baseline), m.value, alpha=m.alpha, min_samples=m.min_samples
        )
    table = table_of(AnomalyBaseline)
    changed = [_row(ident, states[ident], now) for ident in ids if ident in existing]
    added = [_row(ident, states[ident], now) for ident in ids if ident not in existing]
    if changed:
        session.execute(
            update(table)
            .where(
                table.c.source == bindparam("b_source"),
                table.c.kind == bindparam("b_kind"),
                table.c.field == bindparam("b_field"),
                table.c.key == bindparam("b_key"),
            )
            .values(
                count=bindparam("b_count"),
                mean=bindparam("b_mean"),
                variance=bindparam("b_variance"),
                updated_at=bindparam("b_updated_at"),
            ),
            [{f"b_{k}": v for k, v in row.items()} for row in changed],
        )
    if added:
        # A replica inserting the same new baseline at the same moment makes this batch fail
        # with IntegrityError; the ledger then retries per delivery and finds the row.
        session.execute(table.insert(), added)
    return {ident: states[ident] for ident in ids}


def _row(ident: BaselineId, state: BaselineState, now: datetime) -> dict[str, object]:
    source, kind, field, key = ident
    return {
        "source": source,
        "kind": kind,
        "field": field,
        "key": key,
        "count": state.count,
        "mean": state.mean,
        "variance": state.variance,
        "updated_at": now,
    }


class Baselines:
    """The baselines as this process last saw them, for scoring before the decision."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], *, capacity: int = 100_000):
        self._sessions = sessions
        self._capacity = capacity
        self._cache: OrderedDict[BaselineId, BaselineState | None] = OrderedDict()

    async def current(self, ident: BaselineId) -> BaselineState | None:
        if ident in self._cache:
            self._cache.move_to_end(ident)
            return self._cache[ident]
        async with reading(self._sessions) as session:
            row = await session.get(AnomalyBaseline, ident)
        state = None if row is None else BaselineState(row.count, row.mean, row.variance)
        # Another request may have learned a newer state while this one read: keep that one.
        if ident not in self._cache:
            self._remember(ident, state)
        return self._cache.get(ident, state)

    def learned(self, states: Mapping[BaselineId, BaselineState]) -> None:
        for ident, state in states.items():
            self._remember(ident, state)

    def _remember(self, ident: BaselineId, state: BaselineState | None) -> None:
        self._cache[ident] = state
        self._cache.move_to_end(ident)
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
