"""Cron schedules with standard crontab meaning, on APScheduler 3's CronTrigger.

APScheduler 3 numbers weekdays from Monday = 0, while crontab (and every operator) means
Sunday = 0 (or 7): "0 9 * * 1-5" would run Tuesday to Saturday. Numeric day-of-week fields are
therefore rewritten to day names before they reach APScheduler; names pass through unchanged.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_NUMERIC = re.compile(r"^(\*|\d+)(?:-(\d+))?(?:/(\d+))?$")


def _weekday_names(field: str) -> str:
    parts = []
    for token in field.split(","):
        match = _NUMERIC.match(token)
        if match is None:
            parts.append(token)  # names ("mon-fri"), or nonsense APScheduler will refuse
            continue
        start, end, step = match.groups()
        if start == "*":
            low, high = 0, 6
        else:
            low = int(start)
            high = int(end) if end is not None else (6 if step else low)
        if not 0 <= low <= 7 or not 0 <= high <= 7 or low > high:
            raise ValueError(f"day of week {token!r} is out of range (0-7, Sunday = 0 or 7)")
        days = range(low, high + 1, int(step) if step else 1)
        parts.extend(_NAMES[day % 7] for day in days)
    return ",".join(dict.fromkeys(parts))


def cron_trigger(expression: str, timezone: str) -> CronTrigger:
    """A trigger for a five-field crontab expression in `timezone`; ValueError if either is bad."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(
            f"expected 5 cron fields (minute hour day month weekday), got {len(fields)}"
        )
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r}") from None
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=_weekday_names(weekday),
        timezone=zone,
    )


def last_fire(trigger: CronTrigger, before: datetime, *, within: timedelta) -> datetime | None:
    """The latest fire time at or before `before`, if one is within `within` of it (UTC)."""
    window = min(timedelta(hours=1), within)
    while True:
        found = None
        moment = trigger.get_next_fire_time(None, before - window)
        while moment is not None and moment <= before:
            found = moment
            moment = trigger.get_next_fire_time(moment, moment + timedelta(microseconds=1))
        # Widen the search only while nothing was found: a frequent schedule stays cheap.
        if found is not None or window >= within:
            return found.astimezone(UTC) if found is not None else None
        window = min(window * 24, within)
