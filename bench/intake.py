"""Intake throughput: signed events at 16 connections against `signoff serve` and a bare aiohttp
handler, in the same run. Prints events/s, p50/p99 latency, the ratio, and the serve process's
CPU time per event (what the throughput is bound by once the process is CPU-bound).

    .venv/bin/python bench/intake.py [--seconds 10] [--connections 16] [--postgres URL]
                                     [--engine wrk|python]

The load comes from `wrk` (Debian's package) when it is installed: every request is signed
beforehand, each with its own `webhook-id`, and replayed by a Lua script, so the load generator
takes a fraction of the CPU a Python client would on this 2-core machine. `--engine python`
uses an aiohttp client instead.

Every event Signoff answers `202` to is durable first: event, decision, request, audit records
and an outbox job (the events are auto-approved with a callback URL, so each one also causes a
signed callback, delivered to a local receiver while the load runs).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import wrk  # noqa: E402
from tests.support import SECRET, children, event_body, free_port, sign  # noqa: E402

POLICY = """
rules:
  - name: small-refunds
    when: event.kind == "refund" && event.attributes.amount < 500
    decide: auto_approve
default:
  decide: route
  route: {channel: C0APPROVALS, approvers: [{group: approvers, min: 1}]}
"""


def bare_server(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True}, status=202)

    app = web.Application()
    app.router.add_post("/v1/events", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}")
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{url} never became ready")


async def load(
    url: str, *, seconds: float, connections: int, callback: str | None
) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            raw, headers = sign(event_body(attributes={"amount": 100}, callback_url=callback))
            started = time.perf_counter()
            async with session.post(url, data=raw, headers=headers) as response:
                await response.read()
                if response.status != 202:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=connections)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(len(latencies) * 0.99) - 1] * 1000,
        "n": len(latencies),
        "errors": errors,
    }


def presigned(count: int, callback: str | None) -> Iterator[tuple[bytes, dict[str, str]]]:
    """`count` signed events, each with its own webhook-id, for wrk to replay."""
    for _ in range(count):
        raw, headers = sign(event_body(attributes={"amount": 100}, callback_url=callback))
        yield raw, {"content-type": "application/json", **headers}


def wrk_load(
    base: str, *, seconds: float, connections: int, callback: str | None, rate_hint: int
) -> dict[str, float]:
    # Enough distinct events for the whole run at the bare handler's rate, with room.
    records = presigned(int(rate_hint * (seconds + 1)), callback)
    return wrk.replay(f"{base}/v1/events", records, seconds=seconds, connections=connections)


def cpu_seconds(pid: int, *, workers: bool = True) -> float:
    """User + system CPU time the process has used so far, with that of its children (serve's
    outbox worker processes) unless `workers` is False (Linux /proc)."""
    return sum(_own_cpu(p) for p in (pid, *(children(pid) if workers else ())))


def _own_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # exited meanwhile
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_load(
    base: str,
    args: argparse.Namespace,
    callback: str | None,
    *,
    seconds: float,
    rate_hint: int = 5000,
) -> dict[str, float]:
    if args.engine == "wrk":
        return await asyncio.to_thread(
            wrk_load,
            base,
            seconds=seconds,
            connections=args.connections,
            callback=callback,
            rate_hint=rate_hint,
        )
    return await load(
        f"{base}/v1/events", seconds=seconds, connections=args.connections, callback=callback
    )


def callback_server(port: int) -> None:
    """The source system's callback endpoint, in its own process so that receiving callbacks
    does not take CPU from the load generator, at low CPU priority: it stands for a remote
    system, whose CPU should not be taken from the processes measured (as the Slack stand-in
    in bench/clicks.py)."""
    os.nice(10)

    received = 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal received
        await request.read()
        received += 1
        return web.json_response({"ok": True})

    async def count(_request: web.Request) -> web.Response:
        return web.json_response({"received": received})

    app = web.Application()
    app.router.add_post("/cb", handle)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


@contextlib.asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine

    name = f"signoff_bench_{os.getpid()}"
    admin = create_async_engine(make_url(server_url), isolation_level="AUTOCOMMIT")
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


class CallbackCounter:
    """Callbacks the receiver has had since the last `mark()`."""

    def __init__(self, callback: str | None) -> None:
        self._url = callback.rsplit("/", 1)[0] + "/count" if callback else None
        self._mark = 0

    async def _total(self) -> int:
        if self._url is None:
            return 0
        async with aiohttp.ClientSession() as session, session.get(self._url) as response:
            return int((await response.json())["received"])

    async def mark(self) -> None:
        self._mark = await self._total()

    async def delivered(self) -> int:
        return await self._total() - self._mark

    async def drained(self, expected: float, *, timeout: float) -> None:
        """Wait until `expected` callbacks have arrived since the mark."""
        deadline = time.monotonic() + timeout
        while self._url is not None and await self.delivered() < expected:
            if time.monotonic() > deadline:
                raise SystemExit(f"callbacks not all delivered after {timeout:g} s")
            await asyncio.sleep(0.05)


def report(name: str, figures: dict[str, float]) -> None:
    print(
        f"{name:<28} {figures['rps']:>8.0f} events/s   p50 {figures['p50']:6.2f} ms   "
        f"p99 {figures['p99']:6.2f} ms   ({figures['n']:.0f} requests, "
        f"{figures['errors']:.0f} errors)"
    )


def start_serve(
    tmp: Path, *, database_url: str, policy: str, port: int, **settings: str
) -> subprocess.Popen[bytes]:
    """`signoff serve` in its own process on `port`, with `policy` written under `tmp`;
    `settings` adds environment variables (Slack's, for the benches that click)."""
    path = tmp / "policy.yaml"
    path.write_text(policy)
    env = {
        **os.environ,
        "SIGNOFF_DATABASE_URL": database_url,
        "SIGNOFF_POLICY_PATH": str(path),
        "SIGNOFF_WEBHOOK_SECRET": SECRET,
        "SIGNOFF_PORT": str(port),
        "SIGNOFF_LOG_LEVEL": "WARNING",
        **settings,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "serve"], env=env, stdout=subprocess.DEVNULL
    )


def py_spy() -> str | None:
    """py-spy's path: on PATH, or beside this interpreter (a venv not activated)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return spy if Path(spy).exists() else None


def profile(pid: int, args: argparse.Namespace) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the serve process from the measured run until its callbacks are all
    delivered (collapsed stacks): where the CPU per event goes."""
    if not args.profile:
        return None
    spy = py_spy()
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            "3600",
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            args.profile,
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
    )


async def run_signoff(database_url: str, args: argparse.Namespace, callback: str | None) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        process = start_serve(
            Path(tmp), database_url=database_url.replace("{tmp}", tmp), policy=POLICY, port=port
        )
        try:
            await wait_ready(f"http://127.0.0.1:{port}/healthz", process)
            base = f"http://127.0.0.1:{port}"
            counter = CallbackCounter(callback)
            await counter.mark()
            warmup = await run_load(base, args, callback, seconds=1)
            # The warm-up's callbacks are delivered before the measured run starts.
            await counter.drained(warmup["n"] - warmup["errors"], timeout=120)
            await counter.mark()
            cpu_before = cpu_seconds(process.pid)
            http_before = cpu_seconds(process.pid, workers=False)
            profiler = profile(process.pid, args)
            figures = await run_load(base, args, callback, seconds=args.seconds)
            accepted = figures["n"] - figures["errors"]
            figures["during"] = await counter.delivered()
            started, cpu_drain = time.monotonic(), cpu_seconds(process.pid)
            # Every callback of the run is delivered before the CPU is read: the CPU per
            # event is the whole cost of an event, its sync-back included.
            await counter.drained(accepted, timeout=300)
            figures["drain_s"] = time.monotonic() - started
            drained = accepted - figures["during"]
            if callback and drained > 100:
                figures["drain_cpu_ms"] = (cpu_seconds(process.pid) - cpu_drain) * 1000 / drained
                figures["drain_rate"] = drained / figures["drain_s"]
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                profiler.wait()
            figures["cpu_ms"] = (cpu_seconds(process.pid) - cpu_before) * 1000 / figures["n"]
            http_cpu = cpu_seconds(process.pid, workers=False) - http_before
            figures["http_cpu_ms"] = http_cpu * 1000 / figures["n"]
            return figures
        finally:
            process.terminate()
            process.wait(timeout=60)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--postgres",
        help="postgresql+asyncpg:// URL of a server where a scratch database may be created",
    )
    parser.add_argument(
        "--no-callback", action="store_true", help="events without callback_url (intake only)"
    )
    parser.add_argument(
        "--engine",
        choices=["wrk", "python"],
        default="wrk" if wrk.available() else "python",
        help="load generator (default: wrk when installed)",
    )
    parser.add_argument(
        "--profile", metavar="FILE", help="write py-spy collapsed stacks of serve to FILE"
    )
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--callback-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    callback_port = free_port()
    receiver = subprocess.Popen([sys.executable, __file__, "--callback-server", str(callback_port)])
    try:
        await wait_ready(f"http://127.0.0.1:{callback_port}/", receiver)
        await measure(args, None if args.no_callback else f"http://127.0.0.1:{callback_port}/cb")
    finally:
        receiver.terminate()
        receiver.wait()


async def measure(args: argparse.Namespace, callback: str | None) -> None:
    bare_port = free_port()
    bare = subprocess.Popen([sys.executable, __file__, "--bare-server", str(bare_port)])
    try:
        await wait_ready(f"http://127.0.0.1:{bare_port}/", bare)
        base = f"http://127.0.0.1:{bare_port}"
        await run_load(base, args, callback, seconds=1, rate_hint=40000)
        baseline = await run_load(base, args, callback, seconds=args.seconds, rate_hint=40000)
    finally:
        bare.terminate()
        bare.wait()

    print(
        f"{args.connections} connections, {args.seconds:g} s per run, load from {args.engine},"
        " 2-core machine"
    )
    report("bare aiohttp (baseline)", baseline)
    results = {
        "signoff on SQLite": await run_signoff(
            "sqlite+aiosqlite:///{tmp}/signoff.db", args, callback
        )
    }
    if args.postgres:
        async with scratch_database(args.postgres) as url:
            results["signoff on PostgreSQL"] = await run_signoff(url, args, callback)
    for name, figures in results.items():
        report(name, figures)
        print(
            f"{'':<28} ratio to baseline: {figures['rps'] / baseline['rps']:.2f}x "
            f"throughput, {figures['p50'] / baseline['p50']:.1f}x p50 latency; "
            f"serve CPU {figures['cpu_ms']:.2f} ms/event"
            + (", its callback included" if callback else "")
            + f" (HTTP process {figures['http_cpu_ms']:.2f}, worker processes "
            f"{figures['cpu_ms'] - figures['http_cpu_ms']:.2f})"
        )
        if callback:
            print(
                f"{'':<28} callbacks delivered while the load ran: {figures['during']:.0f} "
                f"({figures['during'] / max(1, figures['n'] - figures['errors']):.0%}); "
                f"the rest within {figures['drain_s']:.1f} s after"
            )
        if "drain_rate" in figures:
            print(
                f"{'':<28} delivering alone after the load: {figures['drain_rate']:.0f} "
                f"callbacks/s, serve CPU {figures['drain_cpu_ms']:.2f} ms each"
            )


if __name__ == "__main__":
    if "--bare-server" in sys.argv:
        bare_server(int(sys.argv[sys.argv.index("--bare-server") + 1]))
    elif "--callback-server" in sys.argv:
        callback_server(int(sys.argv[sys.argv.index("--callback-server") + 1]))
    else:
        asyncio.run(main())
