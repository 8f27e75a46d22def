"""Calling a source system back: one request, its failure classified for the outbox.

Every connector's sync-back goes through `send`, so they all agree on what is worth retrying:
timeouts, connection failures, 429 and 5xx raise `RetryableSyncError` (with the far side's
Retry-After, if any); any other non-2xx raises `TerminalSyncError`. Redirects are never
followed: a sync-back endpoint should not move. Error messages carry the start of the answer's
body and the URL with secrets masked, never a token or a query string's secrets.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from connectors.errors import RetryableSyncError, TerminalSyncError
from connectors.redaction import redact_text, redact_url

# A far side asking for more than an hour is treated as asking for an hour: the worker's own
# backoff and attempt budget still apply, and an operator can replay a dead job.
MAX_RETRY_AFTER = 3600.0
# Enough of an error body to say what went wrong; the rest is not read at all.
SNIPPET_BYTES = 300
# Successful answers are read up to this much (a silence id, a token); more is refused.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Answer:
    """A 2xx answer: status, headers and (bounded) body."""

    status: int
    headers: httpx.Headers
    body: bytes


class AnswerError(TerminalSyncError):
    """A non-2xx answer that is not worth retrying; `status` and `snippet` say what it was."""

    def __init__(self, message: str, *, status: int, snippet: str) -> None:
        super().__init__(message)
        self.status = status
        self.snippet = snippet


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    what: str,
    timeout: float,
    content: bytes | None = None,
    headers: Mapping[str, str] | None = None,
) -> Answer:
    """Send one request; return its 2xx answer or raise a SyncBackError subclass.

    `what` names the call in error messages ("callback", "GitHub review"...).
    """
    where = redact_url(url)
    started = datetime.now(UTC)
    try:
        # httpx's timeout bounds each phase (connect, each read...); a far side trickling bytes
        # could stretch the whole exchange past it, so the total is bounded too.
        async with (
            asyncio.timeout(timeout),
            client.stream(
                method,
                url,
                content=content,
                headers=dict(headers or {}),
                timeout=timeout,
                follow_redirects=False,
            ) as response,
        ):
            status = response.status_code
            if 200 <= status < 300:
                return Answer(status, response.headers, await _read_bounded(response, what))
            snippet = await _snippet(response)
            retry_after = _retry_after(response.headers.get("retry-after"), now=started)
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise RetryableSyncError(f"{what} to {where} timed out after {timeout:g}s") from exc
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        raise TerminalSyncError(
            f"{what} URL {where} cannot be used: {_describe(exc, url, where)}"
        ) from exc
    except httpx.TransportError as exc:
        # Connection refused or reset, DNS failure, broken HTTP: the far side may be back later.
        raise RetryableSyncError(
            f"{what} to {where} failed: {type(exc).__name__}: {_describe(exc, url, where)}"
        ) from exc

    message = f"{what} to {where} answered HTTP {status}" + (f": {snippet}" if snippet else "")
    # 429 and 503 may carry Retry-After (RFC 9110 §10.2.3); honour it on any 5xx that does.
    if status == 429 or status >= 500:
        raise RetryableSyncError(message, retry_after=retry_after)
    raise AnswerError(message, status=status, snippet=snippet)


async def _read_bounded(response: httpx.Response, what: str) -> bytes:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise TerminalSyncError(f"{what}: answer is larger than {MAX_ANSWER_BYTES} bytes")
    return body


def _describe(exc: Exception, url: str, where: str) -> str:
    # httpx's own messages may quote the URL, query and all.
    return redact_text(str(exc).replace(url, where)[:400])[:200]


async def _snippet(response: httpx.Response) -> str:
    """The start of the body, one line, secrets masked; the rest is never downloaded."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= SNIPPET_BYTES:
            break
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
