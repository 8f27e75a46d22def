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

from bot.service import Services
from connectors.base import Connector, Delivery
from connectors.errors import InboundError, PayloadTooLarge
from connectors.redaction import redact_text
from connectors.webhook import intake as webhook
from storage.errors import NotFound
from storage.ledger import Refusal
from storage.models import RequestStatus
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
    return web.json_response(result.as_json(), status=202)


def hook_handler(connector: Connector) -> Handler:
    """`POST /hooks/<name>`: a source system's own delivery format, through its connector."""

    async def post_hook(request: web.Request) -> web.Response:
        services = request.app[SERVICES]
        delivery = await _receive(request, connector)
        if delivery.reply is not None:
            return web.json_response(dict(delivery.reply))
        if delivery.ignored:
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
    try:
        body = await read_limited(request, services.settings.max_body_bytes)
        return await connector.receive(body=body, headers=request.headers)
    except InboundError as exc:
        await _audit_refusal(services, request, exc, source=connector.name)
        raise


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


def _authorized(request: web.Request, services: Services) -> bool:
    token = services.settings.api_token
    if token is None:
        return False
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {token.get_secret_value()}"
    return hmac.compare_digest(given.encode(), expected.encode())


async def get_request_handler(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.settings.api_token is None:
        return _error(401, "the requests API is off: set SIGNOFF_API_TOKEN to enable it")
    if not _authorized(request, services):
        return _error(401, "missing or wrong bearer token")
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
        async with services.sessions() as session:
            view = await get_request(session, request_id)
        remaining = deadline - time.monotonic()
        final = RequestStatus(view.request.status).is_final
        if final or remaining <= 0 or services.stopping.is_set():
            return web.json_response(view.as_json())
        await services.watch.wait(request_id, min(POLL_SECONDS, remaining))


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
    app.router.add_get("/openapi.yaml", openapi)
    for name, connector in services.connectors.items():
        if name != webhook.NAME:  # the generic connector has its own route, above
            app.router.add_post(f"/hooks/{name}", hook_handler(connector))
    if services.slack is not None:
        app.router.add_post("/slack/events", services.slack.handle)
    return app
