"""`connectors.outbound`: the client every sync-back goes through, against a real local server.
What a connector gets back (decoded bodies, case-insensitive headers, bounded reads), what it
sends (its headers, our user agent, no cookies, no redirects), and how each failure is
classified for the outbox."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.errors import RetryableSyncError, TerminalSyncError
from connectors.outbound import MAX_ANSWER_BYTES, AnswerError, Outbound, send


async def _gzipped(_request: web.Request) -> web.Response:
    body = gzip.compress(b'{"silenceID": "s-1"}')
    return web.Response(
        body=body, headers={"Content-Encoding": "gzip"}, content_type="application/json"
    )


async def _echo(request: web.Request) -> web.Response:
    response = web.json_response(
        {
            "body": (await request.read()).decode(),
            "headers": dict(request.headers),
            "method": request.method,
        }
    )
    response.set_cookie("session", "from-the-receiver")
    return response


async def _redirect(_request: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


async def _cut_off(request: web.Request) -> web.StreamResponse:
    # Promises 1,000 bytes, sends 10, hangs up.
    response = web.StreamResponse(headers={"Content-Length": "1000"})
    await response.prepare(request)
    await response.write(b"0123456789")
    assert request.transport is not None
    request.transport.close()
    return response


async def _slow(_request: web.Request) -> web.Response:
    await asyncio.sleep(2)
    return web.Response(text="late")


async def _huge(_request: web.Request) -> web.Response:
    return web.Response(body=b"x" * (MAX_ANSWER_BYTES + 1))


async def _busy(_request: web.Request) -> web.Response:
    return web.Response(status=503, text="busy, token xoxb-1234567890-abcdef " + "y" * 500)


async def _limited(_request: web.Request) -> web.Response:
    return web.Response(status=429, headers={"Retry-After": "7"}, text="slow down")


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_get("/gzip", _gzipped)
    app.router.add_post("/echo", _echo)
    app.router.add_get("/redirect", _redirect)
    app.router.add_get("/cut", _cut_off)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/huge", _huge)
    app.router.add_get("/busy", _busy)
    app.router.add_get("/limited", _limited)
    async with TestServer(app, host="127.0.0.1") as test_server:
        yield test_server


@pytest.fixture
async def client() -> AsyncIterator[Outbound]:
    async with Outbound(user_agent="Signoff-Test/1") as outbound:
        yield outbound


async def get(client: Outbound, url: str, timeout: float = 0.5):
    return await send(client, "GET", url, what="test call", timeout=timeout)


async def test_answers_requests_and_what_is_never_done(server, client) -> None:
    answer = await get(client, str(server.make_url("/gzip")))
    assert (answer.status, answer.body) == (200, b'{"silenceID": "s-1"}')  # decoded
    assert answer.headers["content-type"] == answer.headers["Content-Type"]

    for _ in range(2):
        sent = await send(
            client,
            "POST",
            str(server.make_url("/echo")),
            what="test call",
            timeout=0.5,
            content=b'{"a": 1}',
            headers={"webhook-id": "msg_1"},
        )
        echoed = json.loads(sent.body)
        assert echoed["method"] == "POST"
        assert echoed["body"] == '{"a": 1}'
        assert echoed["headers"]["webhook-id"] == "msg_1"
        assert echoed["headers"]["User-Agent"] == "Signoff-Test/1"
        assert echoed["headers"]["Content-Length"] == "8"
        # The first answer set a cookie: nothing is sent back.
        assert "Cookie" not in echoed["headers"]

    # Never followed: a sync-back endpoint should not move.
    with pytest.raises(AnswerError) as moved:
        await get(client, str(server.make_url("/redirect")))
    assert moved.value.status == 302


async def test_failures_are_classified_for_the_outbox(server, client) -> None:
    with pytest.raises(RetryableSyncError, match="failed: ClientPayloadError"):
        await get(client, str(server.make_url("/cut")))
    with pytest.raises(RetryableSyncError, match=r"timed out after 0.5s"):
        await get(client, str(server.make_url("/slow")))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(RetryableSyncError, match="failed: ClientConnectorError"):
        await get(client, f"http://127.0.0.1:{port}/")
    with pytest.raises(TerminalSyncError, match="cannot be used"):
        await get(client, "ftp://example.com/x")
    with pytest.raises(TerminalSyncError, match="larger than"):
        await get(client, str(server.make_url("/huge")))

    with pytest.raises(RetryableSyncError) as busy:
        await get(client, str(server.make_url("/busy")))
    message = str(busy.value)
    assert "answered HTTP 503: busy" in message and message.endswith("…")
    assert "xoxb-1234567890" not in message  # masked
    with pytest.raises(RetryableSyncError) as limited:
        await get(client, str(server.make_url("/limited")))
    assert limited.value.retry_after == 7.0
