"""The correlation id in the running app: one routed event's lines, from its intake through the
votes that decide it to the sync-back the worker delivers, all carry its request id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from bot.logs import configure
from bot.slack.cards import button_value
from tests.integration.conftest import SlackRunning
from tests.slack_support import block_action, signed
from tests.support import event_body, sign


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The app's log as `serve` configures it, written to a buffer; the root logger's previous
    handlers (pytest's capture) come back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure(level="INFO", fmt="json", stream=stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


async def test_one_id_from_intake_through_votes_to_sync_back(
    slack_running: SlackRunning, log_lines: io.StringIO
) -> None:
    env = slack_running
    raw, headers = sign(event_body(callback_url=env.sink.url), msg_id="msg_correlated")
    answer = await (await env.client.post("/v1/events", data=raw, headers=headers)).json()
    request_id = answer["request_id"]
    for user in ("UA1", "UA2", "U0CFO"):
        body = block_action(
            action_id="signoff_approve", value=button_value(request_id, "1"), user=user
        )
        assert (
            await env.client.post("/slack/events", data=body, headers=signed(body))
        ).status == 200
    await env.sink.wait_for(1)

    def delivered() -> list[dict]:
        lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
        done = [
            line
            for line in lines
            if line.get("job_kind") == "webhook.callback" and line["outcome"] == "done"
        ]
        return lines if done else []

    for _ in range(100):
        if lines := delivered():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no sync-back line:\n{log_lines.getvalue()}")

    [intake] = [line for line in lines if line.get("delivery_id") == "webhook:msg_correlated"]
    assert intake["correlation_id"] == request_id
    assert intake["level"] == "INFO" and intake["logger"] == "bot.http"
    [sync] = [line for line in lines if line.get("job_kind") == "webhook.callback"]
    assert sync["correlation_id"] == request_id
    votes = [line for line in lines if line["message"].startswith("vote by")]
    assert len(votes) == 3
    assert {line["correlation_id"] for line in votes} == {request_id}
    card = [line for line in lines if line.get("job_kind") == "slack.post_card"]
    assert card and card[0]["correlation_id"] == request_id
