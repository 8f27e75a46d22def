"""The whole service as a real process: signed events in, signed callbacks out, retries, dead
letters, replay, long poll, graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx

from tests.e2e.conftest import API_TOKEN, Serve
from tests.support import CallbackSink, event_body, free_port, run_signoff, sign

AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


async def post_event(serve: Serve, body: dict) -> dict:
    raw, headers = sign(body)
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{serve.url}/v1/events", content=raw, headers=headers)
    assert response.status_code == 202, response.text
    return dict(response.json())


async def wait_for_job(serve: Serve, request_id: str, status: str, timeout: float = 20) -> dict:
    for _ in range(int(timeout / 0.2)):
        shown = serve.cli("requests", "show", request_id, "--json")
        assert shown.returncode == 0, shown.stderr
        view = json.loads(shown.stdout)
        if view["sync"] and view["sync"][0]["status"] == status:
            return dict(view)
        await asyncio.sleep(0.2)
    raise AssertionError(f"job of {request_id} never reached {status}: {view['sync']}")


async def test_callbacks_retries_dead_letter_and_replay(serve: Serve) -> None:
    sink = CallbackSink(port=free_port())
    await sink.start()
    try:
        approved = await post_event(
            serve, event_body(attributes={"amount": 50}, callback_url=sink.url)
        )
        assert approved["status"] == "approved"
        await sink.wait_for(1)
        assert sink.deliveries[0].body["request_id"] == approved["request_id"]
        assert sink.refused_signatures == 0

        # The source goes down: the next callback is retried, then dead-lettered.
        await sink.stop()
        failing = await post_event(
            serve, event_body(attributes={"amount": 60}, callback_url=sink.url)
        )
        view = await wait_for_job(serve, failing["request_id"], "dead")
        job = view["sync"][0]
        assert job["attempts"] == 3
        assert job["last_error"]
        shown = serve.cli("requests", "show", failing["request_id"])
        assert "dead" in shown.stdout and "signoff replay" in shown.stdout

        # The source is back: replay delivers exactly once.
        await sink.start()
        replayed = serve.cli("replay", job["job_id"])
        assert replayed.returncode == 0, replayed.stderr
        await sink.wait_for(2)
        await wait_for_job(serve, failing["request_id"], "done")
        await asyncio.sleep(0.5)
        deliveries = sink.unique_deliveries()
        assert len(deliveries[f"sync-{failing['request_id']}"]) == 1
        assert len(deliveries[f"sync-{approved['request_id']}"]) == 1
        assert len(sink.deliveries) == 2

        again = serve.cli("replay", job["job_id"])
        assert again.returncode == 2
        assert "dead" in again.stderr
    finally:
        await sink.stop()

    assert serve.stop() == 0
    verified = serve.cli("audit", "verify")
    assert verified.returncode == 0, verified.stdout
    exported = serve.cli("audit", "export", "--format", "jsonl")
    kinds = [json.loads(line)["kind"] for line in exported.stdout.splitlines()]
    assert kinds.count("sync.attempt_failed") == 2
    assert kinds.count("sync.dead_lettered") == 1
    assert kinds.count("operator.replay") == 1
    assert kinds.count("sync.delivered") == 2
    assert "whsec_" not in exported.stdout


async def test_long_poll_and_graceful_shutdown(serve: Serve) -> None:
    routed = await post_event(serve, event_body())
    assert routed["status"] == "pending"
    async with httpx.AsyncClient(timeout=30) as client:
        url = f"{serve.url}/v1/requests/{routed['request_id']}"
        quick = await client.get(f"{url}?wait=0.5", headers=AUTH)
        assert quick.json()["status"] == "pending"

        # A long poll in flight when SIGTERM arrives is answered, not dropped.
        poll = asyncio.create_task(client.get(f"{url}?wait=25", headers=AUTH))
        await asyncio.sleep(0.5)
        assert serve.process is not None
        serve.process.send_signal(signal.SIGTERM)
        response = await poll
        assert response.status_code == 200
        assert response.json()["status"] == "pending"
    assert serve.stop() == 0
    listed = serve.cli("requests", "list", "--json")
    assert [r["id"] for r in json.loads(listed.stdout)] == [routed["request_id"]]


async def test_bad_settings_fail_with_one_line(serve_env: dict[str, str]) -> None:
    result = run_signoff("serve", env={**serve_env, "SIGNOFF_PORT": "eighty"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "signoff: invalid setting SIGNOFF_PORT: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]
    without_secret = {k: v for k, v in serve_env.items() if k != "SIGNOFF_WEBHOOK_SECRET"}
    result = run_signoff("serve", env=without_secret)
    assert result.returncode == 2
    assert "SIGNOFF_WEBHOOK_SECRET is required" in result.stderr
