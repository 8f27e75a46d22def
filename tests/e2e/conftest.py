"""`signoff serve` as a real process on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import POLICY, SECRET, children, free_port, run_signoff

API_TOKEN = "e2e-api-token-0123456789"


@dataclass
class Serve:
    env: dict[str, str]
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `signoff ARGS` against the same database."""
        return run_signoff(*args, env=self.env)

    async def start(self) -> None:
        with self.log.open("ab") as log:
            # The child keeps its own copy of the descriptor; ours can close at once.
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bot.cli", "serve"], env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"signoff serve exited:\n{self.log.read_text()}")
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"signoff serve did not become ready:\n{self.log.read_text()}")

    def crash(self) -> int:
        """`kill -9` of the whole service: its outbox worker processes, then itself (killed
        alone, `serve` would leave its workers to stop gracefully, bot.processes)."""
        assert self.process is not None
        for worker in children(self.process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        return self.stop(signal.SIGKILL)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.process = None
        return code


@pytest.fixture
def serve_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = {
        **os.environ,
        "SIGNOFF_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'signoff.db'}",
        "SIGNOFF_POLICY_PATH": str(POLICY),
        "SIGNOFF_WEBHOOK_SECRET": SECRET,
        "SIGNOFF_API_TOKEN": API_TOKEN,
        "SIGNOFF_HOST": "127.0.0.1",
        "SIGNOFF_OUTBOX_BACKOFF_BASE": "0.1",
        "SIGNOFF_OUTBOX_BACKOFF_MAX": "0.3",
        "SIGNOFF_OUTBOX_MAX_ATTEMPTS": "3",
        "SIGNOFF_CALLBACK_TIMEOUT": "2",
        "SIGNOFF_SHUTDOWN_GRACE": "10",
    }
    yield env


@pytest.fixture
async def serve(serve_env: dict[str, str], tmp_path: Path) -> AsyncIterator[Serve]:
    port = free_port()
    server = Serve({**serve_env, "SIGNOFF_PORT": str(port)}, port, tmp_path / "serve.log")
    await server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.crash()
