"""Hostile input over HTTP, against the running service: Slack payloads that reach the Bolt app
(signed, so they get past the signature) and forged Slack signatures; deeply nested, huge and
many-keyed bodies on every intake route. Never a 500; refusals are clean; nothing changes.

The Slack properties run the app (with the Slack stand-in) in a loop thread of their own,
because hypothesis drives examples synchronously (tests/live.py)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote_plus, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from bot.slack.cards import (
    APPROVE_ACTION,
    DETAILS_ACTION,
    REJECT_ACTION,
    SILENCE_ACTION,
    button_value,
)
from bot.slack.modals import REJECT_CALLBACK, SILENCE_CALLBACK
from storage.models import AuditRecord, EventRecord, Vote
from tests.conftest import reference
from tests.github_support import APP_ID, WEBHOOK_SECRET, app_key_pem, github_signed
from tests.integration import conftest as app_conftest
from tests.integration.conftest import SLACK_USERS, SlackRunning, running_app, slack_app
from tests.live import LoopThread
from tests.slack_support import SIGNING_SECRET, signed, slash_command
from tests.support import event_body, free_port, sign

SLACK = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)
KNOWN_USERS = set(SLACK_USERS) | {"UA1", "UA2"}
# What an HTTP client lets through in a header value: no control characters.
HEADER_CHARACTERS = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")


class Env:
    def __init__(self, loop: LoopThread, slack: SlackRunning, request: dict[str, Any]) -> None:
        self.loop, self.slack, self.request = loop, slack, request

    def post(self, body: str | bytes, headers: dict[str, str]) -> tuple[int, str]:
        async def send() -> tuple[int, str]:
            response = await self.slack.client.post("/slack/events", data=body, headers=headers)
            return response.status, await response.text()

        return self.loop.run(send())

    def count(self, model: Any) -> int:
        async def query() -> int:
            async with self.slack.services.sessions() as session:
                return int(await session.scalar(select(func.count()).select_from(model)) or 0)

        return self.loop.run(query())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    db = tmp_path_factory.mktemp("hostile") / "signoff.db"
    with LoopThread() as loop:
        slack = loop.enter(slack_app(f"sqlite+aiosqlite:///{db}"))

        async def routed() -> dict[str, Any]:
            raw, headers = sign(event_body())
            response = await slack.client.post("/v1/events", data=raw, headers=headers)
            return dict(await response.json())

        request = loop.run(routed())
        assert request["status"] == "pending"
        yield Env(loop, slack, request)


def shape(name: str) -> dict[str, Any]:
    return dict(json.loads(reference("slack", name).read_text()))


BLOCK_ACTIONS = shape("test_block_actions__body.json")
VIEW_SUBMISSION = shape("test_view_submission__body.json")

text = st.text(max_size=40)
slack_ids = st.from_regex(r"[UW][A-Z0-9]{1,10}", fullmatch=True).filter(
    lambda user: user not in KNOWN_USERS
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=10,
)


def assert_clean(status: int, answer: str) -> None:
    assert status < 500, answer
    assert "Traceback" not in answer


@st.composite
def block_actions(draw: st.DrawFn, request_id: str) -> str:
    payload = copy.deepcopy(BLOCK_ACTIONS)
    action = draw(
        st.sampled_from([APPROVE_ACTION, REJECT_ACTION, DETAILS_ACTION, SILENCE_ACTION]) | text
    )
    value = draw(
        st.builds(button_value, st.just(request_id) | text, st.just("1") | text)
        | text
        | json_values.map(json.dumps)
    )
    payload["actions"][0].update(action_id=action, value=value, block_id=draw(text))
    payload["user"] = draw(
        st.fixed_dictionaries({"id": slack_ids, "name": text, "username": text}) | json_values
    )
    payload["container"] = draw(
        st.fixed_dictionaries({"channel_id": text, "message_ts": text}) | json_values
    )
    for key in draw(st.lists(st.sampled_from(sorted(payload)), max_size=3)):
        payload[key] = draw(json_values)  # a field of any shape, where Slack sends an object
    return urlencode({"payload": json.dumps(payload)})


@SLACK
@given(data=st.data())
def test_block_actions_of_any_shape_are_refused_cleanly(env: Env, data) -> None:
    votes = env.count(Vote)
    body = data.draw(block_actions(env.request["request_id"]))
    assert_clean(*env.post(body, signed(body)))
    assert env.count(Vote) == votes  # none of these users may approve


def test_an_action_without_an_action_id_is_refused_cleanly(env: Env) -> None:
    # Found by the test above: Bolt's listener matching indexes `action["action_id"]`.
    votes = env.count(Vote)
    for actions in ([{}], [{"value": "x", "block_id": "b"}]):
        payload = copy.deepcopy(BLOCK_ACTIONS) | {"actions": actions}
        body = urlencode({"payload": json.dumps(payload)})
        status, answer = env.post(body, signed(body))
        assert_clean(status, answer)
        assert status == 400
    assert env.count(Vote) == votes


@SLACK
@given(data=st.data())
def test_view_submissions_of_any_shape_are_refused_cleanly(env: Env, data) -> None:
    votes = env.count(Vote)
    payload = copy.deepcopy(VIEW_SUBMISSION)
    payload["user"] = {"id": data.draw(slack_ids), "name": data.draw(text)}
    view = payload["view"]
    view["callback_id"] = data.draw(st.sampled_from([REJECT_CALLBACK, SILENCE_CALLBACK]) | text)
    view["private_metadata"] = data.draw(
        st.builds(button_value, st.just(env.request["request_id"]), st.just("1"))
        | text
        | json_values.map(json.dumps)
    )
    view["state"] = data.draw(
        st.fixed_dictionaries(
            {"values": st.dictionaries(text, st.dictionaries(text, json_values, max_size=2))}
        )
        | json_values
    )
    for key in data.draw(st.lists(st.sampled_from(sorted(payload)), max_size=2)):
        payload[key] = data.draw(json_values)
    body = urlencode({"payload": json.dumps(payload)})
    assert_clean(*env.post(body, signed(body)))
    assert env.count(Vote) == votes


@SLACK
@given(typed=st.text(max_size=60), user=slack_ids | text, channel=text)
def test_slash_commands_with_any_text_answer_cleanly(env: Env, typed, user, channel) -> None:
    body = slash_command(quote_plus(typed), user=quote_plus(user), channel=quote_plus(channel))
    status, answer = env.post(body, signed(body))
    assert_clean(status, answer)
    assert "<!channel>" not in answer and "<!here>" not in answer


@SLACK
@given(body=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_signed_body_is_answered_cleanly(env: Env, body: bytes) -> None:
    headers = signed(body.decode("utf-8", "replace"))
    # Sign the exact bytes sent (slack_sdk signs text; a non-UTF-8 body cannot be signed).
    try:
        body.decode()
    except UnicodeDecodeError:
        headers = signed("")
    assert_clean(*env.post(body, headers))


@SLACK
@given(
    signature=st.text(HEADER_CHARACTERS, max_size=80),
    timestamp=st.text(HEADER_CHARACTERS, max_size=20) | st.integers(0, 2**40).map(str),
    mutate=st.booleans(),
)
def test_forged_slack_signatures_are_401(env: Env, signature, timestamp, mutate) -> None:
    body = slash_command("pending", user="UA1")
    headers = signed(body)
    if mutate:
        # The real signature with one hex digit changed.
        digest = headers["x-slack-signature"]
        flipped = "0" if digest[-1] != "0" else "1"
        headers["x-slack-signature"] = digest[:-1] + flipped
    else:
        headers.update({"x-slack-signature": signature, "x-slack-request-timestamp": timestamp})
    status, answer = env.post(body, headers)
    assert status == 401, answer


@pytest.mark.parametrize(
    ("body", "error"),
    [
        # Each of these was a 500: Bolt's listener matching indexes `actions[0]`, its request
        # context calls len() on `response_urls`, and it parses the body before verifying it.
        (urlencode({"payload": json.dumps({**BLOCK_ACTIONS, "actions": None})}), "actions"),
        (urlencode({"payload": json.dumps({**VIEW_SUBMISSION, "response_urls": None})}), "null"),
        (urlencode({"payload": json.dumps({**BLOCK_ACTIONS, "user": "U0X1"})}), "user"),
        ("payload=%7Bnot-json", "payload is not JSON"),
        (urlencode({"payload": "[1]"}), "payload is not a JSON object"),
    ],
)
def test_signed_payloads_bolt_cannot_read_are_400(env: Env, body: str, error: str) -> None:
    status, answer = env.post(body, signed(body))
    assert status == 400 and error in json.loads(answer)["error"], answer


def test_unreadable_signature_parts_are_401(env: Env) -> None:
    body = slash_command("pending", user="UA1")
    for timestamp in ("abc", "1e9", "-1", " 1", ""):
        headers = {**signed(body), "x-slack-request-timestamp": timestamp}
        assert env.post(body, headers)[0] == 401, timestamp
    # Bytes that are not UTF-8 cannot be what Slack signed.
    assert env.post(b"payload=\xff\xfe", signed("payload=\ufffd\ufffd"))[0] == 401


def test_a_stale_slack_signature_is_401(env: Env) -> None:
    body = slash_command("pending", user="UA1")
    status, _ = env.post(body, signed(body, timestamp=1_600_000_000))
    assert status == 401
    status, _ = env.post(body, signed(body, secret=SIGNING_SECRET + "x"))
    assert status == 401


# --- deeply nested, huge and many-keyed bodies on every intake route ---------------------------

LIMIT = 256 * 1024
AM_TOKEN = "hostile-am-token-0123456789"


async def _post(app, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    if path == "/v1/events":
        _, headers = sign(body)
    elif path == "/hooks/alertmanager":
        headers = {"Authorization": f"Bearer {AM_TOKEN}", "content-type": "application/json"}
    else:  # signed, so the body itself is what gets refused
        _, headers = github_signed(body)
    response = await app.client.post(path, data=body, headers=headers)
    return response.status, await response.json()


def _nested(depth: int, opening: str = '{"a":', closing: str = "}") -> bytes:
    return (opening * depth + "1" + closing * depth).encode()


@pytest.mark.parametrize("path", ["/v1/events", "/hooks/alertmanager", "/hooks/github"])
async def test_deep_huge_and_wide_bodies_are_400_or_413(db_url: str, path: str) -> None:
    settings_ = app_conftest.test_settings(
        db_url,
        SIGNOFF_MAX_BODY_BYTES=LIMIT,
        ALERTMANAGER_WEBHOOK_TOKEN=AM_TOKEN,
        GITHUB_WEBHOOK_SECRET=WEBHOOK_SECRET,
        GITHUB_API_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens: nothing is sent
        GITHUB_APP_ID=APP_ID,
        GITHUB_APP_PRIVATE_KEY=app_key_pem(),
    )
    async with running_app(settings_) as app:
        # GitHub's payloads are read leniently (unknown fields ignored): many unknown keys and
        # no `action` are a delivery acknowledged and ignored, not a refusal.
        wide = (200, "ignored") if path == "/hooks/github" else (400, "error")
        cases = [
            (_nested(100_000, "[", "]"), (400, "error")),  # 200 KB: past any parser's stack
            (_nested(40_000), (400, "error")),  # 240 KB of {"a":
            (b"[" * LIMIT, (400, "error")),  # exactly at the limit
            (b"[" * (LIMIT + 1), (413, "error")),
            (b" " * (4 * LIMIT), (413, "error")),
            (json.dumps({f"k{i}": i for i in range(15_000)}).encode(), wide),  # many keys
        ]
        for body, (expected, key) in cases:
            status, answer = await _post(app, path, body)
            assert (status, key in answer) == (expected, True), (len(body), answer)
        async with app.services.sessions() as session:
            assert await session.scalar(select(func.count()).select_from(EventRecord)) == 0
            refused = await session.scalar(
                select(func.count())
                .select_from(AuditRecord)
                .where(AuditRecord.kind == "event.refused")
            )
        # Every refusal audited.
        assert refused == sum(1 for _, (status, _) in cases if status >= 400)


async def test_deep_but_parseable_attributes_are_stored_or_refused(db_url: str) -> None:
    """Nesting that JSON parses (under Python's recursion limit) must not break what comes
    after: CEL conversion, redaction, the JSON columns, the audit record."""
    settings_ = app_conftest.test_settings(db_url, SIGNOFF_MAX_BODY_BYTES=LIMIT)
    async with running_app(settings_) as app:
        for depth in (60, 100, 300, 900):
            nested: Any = 1
            for _ in range(depth):
                nested = {"a": nested}
            body = json.dumps(event_body(attributes={"deep": nested})).encode()
            status, answer = await _post(app, "/v1/events", body)
            # Was a 500 from 300 levels on: pydantic would not serialise it at commit time.
            expected = (202, None) if depth < 62 else (400, "body is nested deeper than 64 levels")
            assert (status, answer.get("error")) == expected, (depth, answer)


@pytest.mark.parametrize("path", ["/v1/events", "/hooks/alertmanager"])
async def test_unicode_edge_cases_are_refused_or_stored(db_url: str, path: str) -> None:
    settings_ = app_conftest.test_settings(db_url, ALERTMANAGER_WEBHOOK_TOKEN=AM_TOKEN)
    async with running_app(settings_) as app:
        for title in ["\\u0000", "\\udcff", "\\ud800\\udc00", "\\uffff"]:
            raw = json.dumps(event_body()).replace('"Refund $4,200 to ACME Corp"', f'"x{title}"')
            status, answer = await _post(app, path, raw.encode())
            assert status in (202, 400), (title, answer)
