"""Generic intake: a Standard Webhooks-signed `POST /v1/events` body becomes an Event."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from connectors.errors import MalformedPayload
from connectors.events import Event, EventBody
from connectors.webhook.signature import StandardWebhooks

NAME = "webhook"
# JSON nesting accepted in any inbound body. Python's parser stops near 1,000 levels, but what
# comes after it does not go that far: pydantic refuses to serialise past a few hundred ("Maximum
# serialization depth exceeded" turned a 300-level `attributes` into a 500 at commit time).
# Real payloads are shallow: GitHub's deepest is under 10 levels.
MAX_DEPTH = 64
# The outbox job kind that sends a decision to the event's callback_url.
SYNC_KIND = "webhook.callback"


def describe_validation_error(exc: ValidationError, *, limit: int = 3) -> str:
    """`actor.id: Field required; risk: Input should be 'low', ...` (the fields, not the values)."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(part) for part in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def json_object(body: bytes) -> dict[str, Any]:
    """A JSON object body, or MalformedPayload saying why not; never a parser error as a 500."""
    try:
        data = _loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedPayload(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedPayload("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise MalformedPayload("body must be a JSON object")
    # A body cannot nest deeper than it has brackets: most never need the walk.
    if body.count(b"{") + body.count(b"[") > MAX_DEPTH and _deeper_than(data, MAX_DEPTH):
        raise MalformedPayload(f"body is nested deeper than {MAX_DEPTH} levels")
    return data


# orjson reads an integer beyond 64 bits as a float, silently: with one in the body (a run of
# 19 digits or more, in a number or not), the standard library reads it.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


def _loads(body: bytes) -> Any:
    """orjson where it reads a body as the standard library does: several times faster, on
    every delivery. What it refuses (NaN, infinities, lone surrogates, UTF-16, a BOM) it says
    differently, so that is read, or refused, by the standard library, as before."""
    if _LONG_DIGITS.search(body):
        return json.loads(body)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _deeper_than(value: object, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            stack.extend(
                (child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
            )
    return False


def refuse_nul(data: dict[str, Any], body: bytes | None = None) -> dict[str, Any]:
    """PostgreSQL cannot store U+0000 in text or JSONB: refuse it here, not at commit time.
    (A connector whose source may send it in free text can drop it instead, as GitHub's does.)
    `body`, the JSON it was read from, spares the walk when it cannot hold one: a JSON string
    holds U+0000 only as the escape `\\u0000` (a raw control character is invalid JSON)."""
    if (body is None or b"\\u0000" in body) and _contains_nul(data):
        raise MalformedPayload("strings must not contain U+0000")
    return data


def parse_body(body: bytes) -> EventBody:
    """Raise MalformedPayload naming the field."""
    data = refuse_nul(json_object(body), body)
    try:
        return EventBody.model_validate(data)
    except ValidationError as exc:
        raise MalformedPayload(describe_validation_error(exc)) from None


def _contains_nul(value: object) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def receive(body: bytes, headers: Mapping[str, str], *, verifier: StandardWebhooks) -> Event:
    """Verify, then parse. The delivery id is the `webhook-id`, namespaced to this connector."""
    webhook_id = verifier.verify(body, headers)
    parsed = parse_body(body)
    sync = {"callback_url": str(parsed.callback_url)} if parsed.callback_url else {}
    # Every field was validated just above; constructing skips validating them all again.
    return Event.model_construct(
        **dict(parsed),
        delivery_id=f"{NAME}:{webhook_id}",
        received_at=datetime.now(UTC),
        sync=sync,
    )
