"""HTTP routes: intake, the requests API and health. Handlers parse, call one service function,
and map Signoff's errors to status codes in one middleware, so no input can produce a 500."""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bot import logs
from bot.metrics import CONTENT_TYPE
from bot.service import Services
from connectors.base import Connector, Delivery
from connectors.errors import InboundError, PayloadTooLarge, SignatureError
from connectors.redaction import redact_text
from connectors.webhook import intake as webhook
from storage.db import reading
from storage.errors import NotFound
from storage.ledger import IntakeResult, Refusal
from storage.models import RequestStatus
from storage.queries import count_pending
from storage.requests import get_request

log = logging.getLogger(__name__)

SERVICES = web.AppKey("services", Services)
MAX_WAIT_SECONDS = 300.0
# Long polls re-read the database this often, to see decisions made by other replicas.
POLL_SECONDS = 1.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except InboundError as exc:
        return _error(exc.status, str(exc))
    except NotFound as exc:
        return _error(404, str(exc))
    except (OperationalError, DBAPIError, PoolTimeout, OSError) as exc:
        # The database is down or restarting: nothing was half-written (every write is one
        # transaction), so the caller can safely send the same delivery again.
        log.warning("database unavailable: %s", redact_text(str(exc).splitlines()[0]))
        return _error(503, "database unavailable, retry later", retry=True)


async def read_limited(request: web.Request, limit: int) -> bytes:
    """The body, or PayloadTooLarge as soon as it passes `limit` (without reading the rest)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body is {request.content_length} bytes, the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)


async def post_event(request: web.Request) -> web.Response:
    """`POST /v1/events`: one event, answered with its request (DESIGN.md, wire formats)."""
    services = request.app[SERVICES]
    delivery = await _receive(request, services.webhook)
    [event] = delivery.events
    result = await services.batcher.submit(await services.assess(event, services.webhook))
    _accepted(services, webhook.NAME, event.delivery_id, result)
    return web.json_response(result.as_json(), status=202)


def _accepted(services: Services, source: str, delivery_id: str, result: IntakeResult) -> None:
    """Count and log one committed event. From here on its correlation id is its request id,
    which the request and its outbox jobs carry to the worker (bot.logs)."""
    services.metrics.event(source, "duplicate" if result.duplicate else "accepted")
    correlation = result.request_id or logs.current_correlation_id()
    log.info(
        "event %s from %s: %s by rule %s, %s",
        "repeated" if result.duplicate else "accepted",
        source,
        result.decision,
        result.rule,
        f"request {result.request_id} ({result.status})" if result.request_id else "no request",
        extra={
            "correlation_id": correlation,
            "delivery_id": delivery_id,
            "request_id": result.request_id,
            "source": source,
            "decision": result.decision,
            "rule": result.rule,
            "duplicate": result.duplicate,
        },
    )


def hook_handler(connector: Connector) -> Handler:
    """`POST /hooks/<name>`: a source system's own delivery format, through its connector."""

    async def post_hook(request: web.Request) -> web.Response:
        services = request.app[SERVICES]
        delivery = await _receive(request, connector)
        if delivery.reply is not None:
            return web.json_response(dict(delivery.reply))
        if delivery.ignored:
            services.metrics.event(connector.name, "ignored")
            log.info("%s: ignored a delivery: %s", connector.name, delivery.ignored)
            return web.json_response({"ignored": delivery.ignored})
        # Queued in delivery order: a batch applies them in that order.
        intakes = [await services.assess(event, connector) for event in delivery.events]
        accepted = [services.batcher.submit(intake) for intake in intakes]
        cancelled = [
            services.batcher.cancel(services.cancel(item)) for item in delivery.cancellations
        ]
        results = await asyncio.gather(*accepted)
        cancels = await asyncio.gather(*cancelled)
        for event, result in zip(delivery.events, results, strict=True):
            _accepted(services, connector.name, event.delivery_id, result)
        for cancel in cancels:
            if cancel.request_id is not None:
                log.info(
                    "%s withdrew request %s",
                    connector.name,
                    cancel.request_id,
                    extra={"correlation_id": cancel.request_id},
                )
        return web.json_response(
            {
                "requests": [result.as_json() for result in results],
                "cancelled": [c.request_id for c in cancels if c.request_id is not None],
            },
            status=202,
        )

    return post_hook


async def _receive(request: web.Request, connector: Connector) -> Delivery:
    """Read, verify and parse a delivery; a refusal is audited, then answered."""
    services = request.app[SERVICES]
    # Until the event has a request id, its lines carry the delivery's id (bot.logs).
    given = _delivery_header(request)
    logs.bind(f"{connector.name}:{given}" if given else logs.new_correlation_id())
    try:
        body = await read_limited(request, services.settings.max_body_bytes)
        return await connector.receive(body=body, headers=request.headers)
    except InboundError as exc:
        services.metrics.refused(connector.name, exc.reason)
        log.info(
            "%s: refused a delivery from %s (%s): %s",
            connector.name,
            request.remote,
            exc.reason,
            redact_text(str(exc)[:300]),
            extra={"source": connector.name, "reason": exc.reason},
        )
        await _audit_refusal(services, request, exc, source=connector.name)
        raise


def _delivery_header(request: web.Request) -> str:
    """The source's own delivery id, cut short (it is untrusted input)."""
    given = request.headers.get("webhook-id") or request.headers.get("X-GitHub-Delivery") or ""
    return given[:128]


async def _audit_refusal(
    services: Services, request: web.Request, exc: InboundError, *, source: str
) -> None:
    delivery_id = (
        request.headers.get("webhook-id") or request.headers.get("X-GitHub-Delivery") or ""
    )
    refusal = Refusal(
        source=source,
        reason=exc.reason,
        detail=str(exc),
        delivery_id=delivery_id[:256] or None,
        remote=request.remote,
    )
    try:
        await services.batcher.refuse(refusal)
    except (OperationalError, DBAPIError, PoolTimeout, OSError):
        # The refusal stands either way; losing its audit record is logged, loudly.
        log.error("could not audit a refused delivery (%s) from %s", exc.reason, request.remote)


def _refused(request: web.Request, services: Services) -> str | None:
    """Why the requests API refuses this caller, or None. A caller proves itself with the bearer
    token, or by signing the request like a webhook (Standard Webhooks, SIGNOFF_WEBHOOK_SECRET)
    over its path and query as sent: the signature binds the request it was made for, so it
    cannot be replayed to read another one."""
    if "webhook-signature" in request.headers:
        try:
            services.webhook.verifier.verify(request.raw_path.encode(), request.headers)
        except SignatureError as exc:
            return f"signed request refused: {exc}"
        return None
    token = services.settings.api_token
    if token is None:
        return (
            "send a request signed with SIGNOFF_WEBHOOK_SECRET (its payload is the path and "
            "query), or set SIGNOFF_API_TOKEN and send it as a bearer token"
        )
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return "missing or wrong bearer token"
    return None


async def get_request_handler(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    refused = _refused(request, services)
    if refused is not None:
        return _error(401, refused)
    request_id = request.match_info["id"]
    raw_wait = request.query.get("wait", "0")
    try:
        wait = float(raw_wait)
    except ValueError:
        return _error(400, "wait must be a number of seconds")
    if not 0 <= wait <= MAX_WAIT_SECONDS:
        return _error(400, f"wait must be between 0 and {MAX_WAIT_SECONDS:g} seconds")
    deadline = time.monotonic() + wait
    while True:
        async with reading(services.sessions) as session:
            view = await get_request(session, request_id)
        remaining = deadline - time.monotonic()
        final = RequestStatus(view.request.status).is_final
        if final or remaining <= 0 or services.stopping.is_set():
            return web.json_response(view.as_json())
        await services.watch.wait(request_id, min(POLL_SECONDS, remaining))


async def metrics(request: web.Request) -> web.Response:
    """`GET /metrics`: Prometheus text format. The pending gauge is one COUNT in the database at
    scrape time, so every replica reports the same exact figure; if the database does not
    answer, the rest is still served and the gauge keeps its last value."""
    services = request.app[SERVICES]
    try:
        async with reading(services.sessions) as session:
            services.metrics.pending.set(await count_pending(session))
    except (OperationalError, DBAPIError, PoolTimeout, OSError) as exc:
        log.warning(
            "metrics: could not count pending requests: %s",
            redact_text(str(exc).splitlines()[0] if str(exc) else type(exc).__name__),
        )
    return web.Response(body=services.metrics_exposition(), headers={"Content-Type": CONTENT_TYPE})


@functools.cache
def openapi_document() -> str:
    """The OpenAPI document of these routes, as shipped in the package (`bot/openapi.yaml`)."""
    return resources.files("bot").joinpath("openapi.yaml").read_text(encoding="utf-8")


async def openapi(_request: web.Request) -> web.Response:
    return web.Response(text=openapi_document(), content_type="application/yaml")


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.stopping.is_set():
        return _error(503, "shutting down")
    try:
        async with services.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except (OperationalError, DBAPIError, PoolTimeout, OSError):
        return _error(503, "database unreachable")
    return web.json_response({"status": "ready"})


def build_app(services: Services) -> web.Application:
    # client_max_size guards the routes that read the body through aiohttp; the intake reads
    # it itself, chunk by chunk, to stop at its own limit.
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=services.settings.max_body_bytes
    )
    app[SERVICES] = services
    app.router.add_post("/v1/events", post_event)
    app.router.add_get("/v1/requests/{id}", get_request_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.yaml", openapi)
    for name, connector in services.connectors.items():
        if name != webhook.NAME:  # the generic connector has its own route, above
            app.router.add_post(f"/hooks/{name}", hook_handler(connector))
    if services.slack is not None:
        app.router.add_post("/slack/events", services.slack.handle)
    return app
