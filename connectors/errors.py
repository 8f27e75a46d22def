"""Signoff's exception tree. Every error Signoff raises on purpose derives from ``SignoffError``.

    SignoffError
    ├── InboundError                 bad input at the edge; never a 500
    │   ├── SignatureError           401: missing, malformed, wrong or stale signature
    │   ├── PayloadTooLarge          413: body over the configured limit
    │   ├── MalformedPayload         400: the body makes no sense; the message names the field
    │   └── UnsupportedEvent         200 and ignored: a well-formed event we do not handle
    ├── SyncBackError                a side effect on a remote system failed (connectors)
    │   ├── RetryableSyncError       timeout, 429, 5xx: try again later
    │   └── TerminalSyncError        any other refusal: dead-letter, an operator decides
    ├── PolicyError                  a policy file is invalid (policies.errors)
    └── StorageError                 storage refused an operation (storage.errors)
        ├── NotFound
        └── InvalidTransition        a state change that is not allowed (already decided...)

The tree's root lives here because ``connectors`` is the lowest layer: ``policies`` and
``storage`` may import it, and nothing here imports them.
"""

from __future__ import annotations


class SignoffError(Exception):
    """Signoff refused or failed an operation."""


class InboundError(SignoffError):
    """An inbound request was refused."""

    status = 400
    reason = "bad_request"


class SignatureError(InboundError):
    """The request's signature is missing, malformed, wrong or outside the replay window."""

    status = 401
    reason = "bad_signature"


class PayloadTooLarge(InboundError):
    """The request body is larger than the configured limit."""

    status = 413
    reason = "too_large"


class MalformedPayload(InboundError):
    """The request body is not what the endpoint accepts."""

    status = 400
    reason = "malformed"


class UnsupportedEvent(InboundError):
    """A well-formed event of a type Signoff does not handle; acknowledged and ignored."""

    status = 200
    reason = "unsupported"


class SyncBackError(SignoffError):
    """Applying a decision to the source system failed."""


class RetryableSyncError(SyncBackError):
    """The far side may accept the same delivery later (timeout, 429, 5xx)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TerminalSyncError(SyncBackError):
    """The far side refused the delivery for good; retrying would not help."""
