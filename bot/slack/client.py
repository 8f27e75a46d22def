"""The Slack Web API client Signoff uses everywhere, and how its errors map onto the outbox's."""

from __future__ import annotations

from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.metrics import Metrics
from connectors.errors import RetryableSyncError, SyncBackError, TerminalSyncError

# Seconds one Web API request may take.
TIMEOUT = 10
# Slack errors that will not go away by themselves; each gets a hint for the operator.
TERMINAL_HINTS = {
    "channel_not_found": "the route's channel id is wrong or the channel is private",
    "not_in_channel": "invite the Signoff app to the channel",
    "is_archived": "the channel is archived",
    "invalid_blocks": "Slack refused the card's blocks",
    "msg_too_long": "the message is too long",
    "invalid_auth": "SLACK_BOT_TOKEN is wrong",
    "not_authed": "SLACK_BOT_TOKEN is missing",
    "token_revoked": "SLACK_BOT_TOKEN was revoked",
    "account_inactive": "the bot's account is inactive",
    "missing_scope": "the app lacks a scope: reinstall it from manifest.yml",
    "message_not_found": "the card's message was deleted",
    "cant_update_message": "the card cannot be updated",
    "user_not_found": "no such Slack user",
    "users_not_found": "no Slack user with that email",
    "no_text": "the message had no text",
}
# Slack's own transient failures: worth another attempt.
TRANSIENT = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)


class MeteredClient(AsyncWebClient):
    """Counts every failed call by method and error code. Every Web API method of the SDK goes
    through `api_call`, so cards, clicks, directory lookups and notices are all counted."""

    def __init__(self, *, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._metrics = metrics

    async def api_call(self, api_method: str, **kwargs: Any) -> Any:
        try:
            return await super().api_call(api_method, **kwargs)
        except SlackApiError as exc:
            status = exc.response.status_code
            code = exc.response.get("error") if isinstance(exc.response.data, dict) else None
            self._metrics.slack_error(api_method, str(code) if code else f"http_{status}")
            raise
        except (aiohttp.ClientError, TimeoutError, OSError):
            self._metrics.slack_error(api_method, "connection")
            raise


def make_client(*, token: str, base_url: str, metrics: Metrics | None = None) -> AsyncWebClient:
    """A client that retries one rate-limited call itself, honouring Retry-After; anything
    longer is left to the outbox, which waits without holding a worker.

    It keeps one aiohttp session, so calls reuse kept-alive connections: without one, slack_sdk
    opens a session, and a new TCP (and TLS) connection, for every call. Call it on the running
    event loop, and `close_client` when done."""
    if not base_url.endswith("/"):
        base_url += "/"
    return MeteredClient(
        metrics=metrics or Metrics(),
        token=token,
        base_url=base_url,
        timeout=TIMEOUT,
        # slack_sdk passes its `timeout` only to sessions it makes itself.
        session=aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)),
        retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)],
    )


async def close_client(client: AsyncWebClient) -> None:
    if client.session is not None:
        await client.session.close()


SlackFailure = (SlackApiError, aiohttp.ClientError, TimeoutError, OSError)


def classify(method: str, exc: BaseException) -> SyncBackError:
    """Translate a Slack client failure into a retryable or terminal outbox error."""
    if isinstance(exc, SlackApiError):
        status = exc.response.status_code
        error = str(exc.response.get("error", "unknown_error"))
        if status == 429 or error in TRANSIENT or status >= 500:
            retry_after = exc.response.headers.get("Retry-After") or exc.response.headers.get(
                "retry-after"
            )
            seconds = float(retry_after) if retry_after and retry_after.isdigit() else None
            return RetryableSyncError(
                f"Slack {method}: {error} (HTTP {status})", retry_after=seconds
            )
        hint = TERMINAL_HINTS.get(error)
        detail = f": {hint}" if hint else ""
        extra = exc.response.get("errors")
        if error == "invalid_blocks" and extra:
            detail += f" {extra}"
        return TerminalSyncError(f"Slack refused {method}: {error}{detail}")
    # Connection trouble and timeouts: Slack may well answer next time.
    return RetryableSyncError(f"Slack {method}: {type(exc).__name__}: {exc}")
