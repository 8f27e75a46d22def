"""What falls due for a pending request, and when: SLA reminder, escalation levels, the expiry
warning and the expiry itself (issue: "nothing waits silently").

Due work lives in the database, not in a scheduler's memory: each pending request stores its
progress along the ladder (`escalation_level`, `sla_reminded`, `expiry_warned`) and the earliest
moment anything is next due (`next_due_at`, indexed). A sweep (`sweep`) takes what is due, and
claims each request with an UPDATE guarded by the progress it read: with several replicas only
one UPDATE matches, and only its transaction queues the notices. A restart catches up on
whatever came due meanwhile, because the rows still say it is due.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from policies.model import Route


@dataclass(frozen=True)
class Progress:
    """How far along its ladder a pending request is."""

    escalation_level: int = 0
    sla_reminded: bool = False
    expiry_warned: bool = False


def next_due(
    route: Route, *, created_at: datetime, expires_at: datetime | None, progress: Progress
) -> datetime | None:
    """The earliest moment something is still due for the request, or None."""
    moments: list[datetime] = []
    if route.sla is not None and not progress.sla_reminded:
        moments.append(created_at + route.sla)
    if progress.escalation_level < len(route.escalate):
        moments.append(created_at + route.escalate[progress.escalation_level].after)
    if expires_at is not None:
        warning = route.expiry_warning
        if not progress.expiry_warned and warning is not None:
            moments.append(max(expires_at - warning, created_at))
        moments.append(expires_at)
    return min(moments) if moments else None
