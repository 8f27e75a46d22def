"""Soak: a mixed load of intake, clicks and callbacks against `signoff serve` for a few minutes,
then the invariants. Bounded in time and count, loopback only.

    .venv/bin/python bench/soak.py [--seconds 180] [--rate 30] [--concurrency 8] [--postgres URL]

Half the events are small refunds (auto-approved: a signed callback each), half are routed to a
user group (a card each); every routed one is then approved by a click, which decides it and
queues its sync-back callback. Prints throughput, p99 latencies of intake and clicks, and the
memory (RSS) of serve and its outbox worker processes after warm-up and at the end. Then, once
the outbox has drained:

- no accepted event lost: every 202'd delivery has its request, in its final state;
- no side effect applied twice: each callback (by webhook-id) arrived once, each request got one
  card from the Slack stand-in's point of view;
- the audit chain verifies (`signoff audit verify`).

Target (issue 6): RSS growth under 10% over the run, zero lost or duplicated side effects.
The exit status is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.clicks import Clicks  # noqa: E402
from bench.intake import scratch_database, start_serve, wait_ready  # noqa: E402
from bot.slack.standin import DEFAULT_TOKEN, SlackStandIn  # noqa: E402
from tests.slack_support import SIGNING_SECRET  # noqa: E402
from tests.support import children, event_body, free_port, sign  # noqa: E402

CHANNEL, GROUP_ID, GROUP = "C0APPROVALS", "S0APP", "approvers"
APPROVERS = [f"UAPP{n:02d}" for n in range(20)]
POLICY = f"""
rules:
  - name: small-refunds
    when: event.kind == "refund" && event.attributes.amount < 500
    decide: auto_approve
default:
  decide: route
  route: {{channel: {CHANNEL}, approvers: [{{group: {GROUP}, min: 1}}], sla: 30m}}
"""
WARM_UP = 10.0
REQUEST_ID = re.compile(r"Request `(r_[a-z0-9]+)`")
RSS_TARGET = 0.10


@dataclass
class Tally:
    accepted: dict[str, str] = field(default_factory=dict)  # request id -> expected status
    routed: set[str] = field(default_factory=set)
    intake_latency: list[float] = field(default_factory=list)
    click_latency: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


class Receiver:
    """The source system: counts each callback by webhook-id."""

    def __init__(self) -> None:
        self.seen: collections.Counter[str] = collections.Counter()
        self.statuses: dict[str, str] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen[request.headers["webhook-id"]] += 1
        self.statuses[body["request_id"]] = body["status"]
        return web.json_response({"ok": True})


def rss_bytes(pid: int) -> int:
    """The memory of `serve` and of its outbox worker processes, together."""
    total = 0
    for process in (pid, *children(pid)):
        for line in Path(f"/proc/{process}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
        else:
            raise RuntimeError(f"no VmRSS for {process}")
    return total


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)] * 1000


async def user_loop(
    base: str,
    session: aiohttp.ClientSession,
    clicks: Clicks,
    tally: Tally,
    deadline: float,
    callback: str,
    rng: random.Random,
    interval: float,
) -> None:
    """One simulated source + approver: post an event; if routed, approve it with a click; at
    most one event per `interval` seconds, so the load is one the service can sustain."""
    next_at = time.monotonic()
    while time.monotonic() < deadline:
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        small = rng.random() < 0.5
        raw, headers = sign(
            event_body(attributes={"amount": 100 if small else 9000}, callback_url=callback)
        )
        started = time.perf_counter()
        try:
            async with session.post(f"{base}/v1/events", data=raw, headers=headers) as response:
                answer = await response.json()
                status = response.status
        except aiohttp.ClientError as exc:
            tally.errors[f"intake {type(exc).__name__}"] += 1
            continue
        tally.intake_latency.append(time.perf_counter() - started)
        if status != 202:
            tally.errors[f"intake {status}"] += 1
            continue
        request_id = answer["request_id"]
        tally.accepted[request_id] = "approved"
        if small:
            continue
        tally.routed.add(request_id)
        body, click_headers = clicks.body(request_id, "1", rng.choice(APPROVERS))
        started = time.perf_counter()
        try:
            async with session.post(
                f"{base}/slack/events", data=body, headers=click_headers
            ) as response:
                await response.read()
                if response.status != 200:
                    tally.errors[f"click {response.status}"] += 1
        except aiohttp.ClientError as exc:
            tally.errors[f"click {type(exc).__name__}"] += 1
            continue
        tally.click_latency.append(time.perf_counter() - started)


async def drained(database_url: str, timeout: float) -> bool:
    """Until no outbox job is pending or running (they are done or dead)."""
    from sqlalchemy import func, select

    from storage.db import create_engine
    from storage.models import OutboxJob

    engine = create_engine(database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            async with engine.connect() as conn:
                busy = await conn.scalar(
                    select(func.count())
                    .select_from(OutboxJob)
                    .where(OutboxJob.status.in_(["pending", "running"]))
                )
            if not busy:
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await engine.dispose()


async def stored_statuses(database_url: str, ids: list[str]) -> dict[str, str]:
    from sqlalchemy import select

    from storage.db import create_engine
    from storage.models import Request

    engine = create_engine(database_url)
    try:
        found: dict[str, str] = {}
        async with engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = await conn.execute(
                    select(Request.id, Request.status).where(
                        Request.id.in_(ids[start : start + 500])
                    )
                )
                found.update({row.id: row.status for row in rows})
        return found
    finally:
        await engine.dispose()


async def soak(args: argparse.Namespace, database_url: str, tmp: Path) -> int:
    slack = SlackStandIn(
        channels={CHANNEL},
        users={u: {"name": u.lower(), "email": f"{u.lower()}@example.com"} for u in APPROVERS},
        usergroups={GROUP_ID: APPROVERS},
        usergroup_handles={GROUP: GROUP_ID},
    )
    await slack.start()
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/cb", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    receiver_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
    port = free_port()
    serve = start_serve(
        tmp,
        database_url=database_url,
        policy=POLICY,
        port=port,
        SLACK_BOT_TOKEN=DEFAULT_TOKEN,
        SLACK_SIGNING_SECRET=SIGNING_SECRET,
        SLACK_API_URL=slack.url,
    )
    base = f"http://127.0.0.1:{port}"
    tally, warm = Tally(), Tally()
    clicks, rng = Clicks(), random.Random(7)  # noqa: S311 (load shape, not security)
    callback = f"http://127.0.0.1:{receiver_port}/cb"
    interval = args.concurrency / args.rate
    try:
        await wait_ready(f"{base}/healthz", serve)
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            warm_deadline = time.monotonic() + WARM_UP
            await asyncio.gather(
                *(
                    user_loop(base, session, clicks, warm, warm_deadline, callback, rng, interval)
                    for _ in range(args.concurrency)
                )
            )
            rss_start = rss_bytes(serve.pid)
            started = time.monotonic()
            deadline = started + args.seconds
            await asyncio.gather(
                *(
                    user_loop(base, session, clicks, tally, deadline, callback, rng, interval)
                    for _ in range(args.concurrency)
                )
            )
            elapsed = time.monotonic() - started
        rss_end = rss_bytes(serve.pid)
        settled = await drained(database_url, timeout=120)
        verify = subprocess.run(
            [sys.executable, "-m", "bot.cli", "audit", "verify"],
            env={**os.environ, "SIGNOFF_DATABASE_URL": database_url},
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        serve.terminate()
        serve.wait(timeout=60)
        await runner.cleanup()
        await slack.stop()

    accepted = {**warm.accepted, **tally.accepted}
    stored = await stored_statuses(database_url, list(accepted))
    lost = [rid for rid in accepted if rid not in stored]
    not_final = [rid for rid, status in stored.items() if status != "approved"]
    duplicates = {key: n for key, n in receiver.seen.items() if n > 1}
    # Each card's footer names its request: count the cards Slack holds per request.
    cards = collections.Counter(
        match
        for message in slack.messages(CHANNEL)
        if message.thread_ts is None
        for match in set(REQUEST_ID.findall(str(message.blocks)))
    )
    routed = warm.routed | tally.routed
    growth = (rss_end - rss_start) / rss_start
    print(
        f"soak: {args.seconds:g} s after {WARM_UP:g} s warm-up, {args.concurrency} simulated "
        f"sources/approvers, {args.rate:g} events/s offered, "
        f"{'PostgreSQL' if 'postgresql' in database_url else 'SQLite'}"
    )
    print(
        f"  events accepted: {len(tally.accepted):,} ({len(tally.accepted) / elapsed:.0f}/s), "
        f"clicks: {len(tally.click_latency):,} ({len(tally.click_latency) / elapsed:.0f}/s), "
        f"callbacks received: {sum(receiver.seen.values()):,}"
    )
    print(
        f"  p99 intake {p99(tally.intake_latency):.1f} ms, p99 click ack "
        f"{p99(tally.click_latency):.1f} ms; p50 intake "
        f"{statistics.median(tally.intake_latency) * 1000:.1f} ms"
    )
    print(
        f"  serve RSS (its worker processes included) {rss_start / 2**20:.1f} MiB after "
        f"warm-up, {rss_end / 2**20:.1f} MiB at "
        f"the end: {growth:+.1%} (target < +{RSS_TARGET:.0%})"
    )
    checks = {
        "outbox drained": settled,
        "no accepted event lost": not lost,
        "every request decided (approved)": not not_final,
        "each callback once, one per request": not duplicates
        and set(receiver.statuses) == set(stored),
        "one card per routed request": set(cards) == routed and set(cards.values()) <= {1},
        "audit chain verifies": verify.returncode == 0,
        "RSS growth under target": growth < RSS_TARGET,
        "no errors": not (tally.errors + warm.errors),
    }
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")
    if tally.errors or warm.errors:
        print(f"  errors: {dict(tally.errors + warm.errors)}")
    if lost:
        print(f"  lost: {lost[:5]}")
    if duplicates:
        print(f"  duplicated callbacks: {list(duplicates.items())[:5]}")
    return 0 if all(checks.values()) else 1


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--rate",
        type=float,
        default=30.0,
        help="events per second in all (half of them routed and clicked): a sustained load, "
        "not the maximum (bench/intake.py and bench/clicks.py measure that)",
    )
    parser.add_argument("--postgres", help="server URL where a scratch database may be created")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if args.postgres:
            async with scratch_database(args.postgres) as url:
                return await soak(args, url, tmp)
        return await soak(args, f"sqlite+aiosqlite:///{tmp / 'soak.db'}", tmp)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
