"""The SQLite database thread: one thread, one connection, units of work run one at a time,
those that answer a request first.

Units that answer a request (an event's intake, a click's vote) run before background units
(outbox claims and outcomes, the Slack jobs' reads, timer sweeps), so a click does not queue
behind a burst of side effects; at least one background unit runs after every
`FOREGROUND_RUN` foreground ones, so side effects still progress under a steady load.

One thread does all the writing on purpose: two SQLite connections of one process would share
the write lock, and the one that waits sleeps in SQLite's busy handler (1 to 100 ms a try),
while the one that holds it may be waiting for the GIL between its statements.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# Foreground units run in a row before one waiting background unit gets its turn.
FOREGROUND_RUN = 4
# A foreground unit finished this recently (seconds) still counts as busy: under a burst the
# next request's unit follows within a millisecond or two, after the event loop's share.
RECENT = 0.003

_Item = tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]


class WriterThread:
    def __init__(self, name: str) -> None:
        self._foreground: collections.deque[_Item] = collections.deque()
        self._background: collections.deque[_Item] = collections.deque()
        self._ready = threading.Condition()
        self._closed = False
        self._running_foreground = False
        self._foreground_done = 0.0
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], T], *, background: bool) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the database thread is closed")
            (self._background if background else self._foreground).append((call, future))
            self._ready.notify()
        return future

    @property
    def foreground_busy(self) -> bool:
        """Whether a unit that answers a request is queued, running or just finished."""
        return (
            bool(self._foreground)
            or self._running_foreground
            or time.monotonic() - self._foreground_done < RECENT
        )

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _next(self, foreground_run: int) -> tuple[_Item | None, int]:
        with self._ready:
            if self._running_foreground:  # the unit before this one has finished
                self._running_foreground = False
                self._foreground_done = time.monotonic()
            while not (self._foreground or self._background or self._closed):
                self._ready.wait()
            if self._background and (not self._foreground or foreground_run >= FOREGROUND_RUN):
                return self._background.popleft(), 0
            if self._foreground:
                self._running_foreground = True
                return self._foreground.popleft(), foreground_run + 1
            return None, 0  # closed and drained

    def _serve(self) -> None:
        foreground_run = 0
        while True:
            item, foreground_run = self._next(foreground_run)
            if item is None:
                return
            call, future = item
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                result = call()
            except BaseException as exc:  # handed to the caller, as an executor would
                future.set_exception(exc)
            else:
                future.set_result(result)
