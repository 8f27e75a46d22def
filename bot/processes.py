"""Outbox worker processes: `serve` runs its side effects in processes of their own.

One Python process answers requests with one interpreter; an outbox worker in the same process
takes that interpreter for every callback and card it sends, so under load clicks and intake
waited for side effects (measured: they cost about as much CPU as the requests that caused
them). With `SIGNOFF_WORKER_PROCESSES=N` (default 1), `serve` starts N `signoff worker`
processes and keeps them running:

- each gets one end of a socket pair (`--control-fd`). Down it, the HTTP process sends a byte
  whenever it commits outbox jobs (`wake`), so a job starts at once instead of at the worker's
  next poll. Up it, the worker sends its Prometheus exposition whenever it changed (at most
  every `METRICS_EVERY` seconds), which `/metrics` merges into the HTTP process's own.
- a worker that exits unexpectedly is started again, after a pause that doubles up to
  `RESTART_MAX` seconds while it keeps failing; jobs it held are retried when their leases
  expire, as after any crash.
- a worker whose HTTP process is gone (killed, crashed) stops by itself: the kernel sends it
  SIGTERM (Linux's parent-death signal), and the socket's end-of-file says the same anywhere.
- `stop` sends SIGTERM: a worker stops claiming, gives jobs in flight the shutdown grace, and
  exits (`OutboxWorker.stop`).

Any number of workers (in these processes, in replicas) may run against one database: claims
are leases (`storage.outbox`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Messages down the control socket, one byte each.
WAKE = b"w"
# A worker sends its metrics when they changed, at most this often (seconds).
METRICS_EVERY = 1.0
# Restart pauses of a worker that keeps exiting: from RESTART_MIN, doubling, up to RESTART_MAX.
RESTART_MIN = 0.5
RESTART_MAX = 30.0
# A worker that ran this long before exiting had not been failing: its next pause starts over.
STEADY_AFTER = 60.0
_LENGTH = struct.Struct("!I")
# Larger expositions are a bug (label values are bounded, bot.metrics); refused, not buffered.
MAX_EXPOSITION = 16 * 1024 * 1024


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    control: socket.socket | None = None
    writer: asyncio.StreamWriter | None = None
    exposition: bytes = b""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class WorkerProcesses:
    """The HTTP process's side: starts, wakes, watches and stops the worker processes."""

    def __init__(self, count: int, *, command: list[str] | None = None) -> None:
        self._count = count
        # `python -m bot.cli worker`, as installed; the control options are added per worker.
        self._command = command or [sys.executable, "-m", "bot.cli", "worker"]
        self._workers = [_Worker(index) for index in range(count)]
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    @property
    def running(self) -> int:
        return sum(1 for w in self._workers if w.process and w.process.returncode is None)

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process is not None]

    async def start(self) -> None:
        for worker in self._workers:
            await self._spawn(worker)
            self._watchers.append(
                asyncio.create_task(self._watch(worker), name=f"signoff-worker-{worker.index}")
            )

    def wake(self) -> None:
        """Tell every worker that jobs were committed. Never blocks: a wake already waiting in
        a worker's socket says the same, so one that does not fit is dropped."""
        for worker in self._workers:
            writer = worker.writer
            if writer is None or writer.is_closing():
                continue
            if writer.transport.get_write_buffer_size() == 0:
                writer.write(WAKE)

    def expositions(self) -> list[bytes]:
        """The last metrics each running worker sent (see `bot.metrics.merged`)."""
        return [w.exposition for w in self._workers if w.exposition]

    async def stop(self, grace: float) -> None:
        """SIGTERM each worker and wait for it: it finishes (or gives up) its jobs in flight
        within `grace`; one still running well past that is killed."""
        self._stopping = True
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        processes = [w.process for w in self._workers if w.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=grace + 10)
            except TimeoutError:
                log.error("outbox worker process %d did not stop; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for worker in self._workers:
            await self._forget(worker)

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *self._command,
                "--control-fd",
                str(theirs.fileno()),
                "--parent-pid",
                str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        worker.control = ours
        reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        worker.tasks = [asyncio.create_task(self._read_metrics(worker, reader))]
        log.info("outbox worker process %d started (pid %d)", worker.index, worker.process.pid)

    async def _read_metrics(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
                if size > MAX_EXPOSITION:
                    log.error("outbox worker %d sent %d bytes of metrics", worker.index, size)
                    return
                worker.exposition = await reader.readexactly(size)

    async def _watch(self, worker: _Worker) -> None:
        """Start the worker again whenever it exits, until `stop`."""
        pause = RESTART_MIN
        loop = asyncio.get_running_loop()
        while True:
            assert worker.process is not None
            started = loop.time()
            code = await worker.process.wait()
            if self._stopping:
                return
            log.error(
                "outbox worker process %d (pid %d) exited with %s; starting it again in %.1fs",
                worker.index,
                worker.process.pid,
                code,
                pause,
            )
            await self._forget(worker)
            await asyncio.sleep(pause)
            pause = (
                RESTART_MIN if loop.time() - started > STEADY_AFTER else min(pause * 2, RESTART_MAX)
            )
            try:
                await self._spawn(worker)
            except OSError:
                # Could not even start it (no processes or descriptors left): keep trying.
                log.exception("could not start outbox worker process %d", worker.index)

    async def _forget(self, worker: _Worker) -> None:
        for task in worker.tasks:
            task.cancel()
        for task in worker.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        worker.tasks = []
        if worker.writer is not None:
            worker.writer.close()
            with contextlib.suppress(ConnectionError):
                await worker.writer.wait_closed()
        worker.writer = None
        worker.control = None
        worker.exposition = b""


class ControlChannel:
    """The worker's side of its socket: wakes in, metrics out, the HTTP process's exit."""

    def __init__(self, fd: int, *, parent_pid: int) -> None:
        self._fd = fd
        self._parent_pid = parent_pid
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: asyncio.StreamWriter | None = None

    async def start(
        self,
        *,
        on_wake: Callable[[], None],
        on_parent_gone: Callable[[], None],
        exposition: Callable[[], bytes],
    ) -> None:
        _die_with_parent()
        if os.getppid() != self._parent_pid:
            on_parent_gone()  # it was gone before the signal could be asked for
        sock = socket.socket(fileno=self._fd)
        reader, self._writer = await asyncio.open_unix_connection(sock=sock)
        self._tasks = [
            asyncio.create_task(self._read(reader, on_wake, on_parent_gone)),
            asyncio.create_task(self._send_metrics(exposition)),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError):
                await self._writer.wait_closed()

    async def _read(
        self,
        reader: asyncio.StreamReader,
        on_wake: Callable[[], None],
        on_parent_gone: Callable[[], None],
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(4096):
                if WAKE in data:
                    on_wake()
        on_parent_gone()

    async def _send_metrics(self, exposition: Callable[[], bytes]) -> None:
        assert self._writer is not None
        sent = b""
        with contextlib.suppress(ConnectionError):
            while True:
                current = exposition()
                if current != sent:
                    self._writer.write(_LENGTH.pack(len(current)) + current)
                    await self._writer.drain()
                    sent = current
                await asyncio.sleep(METRICS_EVERY)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent exits (PR_SET_PDEATHSIG): a worker
    must not outlive a `serve` that was killed. Elsewhere the control socket's end-of-file
    says the same, a moment later."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
