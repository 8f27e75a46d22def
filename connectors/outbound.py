"""Calling a source system back: one request, its failure classified for the outbox.

Every connector's sync-back goes through `send` on one `Outbound` client, so they all agree on
what is worth retrying: timeouts, connection failures, 429 and 5xx raise `RetryableSyncError`
(with the far side's Retry-After, if any); any other non-2xx raises `TerminalSyncError`.
Redirects are never followed: a sync-back endpoint should not move. Error messages carry the
start of the answer's body and the URL with secrets masked, never a token or a query string's
secrets.

The client is aiohttp's, used directly. Through httpx (whose transport was already aiohttp's
here) a callback cost 0.40-0.54 ms of CPU against a local receiver, of which 0.13-0.15 ms was
aiohttp's own: httpx's requests, URLs, headers and responses are pure Python objects built for
every call, and the outbox makes a call per side effect, about as many as events arrive.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType

import aiohttp

from connectors.errors import RetryableSyncError, TerminalSyncError
from connectors.redaction import redact_text, redact_url

# A far side asking for more than an hour is treated as asking for an hour: the worker's own
# backoff and attempt budget still apply, and an operator can replay a dead job.
MAX_RETRY_AFTER = 3600.0
# Enough of an error body to say what went wrong; the rest is not read at all.
SNIPPET_BYTES = 300
# Successful answers are read up to this much (a silence id, a token); more is refused.
MAX_ANSWER_BYTES = 64 * 1024


# Successful answers and error snippets are read in chunks of at most this size.
_CHUNK = 64 * 1024


class Outbound:
    """The HTTP client every connector calls out with: one aiohttp session, opened on first
    use (in the running loop), at most `max_connections` at a time. It keeps no cookies (a
    receiver's cookies must not ride along to the next call) and follows no redirects."""

    def __init__(self, *, user_agent: str = "Signoff/0.1", max_connections: int = 100) -> None:
        self._user_agent = user_agent
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                cookie_jar=aiohttp.DummyCookieJar(),
                headers={"User-Agent": self._user_agent},
                # `send` bounds the whole exchange itself; aiohttp's default is 5 minutes.
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def __aenter__(self) -> Outbound:
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


@dataclass(frozen=True)
class Answer:
    """A 2xx answer: status, headers (case-insensitive) and (bounded) body."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class AnswerError(TerminalSyncError):
    """A non-2xx answer that is not worth retrying; `status` and `snippet` say what it was."""

    def __init__(self, message: str, *, status: int, snippet: str) -> None:
        super().__init__(message)
        self.status = status
        self.snippet = snippet


async def send(
    client: Outbound,
    method: str,
    url: str,
    *,
    what: str,
    timeout: float,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """Send one request; return its 2xx answer or raise a SyncBackError subclass.

    `what` names the call in error messages ("callback", "GitHub review"...). `timeout` bounds
    the whole exchange, connecting to reading the answer, so a far side trickling bytes cannot
    stretch it.
    """
    where = redact_url(url)
    started = datetime.now(UTC)
    try:
        async with (
            asyncio.timeout(timeout),
            client.session().request(
                method, url, data=content, headers=headers, allow_redirects=False
            ) as response,
        ):
            status = response.status
            if 200 <= status < 300:
                return Answer(status, response.headers, await _read_bounded(response, what))
            snippet = await _snippet(response)
            retry_after = _retry_after(response.headers.get("retry-after"), now=started)
    except TimeoutError as exc:
        raise RetryableSyncError(f"{what} to {where} timed out after {timeout:g}s") from exc
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise TerminalSyncError(
            f"{what} URL {where} cannot be used: {_describe(exc, url, where)}"
        ) from exc
    except (aiohttp.ClientError, OSError) as exc:
        # Connection refused or reset, DNS failure, broken HTTP: the far side may be back later.
        raise RetryableSyncError(
            f"{what} to {where} failed: {type(exc).__name__}: {_describe(exc, url, where)}"
        ) from exc

    message = f"{what} to {where} answered HTTP {status}" + (f": {snippet}" if snippet else "")
    # 429 and 503 may carry Retry-After (RFC 9110 §10.2.3); honour it on any 5xx that does.
    if status == 429 or status >= 500:
        raise RetryableSyncError(message, retry_after=retry_after)
    raise AnswerError(message, status=status, snippet=snippet)


async def _read_bounded(response: aiohttp.ClientResponse, what: str) -> bytes:
    body = b""
    while chunk := await response.content.read(_CHUNK):
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise TerminalSyncError(f"{what}: answer is larger than {MAX_ANSWER_BYTES} bytes")
    return body


def _describe(exc: Exception, url: str, where: str) -> str:
    # aiohttp's own messages may quote the URL, query and all.
    return redact_text(str(exc).replace(url, where)[:400])[:200]


async def _snippet(response: aiohttp.ClientResponse) -> str:
    """The start of the body, one line, secrets masked; the rest is never downloaded (the
    connection is dropped rather than read to the end)."""
    head = b""
    while len(head) < SNIPPET_BYTES and (chunk := await response.content.read(SNIPPET_BYTES)):
        head += chunk
    text = head[:SNIPPET_BYTES].decode("utf-8", errors="replace")
    text = re.sub(r"\s+", " ", text).strip()
    if len(head) >= SNIPPET_BYTES:
        text += "…"
    return redact_text(text)


def _retry_after(value: str | None, *, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP-date), capped."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None  # unparseable: fall back to the worker's backoff
        if when.tzinfo is None:
            # RFC 9110 HTTP-dates are always GMT; email.utils leaves "-0000" zones naive.
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)
