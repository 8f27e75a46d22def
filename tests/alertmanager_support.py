"""Alertmanager for tests: a local stand-in speaking API v2 silences (for failure shapes the real
one will not produce on demand), and the real binary (SIGNOFF_TEST_ALERTMANAGER)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web

from tests.conftest import reference
from tests.support import free_port

BINARY = os.environ.get("SIGNOFF_TEST_ALERTMANAGER", "")
NO_ALERTMANAGER = (
    "the real-Alertmanager tests need SIGNOFF_TEST_ALERTMANAGER, the path of an alertmanager "
    "binary; .ci/install-alertmanager fetches Debian's and .ci/run sets it"
)
_FILTER = re.compile(r'^(?P<name>[^=]+)="(?P<value>(?:[^"\\]|\\.)*)"$')


@dataclass
class Refusal:
    status: int
    body: str
    content_type: str = "application/json"


@dataclass
class AlertmanagerStandIn:
    """`/api/v2/silences` as Alertmanager 0.25 answers it. `refuse["GET"]` / `refuse["POST"]`:
    the next requests of that method get these refusals instead (and record nothing)."""

    port: int = field(default_factory=free_port)
    silences: list[dict[str, Any]] = field(default_factory=list)
    posts: int = 0
    gets: list[list[str]] = field(default_factory=list)
    refuse: dict[str, list[Refusal]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _refused(self, method: str) -> web.Response | None:
        waiting = self.refuse.get(method)
        if not waiting:
            return None
        refusal = waiting.pop(0)
        return web.Response(
            status=refusal.status, text=refusal.body, content_type=refusal.content_type
        )

    async def _post(self, request: web.Request) -> web.Response:
        refused = self._refused("POST")
        if refused is not None:
            return refused
        self.posts += 1
        body = await request.json()
        silence = {"id": str(uuid.uuid4()), "status": {"state": "active"}, **body}
        self.silences.append(silence)
        return web.json_response(_silence_answer(silence["id"]))

    async def _get(self, request: web.Request) -> web.Response:
        refused = self._refused("GET")
        if refused is not None:
            return refused
        filters = request.query.getall("filter", [])
        self.gets.append(filters)
        wanted = []
        for text in filters:
            match = _FILTER.match(text)
            if match is None:
                return web.json_response(f"bad matcher format: {text}", status=400)
            value = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m[1], m[1]), match["value"])
            wanted.append((match["name"], value))
        found = [
            silence
            for silence in self.silences
            if all(
                any(m["name"] == name and m["value"] == value for m in silence["matchers"])
                for name, value in wanted
            )
        ]
        return web.json_response(found)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v2/silences", self._post)
        app.router.add_get("/api/v2/silences", self._get)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


# --- the real binary ------------------------------------------------------------------------


def config(*, webhook_url: str, token: str) -> str:
    """The config the reference capture used, with quick groups, pointed at `webhook_url` with
    `token` as its bearer token."""
    loaded = yaml.safe_load(reference("alertmanager", "am.yml").read_text())
    loaded["route"].update(group_wait="200ms", group_interval="1s")
    [receiver] = loaded["receivers"]
    [hook] = receiver["webhook_configs"]
    hook.update(url=webhook_url, http_config={"authorization": {"credentials": token}})
    return yaml.safe_dump(loaded)


def _silence_answer(silence_id: str) -> dict[str, Any]:
    """Alertmanager 0.25's answer to a silence POST, with another id."""
    real = reference("alertmanager", "am0.25_silence_post.resp.txt").read_text()
    answer = json.loads(real.split("\n\n", 1)[1])
    assert list(answer) == ["silenceID"]
    return {"silenceID": silence_id}


@dataclass
class RealAlertmanager:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    async def push(self, alerts: list[dict[str, Any]]) -> None:
        async with httpx.AsyncClient() as client:
            answer = await client.post(f"{self.url}/api/v2/alerts", json=alerts)
        assert answer.status_code == 200, answer.text

    async def silences(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{self.url}/api/v2/silences")
        assert answer.status_code == 200, answer.text
        return list(answer.json())

    async def alerts(self) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{self.url}/api/v2/alerts")
        assert answer.status_code == 200, answer.text
        return list(answer.json())


@contextlib.asynccontextmanager
async def real_alertmanager(
    tmp_path: Path, *, webhook_url: str, token: str, port: int | None = None
) -> AsyncIterator[RealAlertmanager]:
    """The real Alertmanager on loopback (`port`, or a free one), clustering off, its state in
    tmp_path, notifying `webhook_url` with `token`. Skips without SIGNOFF_TEST_ALERTMANAGER."""
    if not BINARY:
        pytest.skip(NO_ALERTMANAGER)
    binary = Path(BINARY)
    if not binary.is_file():
        pytest.fail(f"SIGNOFF_TEST_ALERTMANAGER={BINARY} is not a file")
    config_file = tmp_path / "alertmanager.yml"
    config_file.write_text(config(webhook_url=webhook_url, token=token))
    port = port or free_port()
    log = tmp_path / "alertmanager.log"
    with log.open("wb") as out:
        # Run from its own folder: the Debian build reads its templates from there (see
        # .ci/install-alertmanager).
        process = subprocess.Popen(
            [
                str(binary),
                f"--config.file={config_file}",
                f"--storage.path={tmp_path / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            cwd=binary.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    running = RealAlertmanager(f"http://127.0.0.1:{port}", process, log)
    try:
        await _ready(running)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _ready(running: RealAlertmanager) -> None:
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            if running.process.poll() is not None:
                break
            with contextlib.suppress(httpx.TransportError):
                answer = await client.get(f"{running.url}/-/ready")
                if answer.status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"Alertmanager did not start:\n{running.log.read_text()[-3000:]}")
