"""The Slack stand-in, driven by the real slack_sdk AsyncWebClient over a local port."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot.slack.standin import PACKAGED_SPEC, SHARED_SPEC, SlackStandIn, load_method_spec

TOKEN = "xoxb-test-standin"
CHANNEL = "C0APPROVALS"
USERS = {
    "U0ALICE": {"name": "alice", "real_name": "Alice Ops", "email": "alice@example.com"},
    "U0BOB": {"name": "bob", "real_name": "Bob Money", "email": "Bob@Example.com"},
}


def section(text: str) -> dict[str, object]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


@pytest.fixture
async def slack() -> AsyncIterator[SlackStandIn]:
    async with SlackStandIn(
        token=TOKEN,
        channels={CHANNEL},
        not_in_channel={"C0NOTMEMBER"},
        users=USERS,
        usergroups={"S0SRE": ["U0ALICE", "U0BOB"]},
        usergroup_handles={"sre-leads": "S0SRE"},
    ) as standin:
        yield standin


@pytest.fixture
def client(slack: SlackStandIn) -> AsyncWebClient:
    return AsyncWebClient(token=TOKEN, base_url=slack.url)


async def refused(call: Awaitable[Any]) -> SlackApiError:
    with pytest.raises(SlackApiError) as caught:
        await call
    return caught.value


async def test_url_is_an_api_base(slack: SlackStandIn) -> None:
    assert slack.url.startswith("http://127.0.0.1:")
    assert slack.url.endswith("/api/")


async def test_auth_test_answers_the_bot_identity(slack, client) -> None:
    answer = await client.auth_test()
    assert answer["ok"] is True
    assert {"url", "team", "user", "team_id", "user_id", "bot_id"} <= set(answer.data)
    assert answer["user_id"] == slack.bot_user_id
    assert answer["bot_id"] == slack.bot_id
    assert [c.method for c in slack.calls] == ["auth.test"]
    assert "token" not in slack.calls[0].params
    assert slack.calls[0].at.tzinfo is not None


async def test_post_message_and_thread_reply_are_kept(slack, client) -> None:
    posted = await client.chat_postMessage(channel=CHANNEL, text="card", blocks=[section("hi")])
    assert posted["channel"] == CHANNEL
    assert posted["message"]["blocks"][0]["text"]["text"] == "hi"
    reply = await client.chat_postMessage(channel=CHANNEL, text="vote", thread_ts=posted["ts"])
    assert float(reply["ts"]) > float(posted["ts"])

    messages = slack.messages(CHANNEL)
    assert [(m.ts, m.text, m.thread_ts) for m in messages] == [
        (posted["ts"], "card", None),
        (reply["ts"], "vote", posted["ts"]),
    ]
    assert [m.text for m in slack.messages(CHANNEL, thread_ts=posted["ts"])] == ["vote"]
    assert slack.calls_to("chat.postMessage")[0].params["blocks"] == [section("hi")]


async def test_update_changes_the_message_in_place(slack, client) -> None:
    posted = await client.chat_postMessage(channel=CHANNEL, text="pending", blocks=[section("a")])
    updated = await client.chat_update(
        channel=CHANNEL, ts=posted["ts"], text="approved", blocks=[section("done")]
    )
    assert updated["ts"] == posted["ts"]
    assert updated["message"]["edited"]["user"] == slack.bot_user_id
    [message] = slack.messages(CHANNEL)
    assert (message.text, message.blocks, message.edits) == ("approved", [section("done")], 1)


async def test_update_of_an_unknown_ts_is_message_not_found(slack, client) -> None:
    await client.chat_postMessage(channel=CHANNEL, text="x")
    error = await refused(client.chat_update(channel=CHANNEL, ts="1.000001", text="y"))
    assert error.response["error"] == "message_not_found"
    assert [m.text for m in slack.messages(CHANNEL)] == ["x"]


async def test_post_ephemeral(slack, client) -> None:
    answer = await client.chat_postEphemeral(channel=CHANNEL, user="U0ALICE", text="not you")
    assert answer["message_ts"]
    assert [(e.user, e.text) for e in slack.ephemerals] == [("U0ALICE", "not you")]
    error = await refused(client.chat_postEphemeral(channel=CHANNEL, user="U0NOBODY", text="x"))
    assert error.response["error"] == "user_not_in_channel"


async def test_views_open_and_modal_block_limit(slack, client) -> None:
    view = {
        "type": "modal",
        "callback_id": "reason",
        "title": {"type": "plain_text", "text": "Reject"},
        "blocks": [section("why?")],
    }
    answer = await client.views_open(trigger_id="123.456.abc", view=view)
    assert answer["view"]["id"].startswith("V")
    assert answer["view"]["callback_id"] == "reason"
    assert [v.trigger_id for v in slack.views] == ["123.456.abc"]

    too_big = {**view, "blocks": [{"type": "divider"}] * 101}
    error = await refused(client.views_open(trigger_id="123.456.abc", view=too_big))
    assert error.response["error"] == "invalid_arguments"
    assert "no more than 100 items" in error.response["response_metadata"]["messages"][0]
    assert len(slack.views) == 1


async def test_conversations_open_gives_a_dm_to_post_to(slack, client) -> None:
    opened = await client.conversations_open(users=["U0ALICE"])
    dm = opened["channel"]["id"]
    assert dm.startswith("D")
    assert slack.dm_channel("U0ALICE") == dm
    again = await client.conversations_open(users="U0ALICE")
    assert (again["channel"]["id"], again["already_open"]) == (dm, True)

    await client.chat_postMessage(channel=dm, text="you have a request")
    # Slack delivers a message addressed to a user id into the app's DM with that user.
    to_user = await client.chat_postMessage(channel="U0ALICE", text="and another")
    assert to_user["channel"] == dm
    assert [m.text for m in slack.messages(dm)] == ["you have a request", "and another"]
    error = await refused(client.conversations_open(users="U0NOBODY"))
    assert error.response["error"] == "user_not_found"


async def test_post_to_unknown_or_foreign_channel(client) -> None:
    error = await refused(client.chat_postMessage(channel="C0UNKNOWN", text="x"))
    assert error.response["error"] == "channel_not_found"
    error = await refused(client.chat_postMessage(channel="C0NOTMEMBER", text="x"))
    assert error.response["error"] == "not_in_channel"


async def test_usergroup_members_by_id_and_handle(client) -> None:
    by_id = await client.usergroups_users_list(usergroup="S0SRE")
    by_handle = await client.usergroups_users_list(usergroup="sre-leads")
    assert by_id["users"] == by_handle["users"] == ["U0ALICE", "U0BOB"]
    error = await refused(client.usergroups_users_list(usergroup="S0NONE"))
    assert error.response["error"] == "no_such_subteam"
    listed = await client.usergroups_list(include_users=True)
    assert [(g["id"], g["handle"], g["users"]) for g in listed["usergroups"]] == [
        ("S0SRE", "sre-leads", ["U0ALICE", "U0BOB"])
    ]


async def test_users_info(client) -> None:
    answer = await client.users_info(user="U0ALICE")
    assert answer["user"]["real_name"] == "Alice Ops"
    assert answer["user"]["profile"]["email"] == "alice@example.com"
    error = await refused(client.users_info(user="U0NOBODY"))
    assert error.response["error"] == "user_not_found"


async def test_users_lookup_by_email(client) -> None:
    found = await client.users_lookupByEmail(email="bob@example.com")
    assert found["user"]["id"] == "U0BOB"
    error = await refused(client.users_lookupByEmail(email="carol@example.com"))
    assert error.response["error"] == "users_not_found"


async def test_missing_required_params_are_named(slack, client) -> None:
    error = await refused(client.api_call("users.lookupByEmail", http_verb="GET", params={}))
    assert error.response["error"] == "invalid_arguments"
    assert error.response["response_metadata"]["messages"] == [
        "[ERROR] missing required field: email"
    ]
    error = await refused(client.api_call("views.open", json={"view": {"type": "modal"}}))
    assert "missing required field: trigger_id" in str(error.response["response_metadata"])
    error = await refused(client.api_call("chat.postMessage", json={"text": "x"}))
    assert error.response["error"] == "channel_not_found"
    # Through api_call: chat_postMessage() itself warns (an error here) when text is missing.
    error = await refused(client.api_call("chat.postMessage", json={"channel": CHANNEL}))
    assert error.response["error"] == "no_text"
    assert slack.messages(CHANNEL) == []


async def test_too_many_blocks_is_invalid_blocks(slack, client) -> None:
    blocks = [section(f"line {i}") for i in range(51)]
    error = await refused(client.chat_postMessage(channel=CHANNEL, text="x", blocks=blocks))
    assert error.response["error"] == "invalid_blocks"
    assert "no more than 50 items" in error.response["errors"][0]
    await client.chat_postMessage(channel=CHANNEL, text="x", blocks=blocks[:50])
    assert len(slack.messages(CHANNEL)) == 1


async def test_section_text_over_3000_chars_is_invalid_blocks(slack, client) -> None:
    blocks = [section("ok"), section("x" * 3001)]
    error = await refused(client.chat_postMessage(channel=CHANNEL, text="x", blocks=blocks))
    assert error.response["error"] == "invalid_blocks"
    assert error.response["errors"] == [
        "text attribute cannot exceed 3000 characters [json-pointer:/blocks/1]"
    ]
    posted = await client.chat_postMessage(channel=CHANNEL, text="x", blocks=[section("ok")])
    error = await refused(
        client.chat_update(channel=CHANNEL, ts=posted["ts"], text="y", blocks=blocks)
    )
    assert error.response["error"] == "invalid_blocks"
    assert slack.messages(CHANNEL)[0].blocks == [section("ok")]


async def test_form_body_with_blocks_as_a_json_string(slack, client) -> None:
    answer = await client.api_call(
        "chat.postMessage",
        data={"channel": CHANNEL, "text": "form", "blocks": json.dumps([section("from form")])},
    )
    assert answer["message"]["blocks"] == [section("from form")]
    assert slack.messages(CHANNEL)[0].blocks == [section("from form")]
    error = await refused(
        client.api_call("chat.postMessage", data={"channel": CHANNEL, "blocks": "[not json"})
    )
    assert error.response["error"] == "invalid_blocks_format"
    malformed = {"type": "section", "text": {"text": "no type"}}
    error = await refused(
        client.api_call(
            "chat.postMessage", data={"channel": CHANNEL, "blocks": json.dumps([malformed])}
        )
    )
    assert error.response["error"] == "invalid_blocks"
    assert len(slack.messages(CHANNEL)) == 1


async def test_token_as_form_parameter(slack) -> None:
    anonymous = AsyncWebClient(base_url=slack.url)
    answer = await anonymous.api_call("auth.test", data={"token": TOKEN})
    assert answer["user_id"] == slack.bot_user_id


async def test_rate_limit_is_429_with_retry_after(slack, client) -> None:
    slack.fail_next("chat.postMessage", retry_after=7)
    error = await refused(client.chat_postMessage(channel=CHANNEL, text="x"))
    assert error.response.status_code == 429
    assert error.response.headers["Retry-After"] == "7"
    assert error.response["error"] == "ratelimited"
    assert slack.messages(CHANNEL) == []
    await client.chat_postMessage(channel=CHANNEL, text="x")  # the fault was used up
    assert [(c.status, c.error) for c in slack.calls_to("chat.postMessage")] == [
        (429, "ratelimited"),
        (200, None),
    ]


async def test_slack_sdk_retry_handler_retries_through_one_429(slack) -> None:
    client = AsyncWebClient(
        token=TOKEN,
        base_url=slack.url,
        retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=1)],
    )
    slack.fail_next("chat.postMessage", retry_after=0)
    answer = await client.chat_postMessage(channel=CHANNEL, text="after retry")
    assert answer["ok"] is True
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [429, 200]
    assert [m.text for m in slack.messages(CHANNEL)] == ["after retry"]


async def test_injected_error_is_http_200(slack, client) -> None:
    slack.fail_next("users.info", error="fatal_error", times=2)
    for _ in range(2):
        error = await refused(client.users_info(user="U0ALICE"))
        assert (error.response.status_code, error.response["error"]) == (200, "fatal_error")
    assert (await client.users_info(user="U0ALICE"))["ok"] is True


async def test_every_second_call_is_rate_limited_until_cleared(slack, client) -> None:
    slack.fail_every(2, retry_after=0)
    statuses = []
    for _ in range(4):
        try:
            await client.auth_test()
            statuses.append(200)
        except SlackApiError as exc:
            statuses.append(exc.response.status_code)
    assert statuses == [200, 429, 200, 429]
    slack.clear_faults()
    await client.auth_test()
    await client.auth_test()
    assert [c.status for c in slack.calls][-2:] == [200, 200]


async def test_periodic_fault_ends_after_its_period(slack, client) -> None:
    slack.fail_every(1, method="auth.test", for_seconds=0.0)
    assert (await client.auth_test())["ok"] is True


async def test_wrong_or_missing_token(slack) -> None:
    wrong = AsyncWebClient(token="xoxb-wrong", base_url=slack.url)
    error = await refused(wrong.chat_postMessage(channel=CHANNEL, text="x"))
    assert error.response["error"] == "invalid_auth"
    error = await refused(AsyncWebClient(base_url=slack.url).auth_test())
    assert error.response["error"] == "not_authed"
    assert slack.messages(CHANNEL) == []


async def test_unknown_method(client) -> None:
    error = await refused(client.api_call("conversations.history", params={"channel": CHANNEL}))
    assert error.response["error"] == "unknown_method"


async def test_wait_for_calls(slack, client) -> None:
    await client.auth_test()
    assert len(await slack.wait_for_calls("auth.test", timeout=1)) == 1
    with pytest.raises(TimeoutError):
        await slack.wait_for_calls("auth.test", count=2, timeout=0.05)


def test_packaged_spec_matches_the_shared_reference() -> None:
    packaged, source = load_method_spec(PACKAGED_SPEC)
    assert source == PACKAGED_SPEC
    if not SHARED_SPEC.is_file():
        pytest.skip("the shared reference is not next to this checkout")
    shared, _ = load_method_spec(SHARED_SPEC)
    assert {name: shared[name] for name in packaged} == packaged
    assert packaged["chat.update"] == {"token", "channel", "ts"}
