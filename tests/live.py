"""An event loop in a thread of its own, for property tests (hypothesis runs them synchronously)
that talk to the running app: the app's context managers are entered in that loop, and each
example's requests are coroutines submitted to it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._exits: list[AbstractAsyncContextManager[Any]] = []

    def __enter__(self) -> LoopThread:
        self._thread.start()
        return self

    def run(self, work: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def enter(self, manager: AbstractAsyncContextManager[T]) -> T:
        """Enter `manager` in the loop; it is exited, last in first out, when this closes."""
        value = self.run(manager.__aenter__())
        self._exits.append(manager)
        return value

    def __exit__(self, *_: object) -> None:
        try:
            while self._exits:
                self.run(self._exits.pop().__aexit__(None, None, None))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()
