"""Standard Webhooks signatures (https://www.standardwebhooks.com), both directions.

The HMAC and the secret format come from the `standardwebhooks` library. Header parsing and the
timestamp window are ours: the library's `verify` has a fixed five-minute window and raises
plain ValueErrors on a malformed `webhook-signature` header, and every inbound byte here is
untrusted, so a malformed header must be a 401, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

from connectors.errors import SignatureError

MAX_ID_LENGTH = 256


class StandardWebhooks:
    """Signs and verifies with one `whsec_...` secret."""

    def __init__(self, secret: str, *, tolerance_seconds: int = 300) -> None:
        self._webhook = Webhook(secret)
        self._tolerance = tolerance_seconds

    def sign(self, *, msg_id: str, timestamp: int, body: bytes) -> str:
        moment = datetime.fromtimestamp(timestamp, tz=UTC)
        return self._webhook.sign(msg_id, moment, body.decode("utf-8"))

    def headers(self, *, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        """The three headers for an outbound message."""
        moment = int(time.time()) if timestamp is None else timestamp
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(moment),
            "webhook-signature": self.sign(msg_id=msg_id, timestamp=moment, body=body),
        }

    def verify(self, body: bytes, headers: Mapping[str, str], *, now: float | None = None) -> str:
        """Check an inbound message; return its `webhook-id`. Raises SignatureError saying why."""
        msg_id = headers.get("webhook-id", "")
        raw_timestamp = headers.get("webhook-timestamp", "")
        raw_signatures = headers.get("webhook-signature", "")
        if not (msg_id and raw_timestamp and raw_signatures):
            raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
        if len(msg_id) > MAX_ID_LENGTH or not msg_id.isprintable():
            raise SignatureError("webhook-id is too long or not printable")
        if not raw_timestamp.isdigit() or len(raw_timestamp) > 12:
            raise SignatureError("webhook-timestamp is not a Unix time in seconds")
        timestamp = int(raw_timestamp)
        current = time.time() if now is None else now
        if timestamp < current - self._tolerance:
            raise SignatureError("webhook-timestamp is too old (outside the replay window)")
        if timestamp > current + self._tolerance:
            raise SignatureError("webhook-timestamp is in the future (outside the replay window)")
        try:
            expected = base64.b64decode(
                self.sign(msg_id=msg_id, timestamp=timestamp, body=body).split(",", 1)[1]
            )
        except UnicodeDecodeError:
            raise SignatureError(
                "body is not UTF-8, so it cannot carry a valid signature"
            ) from None
        for candidate in raw_signatures.split(" "):
            version, _, value = candidate.partition(",")
            if version != "v1" or not value:
                continue
            try:
                given = base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                continue
            if hmac.compare_digest(expected, given):
                return msg_id
        raise SignatureError("no webhook-signature matches")
