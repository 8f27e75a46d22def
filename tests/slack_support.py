"""Signed Slack requests, shaped like the real ones in ../shared/reference/slack/."""

from __future__ import annotations

import copy
import json
import time
from typing import Any
from urllib.parse import urlencode

from slack_sdk.signature import SignatureVerifier

from tests.conftest import reference

SIGNING_SECRET = "test-signing-secret-0123456789abcdef"


def _shape(name: str) -> dict[str, Any]:
    return dict(json.loads(reference("slack", name).read_text()))


def signed(body: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None) -> dict:
    moment = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=moment, body=body)
    return {
        "content-type": "application/x-www-form-urlencoded",
        "x-slack-request-timestamp": moment,
        "x-slack-signature": signature,
    }


def block_action(
    *,
    action_id: str,
    value: str,
    user: str,
    name: str = "",
    channel: str = "C0FINANCE",
    ts: str = "1700000000.000100",
) -> str:
    """A block_actions payload, urlencoded as Slack sends it."""
    payload = copy.deepcopy(_shape("test_block_actions__body.json"))
    payload["user"] = {
        "id": user,
        "username": name or user,
        "name": name or user,
        "team_id": "T111",
    }
    payload["container"] = {
        "type": "message",
        "message_ts": ts,
        "channel_id": channel,
        "is_ephemeral": False,
    }
    payload["channel"] = {"id": channel, "name": "approvals"}
    payload["trigger_id"] = f"{time.time_ns()}.trigger"
    payload["actions"][0].update(action_id=action_id, block_id="signoff", value=value)
    return urlencode({"payload": json.dumps(payload)})


def view_submission(
    *,
    callback_id: str,
    metadata: str,
    reason: str | None,
    user: str,
    values: dict[str, Any] | None = None,
) -> str:
    """A view_submission payload; `values` adds input blocks' states next to the reason's."""
    payload = copy.deepcopy(_shape("test_view_submission__body.json"))
    payload["user"] = {"id": user, "username": user, "name": user, "team_id": "T111"}
    view = payload["view"]
    view["callback_id"] = callback_id
    view["private_metadata"] = metadata
    view["state"] = {
        "values": {
            "reason": {"reason": {"type": "plain_text_input", "value": reason}},
            **(values or {}),
        }
    }
    return urlencode({"payload": json.dumps(payload)})


def slash_command(text: str, *, user: str = "UA1", channel: str = "C0FINANCE") -> str:
    base = reference("slack", "test_slash_command__slash_command_body.txt").read_text().strip()
    fields = dict(pair.split("=", 1) for pair in base.split("&"))
    fields.update(command="%2Fsignoff", text=text, user_id=user, channel_id=channel)
    return "&".join(f"{k}={v}" for k, v in fields.items())
