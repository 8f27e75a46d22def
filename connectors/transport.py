"""httpx's interface on aiohttp's HTTP/1.1 client: what every outbound call goes through.

httpx's own transport (httpcore, anyio and h11, in pure Python) cost 1.3 to 2.0 ms of CPU per
request here against a local receiver; on this transport the same request costs 0.4 ms (aiohttp's
client alone: 0.14 ms). For the outbox, which makes one call per side effect, that was most of
the cost of an event. The connectors keep httpx's API (requests, responses, exceptions,
streaming); only the bytes on the wire go through aiohttp.

aiohttp's errors are mapped to httpx's by what they mean to `connectors.outbound.send`:
timeouts to `httpx.TimeoutException`, refused or reset connections to `httpx.ConnectError` and
`httpx.ReadError`, a URL aiohttp cannot use to `httpx.UnsupportedProtocol`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx

# Answers are read in chunks of this size; `connectors.outbound` stops reading early anyway.
_CHUNK = 64 * 1024


@contextlib.contextmanager
def _as_httpx_errors(timeout_class: type[httpx.TimeoutException]) -> Iterator[None]:
    try:
        yield
    except httpx.HTTPError:
        raise
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise timeout_class(str(exc) or "timed out") from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise httpx.UnsupportedProtocol(str(exc)) from exc
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__) from exc
    except aiohttp.ClientResponseError as exc:
        # An answer aiohttp could not parse as HTTP.
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise httpx.NetworkError(str(exc) or type(exc).__name__) from exc


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors(httpx.ReadTimeout):
            async for chunk in self._response.content.iter_chunked(_CHUNK):
                yield chunk

    async def aclose(self) -> None:
        # Closing a response that was not read to the end drops its connection rather than
        # reading the rest: `connectors.outbound` reads only the start of an error's body.
        self._response.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with one aiohttp session (created on first use, in the running
    loop), at most `max_connections` at a time. Redirects are never followed here: whether to
    follow is httpx's decision, and Signoff never does."""

    def __init__(self, *, max_connections: int = 100) -> None:
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                # httpx decodes the body (Content-Encoding) itself, and sends its own headers.
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.get("pool"),
            sock_connect=timeouts.get("connect"),
            sock_read=timeouts.get("read"),
        )
        body = await request.aread()
        with _as_httpx_errors(httpx.ConnectTimeout):
            response = await self._client().request(
                request.method,
                str(request.url),
                headers=[
                    (name, value)
                    for name, value in request.headers.multi_items()
                    # aiohttp frames the body itself.
                    if name not in ("content-length", "transfer-encoding")
                ],
                data=body or None,
                allow_redirects=False,
                timeout=timeout,
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
            # Let the connector's transports close before the loop goes away.
            await asyncio.sleep(0)


def outbound_client(*, timeout: float, user_agent: str = "Signoff/0.1") -> httpx.AsyncClient:
    """The client every connector calls out with: httpx on this transport, no redirects."""
    return httpx.AsyncClient(
        transport=AiohttpTransport(),
        timeout=timeout,
        follow_redirects=False,
        headers={"user-agent": user_agent},
    )
