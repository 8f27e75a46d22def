"""`X-Hub-Signature-256`: GitHub's HMAC-SHA256 of the raw body with the webhook secret.

GitHub signs the exact bytes it sends, so verification runs before anything is parsed. There is
no timestamp in the scheme (GitHub documents none), so replays are caught downstream by the
delivery id (`X-GitHub-Delivery`), which GitHub keeps when it redelivers.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping

from connectors.errors import SignatureError

HEADER = "X-Hub-Signature-256"
_FORMAT = re.compile(r"sha256=[0-9a-f]{64}")


class HubSignature:
    """Verifies deliveries signed with one webhook secret."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def sign(self, body: bytes) -> str:
        return "sha256=" + hmac.new(self._secret, body, hashlib.sha256).hexdigest()

    def verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        """Return if the body is signed with our secret; otherwise raise SignatureError."""
        if not self._secret:
            # An HMAC keyed with nothing proves nothing: anyone can compute it.
            raise SignatureError("the GitHub webhook secret is not configured")
        given = headers.get(HEADER.lower()) or headers.get(HEADER) or ""
        if not given:
            raise SignatureError(f"missing {HEADER}")
        # GitHub sends lowercase hex; anything else is malformed, not merely wrong.
        if not _FORMAT.fullmatch(given):
            raise SignatureError(f"{HEADER} is not sha256=<64 hex digits>")
        if not hmac.compare_digest(self.sign(body).encode(), given.encode()):
            raise SignatureError(f"{HEADER} does not match the body")
