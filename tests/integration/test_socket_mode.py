"""Socket Mode for real: the running service connects to the Slack stand-in over a websocket
(slack_sdk's aiohttp SocketModeClient under Bolt), gets its envelopes and acks them there."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from sqlalchemy import select

from bot.slack.cards import button_value
from bot.slack.command_blocks import help_answer
from bot.slack.standin import DEFAULT_APP_TOKEN, DEFAULT_TOKEN, SlackStandIn
from storage.models import AuditRecord, Vote
from tests.integration.conftest import SlackRunning, slack_app
from tests.integration.test_slack_flow import card_posted, routed, wait_until
from tests.slack_support import block_action, slash_command


@contextlib.asynccontextmanager
async def socket_mode_service(db_url: str) -> AsyncIterator[SlackRunning]:
    """Signoff with SLACK_APP_TOKEN set, so Bolt listens over Socket Mode. Events still
    arrive over HTTP (/v1/events); only Slack's side moved to the socket."""
    async with slack_app(db_url, SLACK_APP_TOKEN=DEFAULT_APP_TOKEN) as env:
        yield env


@pytest.fixture
async def socket_slack(sqlite_url: str) -> AsyncIterator[SlackRunning]:
    async with socket_mode_service(sqlite_url) as env:
        yield env


def click_payload(request: dict[str, Any], user: str, *, channel: str, ts: str) -> dict[str, Any]:
    """The block_actions payload Slack puts in an `interactive` envelope (a dict, not a form)."""
    body = block_action(
        action_id="signoff_approve",
        value=button_value(request["request_id"], request["version"]),
        user=user,
        name=user.lower(),
        channel=channel,
        ts=ts,
    )
    payload: dict[str, Any] = json.loads(dict(parse_qsl(body))["payload"])
    return payload


async def test_connects_with_the_app_token_and_answers_pings(socket_slack: SlackRunning) -> None:
    slack = socket_slack.slack
    [opened] = slack.calls_to("apps.connections.open")
    assert opened.ok
    assert slack.socket_connections == 1 and slack.open_sockets == 1
    # slack_sdk answers Slack's pings itself (it connects with autoping off).
    await slack.ping()


async def test_approver_vote_is_recorded_and_acked_over_the_socket(
    socket_slack: SlackRunning,
) -> None:
    env = socket_slack
    request = await routed(env)
    channel, ts = await card_posted(env, request["request_id"])

    payload = click_payload(request, "UA1", channel=channel, ts=ts)
    ack = await env.slack.send_envelope("interactive", payload)
    # An empty ack: the card's update and the thread reply go through the outbox.
    assert ack == {"envelope_id": env.slack.socket_acks[-1].envelope_id}
    # Bolt acks only after the listener made the vote durable.
    async with env.services.sessions() as session:
        votes = list(await session.scalars(select(Vote.user_id)))
    assert votes == ["UA1"]

    async def replied() -> bool:
        return len(env.slack.messages(channel, thread_ts=ts)) == 1

    await wait_until(replied)
    [reply] = env.slack.messages(channel, thread_ts=ts)
    assert reply.text is not None and "<@UA1>" in reply.text
    assert env.slack.ephemerals == []


async def test_non_approver_is_refused_with_an_ephemeral(socket_slack: SlackRunning) -> None:
    env = socket_slack
    request = await routed(env)
    channel, ts = await card_posted(env, request["request_id"])

    ack = await env.slack.send_envelope(
        "interactive", click_payload(request, "UNOPE", channel=channel, ts=ts)
    )
    assert set(ack) == {"envelope_id"}
    [call] = await env.slack.wait_for_calls("chat.postEphemeral")
    assert call.ok and call.params["user"] == "UNOPE" and call.params["channel"] == channel
    [note] = env.slack.ephemerals
    assert note.text is not None and "not one of this request's approvers" in note.text
    async with env.services.sessions() as session:
        assert list(await session.scalars(select(Vote))) == []
        refused = list(
            await session.scalars(
                select(AuditRecord.kind).where(AuditRecord.kind == "vote.refused")
            )
        )
    assert refused == ["vote.refused"]


async def test_slash_command_is_answered_in_the_ack(socket_slack: SlackRunning) -> None:
    payload = dict(parse_qsl(slash_command("help")))
    ack = await socket_slack.slack.send_envelope("slash_commands", payload)
    assert ack["payload"] == help_answer().as_ack()


async def test_reconnects_when_slack_asks_and_closes_cleanly(sqlite_url: str) -> None:
    async with socket_mode_service(sqlite_url) as env:
        slack = env.slack
        await slack.disconnect()

        async def reconnected() -> bool:
            return slack.socket_connections == 2 and slack.open_sockets == 1

        await wait_until(reconnected)
        assert len(slack.calls_to("apps.connections.open")) == 2
        ack = await slack.send_envelope("slash_commands", dict(parse_qsl(slash_command("help"))))
        assert ack["payload"] == help_answer().as_ack()

        await env.services.close()
        await slack.wait_for_no_socket()
        # Closed for good: no reconnect after the service let go.
        assert len(slack.calls_to("apps.connections.open")) == 2


# --- the stand-in's side of the protocol, without Bolt -----------------------------------


async def test_connection_url_needs_the_app_token_and_is_single_use() -> None:
    async with SlackStandIn() as slack:
        bot = AsyncWebClient(token=DEFAULT_TOKEN, base_url=slack.url)
        with pytest.raises(SlackApiError) as refused:
            await bot.apps_connections_open(app_token=DEFAULT_TOKEN)
        assert refused.value.response["error"] == "not_allowed_token_type"
        with pytest.raises(SlackApiError) as refused:
            await bot.apps_connections_open(app_token="xapp-1-wrong")
        assert refused.value.response["error"] == "invalid_auth"
        with pytest.raises(SlackApiError) as refused:
            await AsyncWebClient(token=DEFAULT_APP_TOKEN, base_url=slack.url).auth_test()
        assert refused.value.response["error"] == "not_allowed_token_type"

        url = (await bot.apps_connections_open(app_token=DEFAULT_APP_TOKEN))["url"]
        assert url.startswith("ws://127.0.0.1:") and "ticket=" in url
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(url) as socket:
                hello = await socket.receive_json(timeout=5)
                assert hello["type"] == "hello"
                assert hello["connection_info"] == {"app_id": slack.app_id}
                await slack.wait_for_socket()
            await slack.wait_for_no_socket()
            with pytest.raises(aiohttp.WSServerHandshakeError) as used:
                await http.ws_connect(url)
            assert used.value.status == 401


async def test_envelope_waits_for_its_ack_and_stop_closes_the_socket() -> None:
    slack = SlackStandIn()
    await slack.start()
    try:
        url = (
            await AsyncWebClient(base_url=slack.url).apps_connections_open(
                app_token=DEFAULT_APP_TOKEN
            )
        )["url"]
        async with aiohttp.ClientSession() as http, http.ws_connect(url) as socket:
            assert (await socket.receive_json(timeout=5))["type"] == "hello"
            await slack.wait_for_socket()
            with pytest.raises(TimeoutError):
                await slack.send_envelope("events_api", {"event": {}}, timeout=0.1)
            unanswered = await socket.receive_json(timeout=5)
            assert unanswered["type"] == "events_api"
            assert unanswered["accepts_response_payload"] is False

            async def answer() -> None:
                envelope = await socket.receive_json(timeout=5)
                assert envelope["accepts_response_payload"] is True
                await socket.send_json(
                    {"envelope_id": envelope["envelope_id"], "payload": {"text": "ok"}}
                )

            sent = slack.send_envelope("interactive", {"type": "block_actions"})
            ack, _ = await asyncio.gather(sent, answer())
            assert ack["payload"] == {"text": "ok"}
            assert [a.type for a in slack.socket_acks] == ["interactive"]

            await slack.stop()
            closing = await socket.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            assert socket.close_code == aiohttp.WSCloseCode.GOING_AWAY
    finally:
        await slack.stop()


async def test_a_click_in_flight_at_shutdown_still_records_its_vote(
    socket_slack: SlackRunning, sqlite_url: str
) -> None:
    """slack_sdk does not track the envelopes it hands to Bolt; Signoff does, and shutdown waits
    for them, so a vote being written when SIGTERM comes is not cut off."""
    import sqlite3

    env = socket_slack
    request = await routed(env)
    channel, ts = await card_posted(env, request["request_id"])
    # Another writer holds the database: the vote waits for it, in flight.
    blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite+aiosqlite:///"), timeout=5)
    blocker.execute("BEGIN IMMEDIATE")
    payload = click_payload(request, "UA1", channel=channel, ts=ts)
    click = asyncio.create_task(env.slack.send_envelope("interactive", payload, timeout=10))
    await asyncio.sleep(0.3)
    closing = asyncio.create_task(env.services.close())
    await asyncio.sleep(0.5)
    assert not closing.done(), "shutdown must wait for the click being handled"
    blocker.rollback()
    blocker.close()
    await asyncio.wait_for(closing, 15)
    click.cancel()
    with contextlib.suppress(asyncio.CancelledError, TimeoutError, aiohttp.ClientError):
        await click
    check = sqlite3.connect(sqlite_url.removeprefix("sqlite+aiosqlite:///"))
    votes = check.execute("SELECT user_id FROM votes").fetchall()
    check.close()
    assert votes == [("UA1",)]
