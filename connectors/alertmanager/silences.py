"""Alertmanager API v2 silences: find the one a job already created, or create it.

Alertmanager has no idempotency key, so the job's key goes into the silence's comment and is
looked for before every POST: a retry after Alertmanager accepted (the answer was lost, the
worker crashed) finds the silence instead of creating a second one.

Alertmanager refuses in two shapes: 422 with `{"code": 612, "message": "..."}` when the body
breaks its schema (go-swagger's validation), and 400 with a bare JSON string when the silence
makes no sense (a bad time range). Both are terminal; the message is read out of either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from urllib.parse import urlencode

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from connectors.errors import TerminalSyncError
from connectors.outbound import AnswerError, Outbound, send

# What an approver may pick on the card, shortest first. Alertmanager takes any duration; a
# short fixed list keeps a silence from being forgotten for weeks.
DURATIONS: dict[str, timedelta] = {
    "1h": timedelta(hours=1),
    "4h": timedelta(hours=4),
    "12h": timedelta(hours=12),
    "24h": timedelta(hours=24),
    "3d": timedelta(days=3),
}


class Silence(BaseModel):
    """The part of a `gettableSilence` we read (the current spec requires more fields than 0.25
    returns, so nothing else is required)."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    id: str
    comment: str = ""
    ends_at: str = Field("", alias="endsAt")


_SILENCES = TypeAdapter(list[Silence])


class _Created(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    silence_id: str = Field(alias="silenceID", min_length=1)


def marker(idempotency_key: str) -> str:
    """The text that marks a silence as this job's, at the end of its comment."""
    return f"[signoff:{idempotency_key}]"


def _quote(value: str) -> str:
    # Alertmanager's matcher syntax (labels.ParseMatchers): a double-quoted value with `\\`,
    # `\"` and `\n` escaped.
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _refusal(exc: AnswerError, what: str) -> TerminalSyncError:
    """Alertmanager's message out of either error shape, or the raw snippet."""
    message = exc.snippet
    try:
        data = json.loads(exc.snippet)
    except ValueError:
        data = None  # cut short or not JSON: the snippet as it is
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        message = data["message"]
    elif isinstance(data, str):
        message = data
    return TerminalSyncError(f"Alertmanager refused {what} (HTTP {exc.status}): {message}")


class SilencesAPI:
    def __init__(self, client: Outbound, *, base_url: str, timeout: float) -> None:
        self._client = client
        self._url = base_url.rstrip("/") + "/api/v2/silences"
        self._timeout = timeout

    async def find(self, *, labels: Mapping[str, str], idempotency_key: str) -> Silence | None:
        """A silence on these labels whose comment carries the key, in any state."""
        # One filter per label: only silences with exactly these equality matchers come back.
        query = [("filter", f"{name}={_quote(value)}") for name, value in sorted(labels.items())]
        url = f"{self._url}?{urlencode(query)}"
        try:
            answer = await send(
                self._client, "GET", url, what="Alertmanager silences query", timeout=self._timeout
            )
        except AnswerError as exc:
            raise _refusal(exc, "the silences query") from None
        try:
            found = _SILENCES.validate_json(answer.body)
        except ValidationError:
            raise TerminalSyncError(
                "Alertmanager's silences answer is not a list of silences"
            ) from None
        mark = marker(idempotency_key)
        return next((silence for silence in found if silence.comment.endswith(mark)), None)

    async def create(
        self,
        *,
        labels: Mapping[str, str],
        starts_at: datetime,
        ends_at: datetime,
        created_by: str,
        comment: str,
    ) -> str:
        """POST a silence matching exactly these labels; return its id."""
        body = {
            "matchers": [
                {"name": name, "value": value, "isRegex": False, "isEqual": True}
                for name, value in sorted(labels.items())
            ],
            "startsAt": _rfc3339(starts_at),
            "endsAt": _rfc3339(ends_at),
            "createdBy": created_by,
            "comment": comment,
        }
        try:
            answer = await send(
                self._client,
                "POST",
                self._url,
                what="Alertmanager silence",
                timeout=self._timeout,
                content=json.dumps(body, ensure_ascii=False).encode(),
                headers={"content-type": "application/json"},
            )
        except AnswerError as exc:
            raise _refusal(exc, "the silence") from None
        try:
            return _Created.model_validate_json(answer.body).silence_id
        except ValidationError:
            raise TerminalSyncError(
                "Alertmanager's answer to the silence has no silenceID"
            ) from None


def _rfc3339(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
