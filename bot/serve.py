"""The long-running processes: `signoff serve` (HTTP, scheduler, and the outbox worker or the
processes that run it) and `signoff worker` (an outbox worker alone). Each runs until SIGTERM or
SIGINT, then shuts down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from aiohttp import web

from bot.processes import ControlChannel, WorkerProcesses
from bot.service import Services, WorkerServices
from bot.settings import Settings, SettingsError

log = logging.getLogger(__name__)


def _freeze_startup_heap() -> None:
    """Move everything start-up made (modules, SQLAlchemy's metadata, pydantic's schemas, the
    policy) out of the cyclic garbage collector's sight: it lives as long as the process, and
    every full collection walked all of it. Measured under load: full collections paused the
    event loop for ~90 ms each; after this, no collection took over 1 ms, and collecting took
    a tenth of the time it did, or less."""
    gc.collect()
    gc.freeze()


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def serve(settings: Settings) -> None:
    from bot.http import build_app  # the HTTP layer sits on top of Services

    workers = WorkerProcesses(settings.worker_processes) if settings.worker_processes else None
    services = await Services.start(settings, workers=workers)
    stop = _stop_on_signals()
    if workers is not None:
        # After Services.start: the schema is current before any worker opens the database.
        await workers.start()
    app = build_app(services)
    _freeze_startup_heap()
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.shutdown_grace)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    bound = runner.addresses[0] if runner.addresses else (settings.host, settings.port)
    log.info("signoff listening on http://%s:%s", bound[0], bound[1])
    print(f"signoff listening on http://{bound[0]}:{bound[1]}", flush=True)
    await stop.wait()
    log.info("shutting down: finishing in-flight requests and jobs")
    services.stopping.set()
    # Stops listening, then waits (up to the grace period) for in-flight requests to finish.
    await runner.cleanup()
    await services.close()
    if workers is not None:
        # Last: jobs the final requests queued are already committed; what a worker does not
        # get to is claimed after the next start.
        await workers.stop(settings.shutdown_grace)
    log.info("stopped")


async def work(
    settings: Settings, *, control_fd: int | None = None, parent_pid: int | None = None
) -> None:
    """An outbox worker. Started by `serve` (`control_fd`: its end of the control socket,
    `bot.processes`), or by an operator for more delivery capacity beside the replicas."""
    if control_fd is None and settings.database_url.startswith("sqlite"):
        # A card's updates are put in order by the one process that sends them on SQLite
        # (bot.slack.jobs); replicas of the worker need PostgreSQL's re-render check.
        raise SettingsError(
            "on SQLite the outbox worker runs under `signoff serve` "
            "(SIGNOFF_WORKER_PROCESSES); a `signoff worker` of its own needs PostgreSQL"
        )
    services = await WorkerServices.start(settings)
    stop = _stop_on_signals()
    channel = None
    if control_fd is not None:
        channel = ControlChannel(control_fd, parent_pid=parent_pid or 0)
        await channel.start(
            on_wake=services.worker.wake,
            on_parent_gone=stop.set,
            exposition=services.metrics.exposition,
        )
    _freeze_startup_heap()
    running = asyncio.create_task(services.worker.run(), name="signoff-outbox-worker")
    log.info("outbox worker %s running", services.worker.name)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    log.info("outbox worker stopping: finishing jobs in flight")
    await services.worker.stop(settings.shutdown_grace)
    with contextlib.suppress(asyncio.CancelledError):
        await running  # re-raises what ended it early, if anything did
    if channel is not None:
        await channel.close()
    await services.close()
    log.info("outbox worker stopped")
