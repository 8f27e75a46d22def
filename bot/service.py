"""The running service: what `signoff serve` starts, in order, and stops, in reverse."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from aiohttp import web
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.clock import Clock, SystemClock
from bot.connectors import build_connectors
from bot.metrics import Metrics
from bot.schedule import cron_trigger
from bot.scheduler import DigestPlan, Scheduler
from bot.settings import Settings
from bot.slack import jobs as slack_jobs
from bot.slack import notices
from bot.slack.app import SlackBot
from bot.slack.clicks import ClickService
from bot.slack.client import make_client
from bot.slack.commands import Commands
from bot.slack.directory import Directory, load_user_map
from bot.sync import SyncBack
from bot.worker import Handler, OutboxWorker
from connectors.base import Cancellation, Connector
from connectors.events import Event
from connectors.redaction import redact_text
from connectors.transport import outbound_client
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
    worker: OutboxWorker
    http: httpx.AsyncClient
    scheduler: Scheduler
    metrics: Metrics
    slack: SlackBot | None = None
    socket_mode: AsyncSocketModeHandler | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _worker_task: asyncio.Task[None] | None = None

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
    async def start(cls, settings: Settings, *, clock: Clock | None = None) -> Services:
        """Everything up and running. `clock` drives scheduled work (a test's ManualClock);
        with one given, the scheduler does not tick by itself: the test calls `tick()`."""
        settings.require("webhook_secret", purpose="the /v1/events intake")
        settings.require("policy_path", purpose="deciding events")
        assert settings.webhook_secret is not None and settings.policy_path is not None
        # Load the policy before touching the database: a broken policy should stop start-up
        # with its problems listed, not after a migration.
        policy = load_policy(settings.policy_path)
        # The connectors too: a GitHub App key that cannot be read is a settings error.
        http = outbound_client(timeout=settings.callback_timeout)
        connectors = build_connectors(settings, http)
        engine = create_engine(settings.database_url)
        try:
            await ensure_schema(engine)
        except (OperationalError, DBAPIError, OSError) as exc:
            await engine.dispose()
            await http.aclose()
            where = make_url(settings.database_url).render_as_string(hide_password=True)
            reason = redact_text(str(getattr(exc, "orig", exc)).splitlines()[0])
            raise DatabaseUnavailable(f"cannot use the database {where}: {reason}") from None
        sessions = sessionmaker(engine)
        metrics = Metrics()
        baselines = Baselines(sessions)
        watch = StatusWatch()
        runner = TransactionRunner(engine)
        handlers: dict[str, Handler] = {
            connector.sync_kind: SyncBack(runner, connector)
            for connector in connectors.values()
            if connector.sync_kind is not None
        }
        slack = None
        the_clock = clock or SystemClock()
        if settings.slack_bot_token is not None:
            slack = _slack(
                settings, sessions, runner, handlers, lambda rid: changed(rid), the_clock, metrics
            )
        worker = OutboxWorker(
            sessions,
            handlers,
            max_attempts=settings.outbox_max_attempts,
            backoff_base=settings.outbox_backoff_base,
            backoff_max=settings.outbox_backoff_max,
            lease=timedelta(seconds=max(60.0, settings.callback_timeout * 3)),
            runner=runner,
            metrics=metrics,
        )

        def changed(request_id: str) -> None:
            watch.notify([request_id])
            worker.wake()

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
                worker.wake()

        batcher = WriteBatcher(runner, on_commit=committed)
        batcher.start()

        def queued(request_ids: Sequence[str]) -> None:
            watch.notify(list(request_ids))
            worker.wake()

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
            worker=worker,
            http=http,
            scheduler=scheduler,
            metrics=metrics,
            slack=slack,
        )
        if slack is not None and settings.slack_app_token is not None:
            services.socket_mode = AsyncSocketModeHandler(
                slack.app, settings.slack_app_token.get_secret_value()
            )
            await services.socket_mode.connect_async()  # type: ignore[no-untyped-call]
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


def _slack(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    runner: TransactionRunner,
    handlers: dict[str, Handler],
    changed: Callable[[str], None],
    clock: Clock,
    metrics: Metrics,
) -> SlackBot:
    """The Slack side: client, directory, the outbox handlers that talk to Slack, the Bolt app."""
    settings.require("slack_signing_secret", purpose="verifying requests from Slack")
    assert settings.slack_bot_token is not None and settings.slack_signing_secret is not None
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
    cards = slack_jobs.SlackJobHandlers(client, directory, runner)
    handlers.update(cards.handlers())
    handlers.update(notices.NoticeHandlers(sessions, client, directory, cards, clock).handlers())
    clicks = ClickService(
        sessions=sessions,
        runner=runner,
        directory=directory,
        jobs=slack_jobs.JOBS,
        on_change=changed,
        metrics=metrics,
    )
    commands = Commands(
        sessions=sessions,
        directory=directory,
        operators=settings.operator_ids,
        card_kind=slack_jobs.POST_CARD,
        on_change=changed,
    )
    return SlackBot(
        client=client,
        signing_secret=settings.slack_signing_secret.get_secret_value(),
        sessions=sessions,
        clicks=clicks,
        commands=commands,
    )


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


async def serve(settings: Settings, *, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    from bot.http import build_app  # the HTTP layer sits on top of Services

    services = await Services.start(settings)
    app = build_app(services)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.shutdown_grace)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound = runner.addresses[0] if runner.addresses else (settings.host, settings.port)
    log.info("signoff listening on http://%s:%s", bound[0], bound[1])
    print(f"signoff listening on http://{bound[0]}:{bound[1]}", flush=True)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: finishing in-flight requests and jobs")
    services.stopping.set()
    # Stops listening, then waits (up to the grace period) for in-flight requests to finish.
    await runner.cleanup()
    await services.close()
    log.info("stopped")
