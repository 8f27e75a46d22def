"""The outbound client (httpx on aiohttp) against a real local server: what httpx promises the
connectors (decoded bodies, headers, streaming, no redirects) and how failures map to httpx's
exceptions, which `connectors.outbound.send` classifies."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from connectors.transport import outbound_client


async def _gzipped(request: web.Request) -> web.Response:
    body = gzip.compress(b'{"silenceID": "s-1"}')
    return web.Response(
        body=body, headers={"Content-Encoding": "gzip"}, content_type="application/json"
    )


async def _echo(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "body": (await request.read()).decode(),
            "headers": dict(request.headers),
            "method": request.method,
        }
    )


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


@pytest.fixture
async def server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_get("/gzip", _gzipped)
    app.router.add_post("/echo", _echo)
    app.router.add_get("/redirect", _redirect)
    app.router.add_get("/cut", _cut_off)
    app.router.add_get("/slow", _slow)
    async with TestServer(app, host="127.0.0.1") as test_server:
        yield test_server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with outbound_client(timeout=0.5, user_agent="Signoff-Test/1") as http:
        yield http


async def test_requests_and_answers_keep_httpx_semantics(server, client) -> None:
    answer = await client.get(str(server.make_url("/gzip")))
    assert (answer.status_code, answer.json()) == (200, {"silenceID": "s-1"})

    sent = await client.post(
        str(server.make_url("/echo")), content=b'{"a": 1}', headers={"webhook-id": "msg_1"}
    )
    echoed = sent.json()
    assert echoed["method"] == "POST"
    assert echoed["body"] == '{"a": 1}'
    assert echoed["headers"]["webhook-id"] == "msg_1"
    assert echoed["headers"]["User-Agent"] == "Signoff-Test/1"
    assert echoed["headers"]["Content-Length"] == "8"

    moved = await client.get(str(server.make_url("/redirect")))
    assert moved.status_code == 302  # never followed
    assert moved.headers["location"] == "/elsewhere"


async def test_failures_become_httpx_exceptions(server, client) -> None:
    with pytest.raises(httpx.ReadError):
        await client.get(str(server.make_url("/cut")))
    with pytest.raises(httpx.TimeoutException):
        await client.get(str(server.make_url("/slow")))
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{port}/")
    with pytest.raises(httpx.UnsupportedProtocol):
        await client.get("ftp://example.com/x")
