"""Digest and escalation-sweep timings with 100,000 requests in the database (mixed states).

    .venv/bin/python bench/digest.py [--requests 100000] [--postgres URL]

Seeds requests across 10 channels (about a third pending, with SLA, expiry and timer columns
set; the rest decided in the last week), then times, best of 5:
- the digest query set for one channel (`storage.digests.digest_stats`);
- a timer sweep when nothing is due (what every tick costs);
- a timer sweep that fires 1% of the pending requests (catch-up after downtime).
Target (issue 5): each under 1 s on SQLite and PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text, update  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from storage.db import TransactionRunner, create_engine  # noqa: E402
from storage.digests import digest_stats  # noqa: E402
from storage.models import EventRecord, Request, table_of  # noqa: E402
from storage.schema import upgrade  # noqa: E402
from storage.timers import TimerJobs, sweep  # noqa: E402

CHANNELS = [f"C0CHAN{n}" for n in range(10)]
ROUTE = {
    "channel": "",
    "approvers": [{"users": ["U1"], "min": 1}],
    "sla": "30m",
    "escalate": [{"after": "1h", "notify": ["U0BOSS"]}],
    "expires_after": "2d",
}
JOBS = TimerJobs(
    notice="slack.notice", notice_dm="slack.notice_dm", update_card="slack.update_card"
)


def seed_rows(count: int, now: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = random.Random(5)  # noqa: S311 (synthetic data, not security)
    events, requests = [], []
    for n in range(count):
        rid, eid = f"r_{n:012d}", f"e_{n:012d}"
        channel = CHANNELS[n % len(CHANNELS)]
        created = now - timedelta(minutes=rng.randint(1, 7 * 24 * 60))
        pending = rng.random() < 0.33
        status = "pending" if pending else rng.choice(["approved", "rejected", "expired"])
        decided = None if pending else created + timedelta(minutes=rng.randint(1, 600))
        events.append(
            {
                "id": eid,
                "delivery_id": f"bench:{uuid.uuid4().hex}",
                "source": "bench",
                "kind": "refund",
                "subject": f"s/{n}",
                "version": "1",
                "body": {},
                "decision": {},
                "decision_kind": "route",
                "rule": "r",
                "request_id": rid,
                "received_at": created,
            }
        )
        requests.append(
            {
                "id": rid,
                "event_id": eid,
                "source": "bench",
                "kind": "refund",
                "subject": f"s/{n}",
                "version": "1",
                "title": f"Refund {n}",
                "actor_id": None,
                "status": status,
                "decision_kind": "route",
                "rule": "r",
                "route": {**ROUTE, "channel": channel},
                "created_at": created,
                "expires_at": created + timedelta(days=2),
                "decided_at": decided,
                "decided_by": [],
                "reason": "",
                "superseded_by": None,
                "sync_kind": None,
                "card_channel": None,
                "card_ts": None,
                "channel": channel,
                "sla_due_at": created + timedelta(minutes=30),
                # Pending ones are placed past their ladder: nothing is due until the bench
                # makes some due.
                "next_due_at": now + timedelta(days=1) if pending else None,
                "escalation_level": 1,
                "sla_reminded": True,
                "expiry_warned": False,
            }
        )
    return events, requests


async def bench(url: str, count: int) -> None:
    engine = create_engine(url)
    await upgrade(engine)
    runner = TransactionRunner(engine)
    now = datetime.now(UTC)
    events, requests = seed_rows(count, now)

    def insert(session: Session) -> None:
        for start in range(0, count, 2000):
            session.execute(table_of(EventRecord).insert(), events[start : start + 2000])
            session.execute(table_of(Request).insert(), requests[start : start + 2000])

    started = time.perf_counter()
    await runner.run(insert)
    print(f"seeded {count:,} requests in {time.perf_counter() - started:.1f}s")
    if engine.dialect.name == "postgresql":
        async with engine.begin() as conn:
            await conn.execute(text("ANALYZE"))
    pending = sum(1 for r in requests if r["status"] == "pending")
    since, until = now - timedelta(days=1), now

    results: dict[str, float] = {}
    for label, work in (
        (
            "digest query (one channel)",
            lambda s: digest_stats(s, channel=CHANNELS[0], since=since, until=until, now=now),
        ),
        ("sweep, nothing due", lambda s: sweep(s, now=now, jobs=JOBS)),
    ):
        timings = []
        for _ in range(5):
            t0 = time.perf_counter()
            await runner.run(work)
            timings.append(time.perf_counter() - t0)
        results[label] = min(timings)

    # Catch-up: 1% of the pending requests come due at once; the sweep fires them all.
    due = [r["id"] for r in requests if r["status"] == "pending"][: max(1, pending // 100)]

    def make_due(session: Session) -> None:
        session.execute(
            update(table_of(Request))
            .where(table_of(Request).c.id.in_(due))
            .values(next_due_at=now - timedelta(seconds=1), escalation_level=0)
        )

    await runner.run(make_due)
    t0 = time.perf_counter()
    fired = 0
    while True:
        batch = await runner.run(lambda s: sweep(s, now=now, jobs=JOBS))
        fired += len(batch)
        if len(batch) < 200:
            break
    results[f"sweep firing {len(due):,} due requests"] = time.perf_counter() - t0
    assert fired == len(due), (fired, len(due))
    runner.close()
    await engine.dispose()

    print(f"{engine.dialect.name}: {count:,} requests ({pending:,} pending), target < 1 s each")
    for label, seconds in results.items():
        verdict = "ok" if seconds < 1 else "OVER TARGET"
        print(f"  {label:<36} {seconds * 1000:8.1f} ms  ({seconds:.3f} / 1 s target: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--postgres", help="a PostgreSQL URL (postgresql+asyncpg://...)")
    args = parser.parse_args()
    if args.postgres:
        asyncio.run(bench(args.postgres, args.requests))
        return
    with tempfile.TemporaryDirectory() as folder:
        asyncio.run(bench(f"sqlite+aiosqlite:///{folder}/bench.db", args.requests))


if __name__ == "__main__":
    main()
