"""Click acks: signed Slack `block_actions` clicks at 1 and 16 connections against `signoff serve`,
a minimal Bolt `AsyncApp` whose handler only calls `ack()`, and a bare aiohttp handler, in the
same run. Prints clicks/s, ack p50/p99, the ratios and Signoff's CPU per click.

    .venv/bin/python bench/clicks.py [--seconds 5] [--requests 50] [--users 2000] [--postgres URL]
                                     [--profile DIR]  (py-spy raw profiles of each server run)
                                     [--engine wrk|python]

The clicks are built and signed before each run and sent by `wrk` when it is installed
(`bench/wrk.py`): a Python client took most of the second core, which the servers then lacked
(the bare handler measured ~7,900 requests/s through it, ~14,000 through wrk).

Every click Signoff acks is a new durable vote. The policy routes every event to a user group of
`--users` members with a quorum nobody can reach (`min` above the group's size), so requests stay
pending; each click is a distinct (request, user) pair, round-robin over `--requests` pending
requests so that clicks do not all queue on one request's row lock. At the end the votes in the
database are counted against the clicks Signoff acked.

Slack is the local stand-in (bot/slack/standin.py), in its own process at low CPU priority: it
stands for a remote service, whose CPU should not be taken from the processes measured. Each vote
also queues a card update and a thread reply, which Signoff's outbox worker delivers to the
stand-in while the clicks run, as it would in production.

The minimal Bolt app is Bolt's defaults (no `process_before_response`), served through
`slack_bolt.adapter.aiohttp` like Signoff's; its client points at the stand-in for `auth.test`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlencode

import aiohttp
from aiohttp import web
from slack_sdk.signature import SignatureVerifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import wrk  # noqa: E402
from bench.intake import cpu_seconds, py_spy, scratch_database, start_serve, wait_ready  # noqa: E402
from bot.slack.cards import APPROVE_ACTION, button_value  # noqa: E402
from bot.slack.standin import DEFAULT_TOKEN  # noqa: E402
from tests.slack_support import SIGNING_SECRET, block_action  # noqa: E402
from tests.support import event_body, free_port, sign  # noqa: E402

GROUP_ID, GROUP_HANDLE, CHANNEL = "S0APP", "approvers", "C0APPROVALS"
POLICY = f"""
rules: []
default:
  decide: route
  route: {{channel: {CHANNEL}, approvers: [{{group: {GROUP_HANDLE}, min: 100000}}]}}
"""
CONNECTIONS = (1, 16)
POOL = 2000  # signed clicks sent over and over to the servers that keep nothing
TARGET_P50_MS = 3.0


def user_ids(count: int) -> list[str]:
    return [f"U{n:04d}" for n in range(count)]


# --- the servers, each in its own process -------------------------------------------------------


def standin_server(port: int, users: int) -> None:
    from bot.slack.standin import SlackStandIn

    os.nice(10)  # Slack's CPU is not ours: let the measured processes go first

    async def run() -> None:
        ids = user_ids(users)
        standin = SlackStandIn(
            channels={CHANNEL},
            users={
                u: {"name": u.lower(), "real_name": u, "email": f"{u}@example.com"} for u in ids
            },
            usergroups={GROUP_ID: ids},
            usergroup_handles={GROUP_HANDLE: GROUP_ID},
        )
        await standin.start(port=port)
        await asyncio.Event().wait()  # until SIGTERM

    asyncio.run(run())


def bolt_server(port: int, slack_url: str) -> None:
    from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
    from slack_bolt.async_app import AsyncAck, AsyncApp
    from slack_sdk.web.async_client import AsyncWebClient

    app = AsyncApp(
        signing_secret=SIGNING_SECRET,
        client=AsyncWebClient(token=DEFAULT_TOKEN, base_url=slack_url),
    )

    @app.action(APPROVE_ACTION)
    async def approve(ack: AsyncAck) -> None:
        await ack()

    async def handle(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await app.async_dispatch(await to_bolt_request(request)))

    server = web.Application()
    server.router.add_post("/slack/events", handle)
    web.run_app(server, host="127.0.0.1", port=port, print=None, access_log=None)


def bare_server(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response()

    app = web.Application()
    app.router.add_post("/slack/events", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


# --- clicks ------------------------------------------------------------------------------------


class Clicks:
    """Signed `block_actions` bodies shaped like Slack's, one per (request, user) pair."""

    def __init__(self) -> None:
        raw = block_action(action_id=APPROVE_ACTION, value="", user="U0", channel=CHANNEL)
        self._template = json.loads(parse_qs(raw)["payload"][0])
        self._signer = SignatureVerifier(SIGNING_SECRET)

    def body(self, request_id: str, version: str, user: str) -> tuple[bytes, dict[str, str]]:
        payload = self._template
        payload["user"].update(id=user, username=user.lower(), name=user.lower())
        payload["actions"][0]["value"] = button_value(request_id, version)
        payload["trigger_id"] = f"{time.time_ns()}.trigger"
        body = urlencode({"payload": json.dumps(payload)})
        moment = str(int(time.time()))
        return body.encode(), {
            "content-type": "application/x-www-form-urlencoded",
            "x-slack-request-timestamp": moment,
            "x-slack-signature": self._signer.generate_signature(timestamp=moment, body=body),
        }

    def distinct(self, requests: Sequence[tuple[str, str]], users: Sequence[str]) -> Iterator:
        """Every (request, user) pair once, the requests taking turns."""
        for user in users:
            for request_id, version in requests:
                yield request_id, version, user

    def take(self, pairs: Iterator, count: int) -> list[tuple[bytes, dict[str, str]]]:
        """Built and signed before a run starts, so the load generator only sends."""
        return [self.body(*pair) for pair in itertools.islice(pairs, count)]


@dataclass
class Figures:
    connections: int
    rate: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    sent: int = 0
    acked: int = 0
    errors: int = 0
    exhausted: bool = False
    cpu: float = 0.0  # the server's CPU seconds during the run (its worker processes' too)
    http_cpu: float = 0.0  # of which its HTTP process's
    latencies: list[float] = field(default_factory=list, repr=False)


async def load(
    url: str, bodies: Iterator[tuple[bytes, dict[str, str]]], *, seconds: float, connections: int
) -> Figures:
    """Send bodies on `connections` keep-alive connections until time is up or none are left."""
    figures = Figures(connections)
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            item = next(bodies, None)
            if item is None:
                figures.exhausted = True
                return
            raw, headers = item
            started = time.perf_counter()
            try:
                async with session.post(url, data=raw, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            figures.latencies.append(time.perf_counter() - started)
            figures.sent += 1
            figures.acked += ok
            figures.errors += not ok

    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    elapsed = time.monotonic() - started
    ordered = sorted(figures.latencies)
    if ordered:
        figures.rate = len(ordered) / elapsed
        figures.p50 = ordered[len(ordered) // 2] * 1000
        figures.p99 = ordered[max(0, math.ceil(len(ordered) * 0.99) - 1)] * 1000
    return figures


def start_profile(pid: int, out: Path | None, seconds: float) -> subprocess.Popen[bytes] | None:
    """`--profile DIR`: py-spy samples the server while a run lasts, per thread and idle frames
    included (an ack mostly waits: on the database's write lock, on the writer thread), in
    py-spy's raw format (collapsed stacks, for flamegraph.pl)."""
    spy = py_spy()
    if out is None or spy is None:
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--idle",
            "--threads",
            "-p",
            str(pid),
            "-d",
            str(math.ceil(seconds)),
            "-f",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def measure(
    name: str,
    url: str,
    pid: int,
    bodies_for: dict[int, Iterator[tuple[bytes, dict[str, str]]]],
    args: argparse.Namespace,
    *,
    repeats: bool = False,
) -> list[Figures]:
    results = []
    for connections in CONNECTIONS:
        out = None
        if args.profile:
            out = Path(args.profile) / f"{name.replace(' ', '-')}-{connections}.txt"
        spy = start_profile(pid, out, args.seconds)
        bodies = bodies_for[connections]
        before = cpu_seconds(pid)
        http_before = cpu_seconds(pid, workers=False)
        if args.engine == "wrk":
            figures = await wrk_load(url, bodies, args.seconds, connections, repeats)
        else:
            figures = await load(url, bodies, seconds=args.seconds, connections=connections)
        figures.cpu = cpu_seconds(pid) - before
        figures.http_cpu = cpu_seconds(pid, workers=False) - http_before
        results.append(figures)
        if spy is not None:
            spy.wait(timeout=60)
    return results


async def wrk_load(
    url: str,
    bodies: Iterator[tuple[bytes, dict[str, str]]],
    seconds: float,
    connections: int,
    repeats: bool,
) -> Figures:
    """`load` with wrk sending: `bodies` is taken whole (a cycled pool: its first cycle)."""
    records = list(itertools.islice(bodies, POOL)) if repeats else list(bodies)
    result = await asyncio.to_thread(
        wrk.replay, url, records, seconds=seconds, connections=connections, may_repeat=repeats
    )
    errors = int(result["errors"])
    return Figures(
        connections,
        rate=result["rps"],
        p50=result["p50"],
        p99=result["p99"],
        sent=int(result["n"]),
        acked=int(result["n"]) - errors,
        errors=errors,
    )


# --- the targets -------------------------------------------------------------------------------


def spawn(*role: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *role])


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def run_baseline(
    name: str, role: list[str], args: argparse.Namespace, clicks: Clicks, requests: list
) -> list[Figures]:
    port = free_port()
    process = spawn(*role, str(port))
    try:
        url = f"http://127.0.0.1:{port}/slack/events"
        await wait_ready(url, process)
        # The servers keep nothing, so a pool of signed clicks is sent over and over.
        pool = clicks.take(clicks.distinct(requests, user_ids(args.users)), POOL)
        await load(url, itertools.cycle(pool), seconds=1, connections=16)  # warm-up
        cycled = {n: itertools.cycle(pool) for n in CONNECTIONS}
        return await measure(name, url, process.pid, cycled, args, repeats=True)
    finally:
        stop(process)


@dataclass
class Check:
    votes: int = 0
    refused: int = 0
    acked: int = 0
    backlog: int = 0
    backlog_left: int = 0
    backlog_after: float = 0.0


async def open_requests(base: str, count: int) -> list[tuple[str, str]]:
    requests = []
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            body = event_body()
            raw, headers = sign(body)
            async with session.post(f"{base}/v1/events", data=raw, headers=headers) as response:
                answer = await response.json()
            if answer.get("status") != "pending":
                raise SystemExit(f"expected a pending request, got {answer}")
            requests.append((str(answer["request_id"]), str(body["version"])))
    return requests


async def counts(database_url: str) -> tuple[int, int, int, int]:
    """Votes, refused clicks, cards posted, outbox jobs not finished yet."""
    from sqlalchemy import func, select
    from sqlalchemy.ext.asyncio import create_async_engine

    from storage.models import AuditRecord, JobStatus, OutboxJob, Request, Vote

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            votes = await conn.scalar(select(func.count()).select_from(Vote))
            refused = await conn.scalar(
                select(func.count()).where(AuditRecord.kind == "vote.refused")
            )
            cards = await conn.scalar(select(func.count()).where(Request.card_ts.is_not(None)))
            backlog = await conn.scalar(
                select(func.count()).where(
                    OutboxJob.status.in_([JobStatus.pending.value, JobStatus.running.value])
                )
            )
    finally:
        await engine.dispose()
    return int(votes or 0), int(refused or 0), int(cards or 0), int(backlog or 0)


async def run_signoff(
    name: str, database_url: str, slack_url: str, args: argparse.Namespace, clicks: Clicks
) -> tuple[list[Figures], Check]:
    port = free_port()
    check = Check()
    with tempfile.TemporaryDirectory() as tmp:
        database_url = database_url.replace("{tmp}", tmp)
        process = start_serve(
            Path(tmp),
            database_url=database_url,
            policy=POLICY,
            port=port,
            SLACK_BOT_TOKEN=DEFAULT_TOKEN,
            SLACK_SIGNING_SECRET=SIGNING_SECRET,
            SLACK_API_URL=slack_url,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            await wait_ready(f"{base}/healthz", process)
            requests = await open_requests(base, args.requests)
            for _ in range(300):  # the cards are posted through the outbox
                if (await counts(database_url))[2] == len(requests):
                    break
                await asyncio.sleep(0.1)
            pairs = clicks.distinct(requests, user_ids(args.users))
            url = f"{base}/slack/events"
            # Warm-up: auth.test and the user group fetch happen on the first clicks.
            warm = await load(url, iter(clicks.take(pairs, 500)), seconds=1, connections=16)
            check.acked += warm.acked
            bodies = {n: iter(clicks.take(pairs, args.clicks)) for n in CONNECTIONS}
            results = await measure(name, url, process.pid, bodies, args)
            check.acked += sum(figures.acked for figures in results)
            check.votes, check.refused, _, check.backlog = await counts(database_url)
            check.backlog_left = check.backlog
            started = time.monotonic()
            while check.backlog_left and time.monotonic() - started < args.drain:
                await asyncio.sleep(0.5)
                check.backlog_left = (await counts(database_url))[3]
            check.backlog_after = time.monotonic() - started
            return results, check
        finally:
            stop(process)


# --- report ------------------------------------------------------------------------------------


def row(name: str, figures: Figures) -> str:
    bound = "  (ran out of clicks: raise --clicks)" if figures.exhausted else ""
    return (
        f"{name:<24} {figures.connections:>5} {figures.rate:>10.0f} {figures.p50:>9.2f} ms "
        f"{figures.p99:>8.2f} ms {figures.sent:>8} {figures.errors:>7} "
        f"{1000 * figures.cpu / max(figures.sent, 1):>7.2f} ms{bound}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5, help="per run (default 5)")
    parser.add_argument("--requests", type=int, default=50, help="pending requests clicked on")
    parser.add_argument("--users", type=int, default=2000, help="members of the approver group")
    parser.add_argument(
        "--clicks", type=int, default=20000, help="at most this many clicks per Signoff run"
    )
    parser.add_argument(
        "--postgres",
        help="postgresql+asyncpg:// URL of a server where a scratch database may be created",
    )
    parser.add_argument(
        "--drain", type=float, default=60, help="seconds to wait for the outbox to drain"
    )
    parser.add_argument("--profile", help="a directory for py-spy raw profiles of each run")
    parser.add_argument(
        "--engine",
        choices=["wrk", "python"],
        default="wrk" if wrk.available() else "python",
        help="load generator (default: wrk when installed)",
    )
    args = parser.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    needed = 500 + args.clicks * len(CONNECTIONS)
    if args.requests * args.users < needed:
        parser.error(f"--requests x --users must be at least {needed} distinct clicks")

    clicks = Clicks()
    slack_port = free_port()
    standin = spawn("--standin", str(slack_port), str(args.users))
    slack_url = f"http://127.0.0.1:{slack_port}/api/"
    results: dict[str, list[Figures]] = {}
    checks: dict[str, Check] = {}
    try:
        await wait_ready(f"{slack_url}auth.test", standin)
        fake = [(f"r-{n}", "1") for n in range(args.requests)]
        results["bare aiohttp"] = await run_baseline(
            "bare aiohttp", ["--bare-server"], args, clicks, fake
        )
        results["minimal Bolt AsyncApp"] = await run_baseline(
            "minimal Bolt", ["--bolt-server", slack_url], args, clicks, fake
        )
        name = "signoff on SQLite"
        results[name], checks[name] = await run_signoff(
            name, "sqlite+aiosqlite:///{tmp}/signoff.db", slack_url, args, clicks
        )
        if args.postgres:
            async with scratch_database(args.postgres) as url:
                name = "signoff on PostgreSQL"
                results[name], checks[name] = await run_signoff(name, url, slack_url, args, clicks)
    finally:
        stop(standin)

    print(
        f"signed block_actions clicks, {args.seconds:g} s per run, {os.cpu_count()} CPUs; "
        f"Signoff: {args.requests} pending requests, {args.users} approvers, every ack a new vote"
    )
    print(
        f"{'target':<24} {'conns':>5} {'clicks/s':>10} {'ack p50':>12} {'ack p99':>11} "
        f"{'clicks':>8} {'errors':>7} {'CPU/click':>10}"
    )
    for name, runs in results.items():
        for figures in runs:
            print(row(name, figures))
    bolt = results["minimal Bolt AsyncApp"]
    for name, check in checks.items():
        one, many = results[name]
        print(
            f"{name}: {many.rate / bolt[1].rate:.2f}x the minimal Bolt app's clicks/s at "
            f"{many.connections} connections (target >= 1x); ack p50 {one.p50:.2f} ms at 1 "
            f"connection (target < {TARGET_P50_MS:g} ms; minimal Bolt {bolt[0].p50:.2f} ms)"
        )
        cpu = ", ".join(
            f"{1000 * f.cpu / max(f.sent, 1):.2f} ms at {f.connections} (HTTP process "
            f"{1000 * f.http_cpu / max(f.sent, 1):.2f})"
            for f in (one, many)
        )
        print(f"{'':<4}serve CPU per click (its side effects included): {cpu}")
        rate = (check.backlog - check.backlog_left) / max(check.backlog_after, 1e-9)
        drained = (
            f"drained {check.backlog_after:.1f} s later"
            if not check.backlog_left
            else f"{check.backlog_left} left {check.backlog_after:.0f} s later"
        )
        drained += f" ({rate:.0f} jobs/s)"
        print(
            f"{'':<4}votes in the database {check.votes}, clicks acked {check.acked} "
            f"(warm-up included; wrk stops with a click per connection in flight, which may be "
            f"voted unseen), refused {check.refused}; outbox jobs queued when the clicks "
            f"stopped: {check.backlog}, {drained} through the stand-in"
        )


if __name__ == "__main__":
    if "--standin" in sys.argv:
        at = sys.argv.index("--standin")
        standin_server(int(sys.argv[at + 1]), int(sys.argv[at + 2]))
    elif "--bolt-server" in sys.argv:
        at = sys.argv.index("--bolt-server")
        bolt_server(int(sys.argv[at + 2]), sys.argv[at + 1])
    elif "--bare-server" in sys.argv:
        bare_server(int(sys.argv[sys.argv.index("--bare-server") + 1]))
    else:
        asyncio.run(main())
