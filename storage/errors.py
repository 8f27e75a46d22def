"""Storage errors; the tree is drawn in ``connectors.errors``."""

from __future__ import annotations

from connectors.errors import SignoffError


class StorageError(SignoffError):
    """Storage refused an operation."""


class NotFound(StorageError):
    """No such record."""


class InvalidTransition(StorageError):
    """The record is not in a state that allows this change (already decided, not dead...)."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached or refused the connection."""
