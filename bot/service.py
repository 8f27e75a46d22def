"""The running service: what `signoff serve` starts, in order, and stops, in reverse
(`Services`), and what each of its outbox worker processes runs (`WorkerServices`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.clock import Clock, SystemClock
from bot.connectors import build_connectors
from bot.metrics import Metrics
from bot.processes import WorkerProcesses
from bot.schedule import cron_trigger
from bot.scheduler import DigestPlan, Scheduler
from bot.settings import Settings
from bot.slack import jobs as slack_jobs
from bot.slack import notices
from bot.slack.app import SlackBot
from bot.slack.clicks import ClickService
from bot.slack.client import close_client, make_client
from bot.slack.commands import Commands
from bot.slack.directory import Directory, load_user_map
from bot.sync import SyncBack
from bot.worker import Handler, OutboxWorker
from connectors.base import Cancellation, Connector
from connectors.events import Event
from connectors.outbound import Outbound
from connectors.redaction import redact_text
from connectors.webhook import intake as webhook
from connectors.webhook.connector import WebhookConnector
from policies.anomaly import Measurement, anomaly_of
from policies.gateway import Policy
from policies.loader import load_policy
from policies.model import Decision
from storage.baselines import Baselines
from storage.batcher import WriteBatcher
from storage.db import TransactionRunner, create_engine, sessionmaker
from storage.errors import DatabaseUnavailable
from storage.ledger import Cancel, CancelResult, Intake, IntakeResult
from storage.models import RequestStatus
from storage.requests import StatusWatch
from storage.schema import ensure_schema
from storage.timers import TimerJobs

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything a request handler needs, built once at start-up."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    policy: Policy
    baselines: Baselines
    connectors: dict[str, Connector]
    batcher: WriteBatcher
    runner: TransactionRunner
    watch: StatusWatch
    http: Outbound
    scheduler: Scheduler
    metrics: Metrics
    # The outbox worker, when it runs in this process; with `workers`, processes of its own
    # run it (bot.processes) and this is None.
    worker: OutboxWorker | None = None
    workers: WorkerProcesses | None = None
    slack: SlackBot | None = None
    socket_mode: AsyncSocketModeHandler | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _worker_task: asyncio.Task[None] | None = None

    def wake_outbox(self) -> None:
        """Jobs were just committed: the worker claims now instead of at its next poll."""
        if self.worker is not None:
            self.worker.wake()
        if self.workers is not None:
            self.workers.wake()

    def metrics_exposition(self) -> bytes:
        """This process's metrics, with its worker processes' merged in."""
        if self.workers is not None:
            self.metrics.worker_processes.set(self.workers.running)
            return self.metrics.exposition(self.workers.expositions())
        return self.metrics.exposition()

    @property
    def webhook(self) -> WebhookConnector:
        connector = self.connectors[webhook.NAME]
        assert isinstance(connector, WebhookConnector)
        return connector

    async def assess(self, event: Event, connector: Connector) -> Intake:
        """Score the event against its anomaly baseline (if the policy keeps one for it), then
        decide. A gateway score replaces one the connector attached."""
        measurement = self.policy.measure(event)
        if measurement is not None:
            state = await self.baselines.current(measurement.baseline)
            event = event.model_copy(update={"anomaly": anomaly_of(state, measurement)})
        return self.intake(event, self.policy.decide(event), connector, measurement)

    def intake(
        self,
        event: Event,
        decision: Decision,
        connector: Connector,
        measurement: Measurement | None = None,
    ) -> Intake:
        """The ledger entry for an accepted event, with the side effects it must queue. An
        event without sync-back data (no callback_url) asks for no answer."""
        return Intake(
            event,
            decision,
            sync_kind=connector.sync_kind if event.sync else None,
            card_kind=slack_jobs.POST_CARD if self.slack else None,
            card_update_kind=slack_jobs.UPDATE_CARD if self.slack else None,
            measurement=measurement,
        )

    def cancel(self, cancellation: Cancellation) -> Cancel:
        return Cancel(cancellation, card_update_kind=slack_jobs.UPDATE_CARD if self.slack else None)

    @classmethod
    async def start(
        cls,
        settings: Settings,
        *,
        clock: Clock | None = None,
        workers: WorkerProcesses | None = None,
    ) -> Services:
        """Everything up and running. `clock` drives scheduled work (a test's ManualClock);
        with one given, the scheduler does not tick by itself: the test calls `tick()`.
        `workers`: worker processes run the outbox (`serve` starts them once this returns),
        so none runs in this process."""
        settings.require("webhook_secret", purpose="the /v1/events intake")
        settings.require("policy_path", purpose="deciding events")
        assert settings.webhook_secret is not None and settings.policy_path is not None
        # Load the policy before touching the database: a broken policy should stop start-up
        # with its problems listed, not after a migration.
        policy = load_policy(settings.policy_path)
        # The connectors too: a GitHub App key that cannot be read is a settings error.
        http = Outbound()
        connectors = build_connectors(settings, http)
        engine = await _open_database(settings, http)
        sessions = sessionmaker(engine)
        metrics = Metrics()
        baselines = Baselines(sessions)
        watch = StatusWatch()
        # With the outbox in processes of its own, this process's loop runs only requests and
        # short sweeps: its transactions run inline (storage.db.TransactionRunner). Measured,
        # that cut intake's CPU per event from ~1.08 to ~0.69 ms (its throughput from ~850 to
        # ~1,350 events/s) and a click's from ~0.8 to ~0.7 ms. With the worker in this process,
        # the database thread lets requests go before side effects (storage.writer_thread).
        runner = TransactionRunner(engine, inline=workers is not None)
        the_clock = clock or SystemClock()
        slack_parts = _slack_parts(settings, metrics) if settings.slack_bot_token else None
        worker = None
        if workers is None:
            worker = outbox_worker(
                settings,
                runner,
                sessions,
                outbox_handlers(runner, sessions, connectors, slack_parts, the_clock),
                metrics,
            )
        services: Services

        def changed(request_id: str) -> None:
            watch.notify([request_id])
            services.wake_outbox()

        def committed(results: Sequence[IntakeResult | CancelResult]) -> None:
            watch.notify([result.request_id for result in results])
            for result in results:
                if isinstance(result, IntakeResult) and result.learned:
                    baselines.learned(result.learned)
                if isinstance(result, IntakeResult) and not result.duplicate:
                    metrics.decisions.labels(result.rule, result.decision).inc()
                    if result.status is not None and RequestStatus(result.status).is_final:
                        metrics.decided("policy", timedelta(0))
            if any(result.queued_jobs for result in results):
                services.wake_outbox()

        slack = None
        if slack_parts is not None:
            slack = _slack_bot(settings, sessions, runner, slack_parts, changed, metrics)
        batcher = WriteBatcher(runner, on_commit=committed)
        batcher.start()

        def queued(request_ids: Sequence[str]) -> None:
            watch.notify(list(request_ids))
            services.wake_outbox()

        scheduler = Scheduler(
            runner,
            clock=the_clock,
            # Without Slack, expiries still apply and sync back; there is nobody to notify.
            jobs=notices.TIMER_JOBS if slack is not None else TimerJobs(),
            interval=settings.timer_interval,
            digests=_digest_plan(settings, policy) if slack is not None else None,
            on_queued=queued,
            metrics=metrics,
        )
        services = cls(
            settings=settings,
            engine=engine,
            sessions=sessions,
            policy=policy,
            baselines=baselines,
            connectors=connectors,
            batcher=batcher,
            runner=runner,
            watch=watch,
            http=http,
            scheduler=scheduler,
            metrics=metrics,
            worker=worker,
            workers=workers,
            slack=slack,
        )
        if slack is not None and settings.slack_app_token is not None:
            services.socket_mode = AsyncSocketModeHandler(
                slack.app, settings.slack_app_token.get_secret_value()
            )
            await services.socket_mode.connect_async()  # type: ignore[no-untyped-call]
        if worker is not None:
            services._worker_task = asyncio.create_task(worker.run(), name="signoff-outbox-worker")
        if clock is None:
            scheduler.start()
        return services

    async def close(self) -> None:
        """Flush accepted writes, let in-flight side effects finish, then let go of resources."""
        self.stopping.set()
        await self.scheduler.stop()
        if self.socket_mode is not None:
            await self.socket_mode.close_async()  # type: ignore[no-untyped-call]
        if self.slack is not None:
            await self.slack.close(self.settings.shutdown_grace)
        await self.batcher.stop()
        if self.worker is not None:
            await self.worker.stop(self.settings.shutdown_grace)
        if self._worker_task is not None:
            await self._worker_task
        if self.slack is not None:
            # Its HTTP connections, used by the worker's Slack jobs until they stopped.
            await self.slack.close_client()
        # Last: the batcher and the worker write through it.
        self.runner.close()
        await self.http.aclose()
        await self.engine.dispose()


async def _open_database(settings: Settings, http: Outbound) -> AsyncEngine:
    """The engine, with the schema brought up to date; one clear line if the database is away."""
    engine = create_engine(settings.database_url)
    try:
        await ensure_schema(engine)
    except (OperationalError, DBAPIError, OSError) as exc:
        await engine.dispose()
        await http.aclose()
        where = make_url(settings.database_url).render_as_string(hide_password=True)
        reason = redact_text(str(getattr(exc, "orig", exc)).splitlines()[0])
        raise DatabaseUnavailable(f"cannot use the database {where}: {reason}") from None
    return engine


@dataclass(frozen=True)
class SlackParts:
    """What both sides of Slack share: the Web API client and who is who."""

    client: AsyncWebClient
    directory: Directory


def _slack_parts(settings: Settings, metrics: Metrics) -> SlackParts:
    settings.require("slack_signing_secret", purpose="verifying requests from Slack")
    assert settings.slack_bot_token is not None
    client = make_client(
        token=settings.slack_bot_token.get_secret_value(),
        base_url=settings.slack_api_url,
        metrics=metrics,
    )
    directory = Directory(
        client,
        ttl=settings.slack_group_ttl,
        actor_map=load_user_map(settings.slack_user_map) if settings.slack_user_map else None,
    )
    return SlackParts(client, directory)


def outbox_handlers(
    runner: TransactionRunner,
    sessions: async_sessionmaker[AsyncSession],
    connectors: dict[str, Connector],
    slack: SlackParts | None,
    clock: Clock,
) -> dict[str, Handler]:
    """What the outbox worker runs, by job kind: each connector's sync-back and, with Slack,
    everything Signoff says there (cards, replies, DMs, notices, digests)."""
    handlers: dict[str, Handler] = {
        connector.sync_kind: SyncBack(runner, connector)
        for connector in connectors.values()
        if connector.sync_kind is not None
    }
    if slack is not None:
        cards = slack_jobs.SlackJobHandlers(slack.client, slack.directory, runner)
        handlers.update(cards.handlers())
        handlers.update(
            notices.NoticeHandlers(sessions, slack.client, slack.directory, cards, clock).handlers()
        )
    return handlers


def outbox_worker(
    settings: Settings,
    runner: TransactionRunner,
    sessions: async_sessionmaker[AsyncSession],
    handlers: dict[str, Handler],
    metrics: Metrics,
) -> OutboxWorker:
    return OutboxWorker(
        sessions,
        handlers,
        max_attempts=settings.outbox_max_attempts,
        backoff_base=settings.outbox_backoff_base,
        backoff_max=settings.outbox_backoff_max,
        lease=timedelta(seconds=max(60.0, settings.callback_timeout * 3)),
        runner=runner,
        metrics=metrics,
    )


def _slack_bot(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    runner: TransactionRunner,
    slack: SlackParts,
    changed: Callable[[str], None],
    metrics: Metrics,
) -> SlackBot:
    """The Bolt app and what its listeners call: clicks and `/signoff`."""
    assert settings.slack_signing_secret is not None
    clicks = ClickService(
        sessions=sessions,
        runner=runner,
        directory=slack.directory,
        jobs=slack_jobs.JOBS,
        on_change=changed,
        metrics=metrics,
    )
    commands = Commands(
        sessions=sessions,
        directory=slack.directory,
        operators=settings.operator_ids,
        card_kind=slack_jobs.POST_CARD,
        on_change=changed,
    )
    return SlackBot(
        client=slack.client,
        signing_secret=settings.slack_signing_secret.get_secret_value(),
        sessions=sessions,
        clicks=clicks,
        commands=commands,
    )


@dataclass
class WorkerServices:
    """What a worker process runs (`signoff worker`): the outbox worker and its handlers."""

    settings: Settings
    engine: AsyncEngine
    runner: TransactionRunner
    http: Outbound
    metrics: Metrics
    worker: OutboxWorker
    slack: SlackParts | None = None

    @classmethod
    async def start(cls, settings: Settings) -> WorkerServices:
        settings.require("webhook_secret", purpose="signing callbacks")
        http = Outbound()
        connectors = build_connectors(settings, http)
        engine = await _open_database(settings, http)
        metrics = Metrics()
        # Inline: this process answers no requests (storage.db.TransactionRunner). On SQLite
        # its serve checkpoints the file.
        runner = TransactionRunner(engine, inline=True, checkpoint_every=None)
        sessions = sessionmaker(engine)
        slack = _slack_parts(settings, metrics) if settings.slack_bot_token else None
        handlers = outbox_handlers(runner, sessions, connectors, slack, SystemClock())
        worker = outbox_worker(settings, runner, sessions, handlers, metrics)
        return cls(settings, engine, runner, http, metrics, worker, slack)

    async def close(self) -> None:
        """After the worker has stopped: its handlers call out through these."""
        if self.slack is not None:
            await close_client(self.slack.client)
        self.runner.close()
        await self.http.aclose()
        await self.engine.dispose()


def _digest_plan(settings: Settings, policy: Policy) -> DigestPlan | None:
    """Digests go to the configured channels, or to every channel the policy routes to."""
    if settings.digest_cron is None:
        return None
    channels = settings.digest_channel_list or policy.channels
    return DigestPlan(
        channels=channels,
        trigger=cron_trigger(settings.digest_cron, settings.digest_timezone),
        catch_up=timedelta(seconds=settings.digest_catchup),
        kind=notices.DIGEST,
    )
