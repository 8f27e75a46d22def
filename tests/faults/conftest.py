"""Fault injection: `signoff serve` as real processes, its far sides as real local servers, and
the checks every fault case ends with (`Outcome.check`).

The Slack stand-in and the callback receivers run in the test's own event loop on real ports;
each `signoff serve` is a child process with its own database, killed or restarted like in
production. Nothing of Signoff's is patched: the faults are what the far sides do (refuse
connections, answer 503 or 429, hold a request open) and what happens to the processes
(`kill -9`, a PostgreSQL restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from bot.slack.cards import button_value
from bot.slack.jobs import POST_CARD
from bot.slack.standin import DEFAULT_TOKEN, RecordedCall, SlackStandIn
from storage.db import create_engine, sessionmaker
from storage.models import AuditRecord, EventRecord, JobStatus, OutboxJob, Request, Vote
from tests.e2e.conftest import API_TOKEN, Serve
from tests.integration.conftest import SLACK_USERS
from tests.slack_support import SIGNING_SECRET, block_action, signed
from tests.support import POLICY, SECRET, CallbackSink, Delivery, free_port, run_signoff, sign

CHANNELS = ("C0FINANCE", "C0APPROVALS")
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Conftest hooks see every collected test: mark only this folder's.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.faults)


def serve_env(db_url: str, *, slack: SlackStandIn | None = None, **extra: str) -> dict[str, str]:
    """`signoff serve`'s environment: quick retries with a budget that outlasts the faults."""
    env = {
        **os.environ,
        "SIGNOFF_DATABASE_URL": db_url,
        "SIGNOFF_POLICY_PATH": str(POLICY),
        "SIGNOFF_WEBHOOK_SECRET": SECRET,
        "SIGNOFF_API_TOKEN": API_TOKEN,
        "SIGNOFF_HOST": "127.0.0.1",
        "SIGNOFF_OUTBOX_BACKOFF_BASE": "0.1",
        "SIGNOFF_OUTBOX_BACKOFF_MAX": "0.5",
        "SIGNOFF_OUTBOX_MAX_ATTEMPTS": "100",
        "SIGNOFF_CALLBACK_TIMEOUT": "5",
        "SIGNOFF_SHUTDOWN_GRACE": "5",
        "SIGNOFF_SLACK_GROUP_TTL": "60",
    }
    for name in ("SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_API_URL", "SLACK_APP_TOKEN"):
        env.pop(name, None)
    if slack is not None:
        env.update(
            SLACK_BOT_TOKEN=DEFAULT_TOKEN,
            SLACK_SIGNING_SECRET=SIGNING_SECRET,
            SLACK_API_URL=slack.url,
        )
    env.update(extra)
    return env


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], log: Path, count: int = 1) -> AsyncIterator[list[Serve]]:
    """`count` replicas of `signoff serve` on free ports, SIGKILLed at the end if still up."""
    replicas = [
        Serve({**env, "SIGNOFF_PORT": str(port)}, port, log.with_suffix(f".{n}.log"))
        for n, port in enumerate(free_port() for _ in range(count))
    ]
    try:
        # One at a time: the first creates the schema, the others find it there.
        for replica in replicas:
            await replica.start()
        yield replicas
    finally:
        for replica in replicas:
            if replica.process is not None:
                replica.crash()


@contextlib.asynccontextmanager
async def slack_standin() -> AsyncIterator[SlackStandIn]:
    """The Slack Web API stand-in with the integration tests' workspace."""
    standin = SlackStandIn(
        channels=set(CHANNELS),
        users=SLACK_USERS,
        usergroups={"S0FIN": ["UA1", "UA2", "UDANA"], "S0APP": ["UA1", "UA2"]},
        usergroup_handles={"finance-leads": "S0FIN", "approvers": "S0APP"},
    )
    await standin.start()
    try:
        yield standin
    finally:
        await standin.stop()


@contextlib.asynccontextmanager
async def callback_sink() -> AsyncIterator[CallbackSink]:
    sink = CallbackSink()
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


# --- the source side: deliveries sent until accepted ------------------------------------------


@dataclass
class Source:
    """A source system posting signed events: every `202` is remembered, with its answer.

    `deliver` sends one delivery (one `webhook-id`) until it is accepted, the way a well-behaved
    source retries: a `503` must say to retry, and a connection refused or reset is retried too.
    """

    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)
    unavailable: list[dict[str, Any]] = field(default_factory=list)
    refused_connections: int = 0

    async def post(
        self, client: httpx.AsyncClient, base_url: str, body: dict[str, Any], msg_id: str
    ) -> httpx.Response:
        # Signed afresh on each attempt (a new timestamp), under the same webhook-id.
        raw, headers = sign(body, msg_id=msg_id)
        response = await client.post(f"{base_url}/v1/events", content=raw, headers=headers)
        if response.status_code == 202:
            self.accepted[msg_id] = dict(response.json())
        return response

    async def deliver(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        body: dict[str, Any],
        msg_id: str,
        *,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                response = await self.post(client, base_url, body, msg_id)
            except httpx.TransportError:
                self.refused_connections += 1
            else:
                if response.status_code == 202:
                    return dict(response.json())
                assert response.status_code == 503, (response.status_code, response.text)
                answer = response.json()
                assert answer.get("retry") is True, answer
                self.unavailable.append(answer)
            assert time.monotonic() < deadline, f"{msg_id} never accepted"
            await asyncio.sleep(0.2)


# --- Slack side: clicks ------------------------------------------------------------------------


async def click(
    client: httpx.AsyncClient, base_url: str, request_id: str, user: str, *, version: str = "1"
) -> None:
    """An approver clicks Approve on the card (a signed block_actions, as Slack sends it)."""
    body = block_action(
        action_id="signoff_approve", value=button_value(request_id, version), user=user
    )
    response = await client.post(f"{base_url}/slack/events", content=body, headers=signed(body))
    assert response.status_code == 200, response.text


async def vote(
    client: httpx.AsyncClient, base_url: str, db_url: str, request_id: str, user: str
) -> int:
    """Click Approve until the vote is counted, as an approver told "click again" does;
    returns how many clicks it took."""
    for clicks in range(1, 60):
        await click(client, base_url, request_id, user)
        async with database(db_url) as sessions, sessions() as session:
            counted = await session.scalar(
                select(Vote.id).where(Vote.request_id == request_id, Vote.user_id == user)
            )
        if counted is not None:
            return clicks
        await asyncio.sleep(0.3)
    raise AssertionError(f"the vote of {user} on {request_id} was never counted")


# --- waiting and reading the database ----------------------------------------------------------


@contextlib.asynccontextmanager
async def database(db_url: str) -> AsyncIterator[Any]:
    engine = create_engine(db_url)
    try:
        yield sessionmaker(engine)
    finally:
        await engine.dispose()


async def jobs_by_status(db_url: str) -> Counter[str]:
    async with database(db_url) as sessions, sessions() as session:
        rows = await session.execute(
            select(OutboxJob.status, func.count()).group_by(OutboxJob.status)
        )
        return Counter({status: count for status, count in rows})


async def wait_for_outbox(db_url: str, timeout: float = 60.0) -> Counter[str]:
    """Every outbox job done (none pending, running or dead), or fail saying what is left."""
    deadline = time.monotonic() + timeout
    while True:
        statuses = await jobs_by_status(db_url)
        if set(statuses) <= {JobStatus.done.value}:
            return statuses
        if time.monotonic() > deadline:
            raise AssertionError(f"outbox not settled after {timeout:g}s: {dict(statuses)}")
        await asyncio.sleep(0.3)


async def wait_until(predicate: Any, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached after {timeout:g}s")
        await asyncio.sleep(0.1)


async def request_ids_with_cards(db_url: str) -> dict[str, str]:
    async with database(db_url) as sessions, sessions() as session:
        rows = await session.execute(
            select(Request.id, Request.card_ts).where(Request.card_ts.is_not(None))
        )
        return {row.id: row.card_ts for row in rows}


# --- the checks every case ends with ------------------------------------------------------------


def card_posts(slack: SlackStandIn, request_id: str) -> list[tuple[int, RecordedCall]]:
    """Successful top-level chat.postMessage calls carrying this request's card, by position."""
    return [
        (index, call)
        for index, call in enumerate(slack.calls)
        if call.method == "chat.postMessage"
        and call.ok
        and not call.params.get("thread_ts")
        and call.params.get("channel") in CHANNELS
        and request_id in json.dumps(call.params.get("blocks") or [])
    ]


@dataclass
class Outcome:
    """What a case leaves behind, checked the same way every time (`check`)."""

    db_url: str
    env: dict[str, str]
    source: Source
    sinks: Sequence[CallbackSink] = ()
    slack: SlackStandIn | None = None

    async def check(
        self, *, thread_replies: dict[str, int] | None = None, settle: float = 60.0
    ) -> None:
        """No accepted event lost, no side effect applied twice, the audit chain verifies.

        Waits for the outbox to settle first. `thread_replies` (request id -> votes) also
        checks that each vote's thread reply was posted once.
        """
        await wait_for_outbox(self.db_url, settle)
        await asyncio.sleep(0.5)  # a repeat in flight would land now
        async with database(self.db_url) as sessions, sessions() as session:
            events = {
                row.delivery_id: row
                for row in await session.execute(
                    select(EventRecord.delivery_id, EventRecord.id, EventRecord.request_id)
                )
            }
            requests = {
                row.id: row
                for row in await session.execute(
                    select(Request.id, Request.event_id, Request.status, Request.card_ts)
                )
            }
            audited = {
                (row.kind, row.request_id or row.event_id)
                for row in await session.execute(
                    select(AuditRecord.kind, AuditRecord.request_id, AuditRecord.event_id)
                )
            }
            sync_keys = set(
                await session.scalars(
                    select(OutboxJob.idempotency_key).where(
                        OutboxJob.idempotency_key.like("sync-%")
                    )
                )
            )
            card_jobs = set(
                await session.scalars(
                    select(OutboxJob.request_id).where(OutboxJob.kind == POST_CARD)
                )
            )

        # No accepted event lost: every 202'd delivery has its event, and its request.
        assert self.source.accepted, "the case accepted nothing"
        for msg_id, answer in self.source.accepted.items():
            event = events.get(f"webhook:{msg_id}")
            assert event is not None, f"delivery {msg_id} was accepted, then lost"
            assert event.request_id == answer["request_id"], (msg_id, answer)
            if answer["request_id"] is not None:
                assert answer["request_id"] in requests, f"{msg_id}: request lost"
        # Nothing half-written: every request has its event and the audit records of both.
        for request in requests.values():
            assert request.event_id in {e.id for e in events.values()}, request
            assert ("decision.made", request.id) in audited, request
        for event in events.values():
            assert ("event.received", event.id) in audited, event

        # No side effect applied twice: each callback key delivered once, none missing.
        if self.sinks:
            delivered: dict[str, list[Delivery]] = {}
            for sink in self.sinks:
                for key, copies in sink.unique_deliveries().items():
                    delivered.setdefault(key, []).extend(copies)
            repeated = {key: len(d) for key, d in delivered.items() if len(d) > 1}
            assert not repeated, f"callbacks delivered more than once: {repeated}"
            assert set(delivered) == sync_keys, set(delivered) ^ sync_keys
            for key, [delivery] in delivered.items():
                assert key == f"sync-{delivery.body['request_id']}"
                assert requests[delivery.body["request_id"]].status == delivery.body["status"]
        # Each card posted once, before its updates and thread replies.
        if self.slack is not None:
            for request_id in card_jobs:
                posts = card_posts(self.slack, request_id)
                assert len(posts) == 1, f"{request_id}: {len(posts)} cards posted"
                [(posted_at, post)] = posts
                card_ts = requests[request_id].card_ts
                assert card_ts is not None
                for index, call in enumerate(self.slack.calls):
                    if call.ok and card_ts in (call.params.get("ts"), call.params.get("thread_ts")):
                        assert index > posted_at, f"{request_id}: {call.method} before its card"
                [message] = [
                    m for m in self.slack.messages(str(post.params["channel"])) if m.ts == card_ts
                ]
                # The card as it reads now shows the request as it stands: no update was lost
                # or overtaken by an older one.
                decided = requests[request_id].status != "pending"
                assert ("signoff_approve" in json.dumps(message.blocks)) is not decided
                if thread_replies is not None and request_id in thread_replies:
                    replies = self.slack.messages(str(post.params["channel"]), thread_ts=card_ts)
                    # A line per vote; votes in quick succession may share one reply.
                    votes = [
                        line
                        for reply in replies
                        for line in reply.text.splitlines()
                        if line.startswith((":white_check_mark:", ":x:"))
                    ]
                    assert len(votes) == thread_replies[request_id], (request_id, replies)

        # The audit chain verifies.
        verified = run_signoff("audit", "verify", env=self.env)
        assert verified.returncode == 0, verified.stdout + verified.stderr


# --- a private PostgreSQL server, for the cases that stop it -----------------------------------


def _postgres_bindir() -> Path | None:
    configured = os.environ.get("SIGNOFF_TEST_PG_BINDIR")
    candidates = [Path(configured)] if configured else []
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).parent)
    return next((c for c in candidates if (c / "initdb").is_file()), None)


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of our own on a free port, which a test may stop and start.

    initdb and postgres refuse to run as root; as root, they run as `nobody` through runuser,
    in a temporary directory handed to that user.
    """

    bindir: Path
    root: Path
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        prefix = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        done = subprocess.run(
            [*prefix, str(self.bindir / tool), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"{tool} failed: {done.stdout}{done.stderr}"

    def init(self) -> None:
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
        self._run("initdb", "-A", "trust", "-U", "postgres", "-D", str(self.data), "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.root / "postgres.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", mode, "stop")


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip(
            "needs PostgreSQL's server binaries (initdb, pg_ctl) for a private server: "
            "install postgresql or set SIGNOFF_TEST_PG_BINDIR"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root, and initdb refuses root: needs runuser to run as nobody")
    server = PrivatePostgres(bindir, Path(tempfile.mkdtemp(prefix="signoff-pg-")))
    try:
        server.init()
        server.start()
        yield server
    finally:
        with contextlib.suppress(AssertionError):
            server.stop("immediate")
        shutil.rmtree(server.root, ignore_errors=True)
