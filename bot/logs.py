"""Logging: one JSON object per line, a correlation id on every line, secrets masked.

The standard library's logging with a JSON formatter, not structlog: every module already logs
through `logging.getLogger`, and so do aiohttp, Bolt, SQLAlchemy and APScheduler, whose lines
must come out in the same format; a formatter does that with no new dependency.

The correlation id follows one event: it is the request id from the moment the intake has
committed one (stored with the request and every outbox job, so the worker that delivers the
sync-back, in whichever process, logs with it), and before that, or for a delivery that makes
no request, the delivery's own id (`<source>:<webhook-id>`, or a new one). HTTP handlers, the
worker, click handling and the timer sweep `bind()` it; a line may also name its own with
`extra={"correlation_id": ...}` (a delivery with several events).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import sys
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson

from connectors.redaction import MASK, redact_text

_correlation: ContextVar[str | None] = ContextVar("signoff_correlation_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


def new_correlation_id() -> str:
    return f"c_{secrets.token_hex(8)}"


def current_correlation_id() -> str | None:
    return _correlation.get()


def bind(correlation_id: str | None) -> None:
    """Log with `correlation_id` from here on in this task (and the tasks it starts)."""
    _correlation.set(correlation_id)


@contextlib.contextmanager
def bound(correlation_id: str | None) -> Iterator[None]:
    token = _correlation.set(correlation_id)
    try:
        yield
    finally:
        _correlation.reset(token)


class SecretMask:
    """Masks the configured secrets' exact values, and whatever looks like a credential.

    The last net under every log line: a far side that echoes a token in an error body, or a
    library that prints its headers, still cannot put a configured secret in the logs.
    """

    def __init__(self, values: Iterable[str] = ()) -> None:
        parts: set[str] = set()
        for value in values:
            if not value:
                continue
            parts.add(value)
            # As it appears inside a JSON string (a PEM's newlines become `\\n`).
            parts.add(orjson.dumps(value).decode()[1:-1])
            # A PEM key may be logged line by line: mask each of its base64 lines too.
            parts.update(line.strip() for line in value.splitlines() if len(line.strip()) >= 16)
        # Longest first, so a secret containing another is masked whole.
        self._values = sorted(parts, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return redact_text(text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, correlation_id, extras."""

    def __init__(self, mask: SecretMask | None = None) -> None:
        super().__init__()
        self._mask = mask or SecretMask()

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", None) or _correlation.get(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        text = orjson.dumps(line, default=str).decode()
        # Masked after encoding: the secret may sit in the message, an extra or a traceback.
        return self._mask(text)


class TextFormatter(logging.Formatter):
    """The human format, for a terminal: same fields, same masking."""

    def __init__(self, mask: SecretMask | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(correlation)s] %(message)s")
        self._mask = mask or SecretMask()

    def format(self, record: logging.LogRecord) -> str:
        record.correlation = getattr(record, "correlation_id", None) or _correlation.get() or "-"
        return self._mask(super().format(record))


def configure(
    *,
    level: str,
    fmt: Literal["json", "text"],
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Replace the root logger's handlers with one that writes `fmt` lines to `stream`."""
    mask = SecretMask(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(mask) if fmt == "json" else TextFormatter(mask))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
