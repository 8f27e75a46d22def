"""manifest.yml installs the app as Signoff uses it: the scopes its calls need and no more."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
# Every Web API method Signoff calls, and the bot scope Slack requires for it.
METHOD_SCOPES = {
    "auth.test": None,
    "chat.postMessage": "chat:write",
    "chat.update": "chat:write",
    "chat.postEphemeral": "chat:write",
    "views.open": None,
    "conversations.open": "im:write",
    "usergroups.list": "usergroups:read",
    "usergroups.users.list": "usergroups:read",
    "users.info": "users:read",
    "users.lookupByEmail": "users:read.email",
}


def manifest() -> dict:
    return dict(yaml.safe_load((ROOT / "manifest.yml").read_text()))


def called_methods() -> set[str]:
    """Methods the bot's code calls, found in its source (api_call names and client methods)."""
    files = [p for p in (ROOT / "bot").rglob("*.py") if "standin" not in p.name]
    source = "\n".join(p.read_text() for p in files)
    named = set(re.findall(r'call\(\s*"([a-z]+\.[A-Za-z.]+)"', source))
    snake = {
        "chat_postEphemeral": "chat.postEphemeral",
        "views_open": "views.open",
        "usergroups_users_list": "usergroups.users.list",
        "usergroups_list": "usergroups.list",
        "users_lookupByEmail": "users.lookupByEmail",
        "users_info": "users.info",
    }
    named |= {method for attr, method in snake.items() if f".{attr}(" in source}
    return named


def test_scopes_are_exactly_what_the_calls_need() -> None:
    calls = called_methods()
    assert calls, "found no Slack calls in bot/"
    unknown = calls - METHOD_SCOPES.keys()
    assert not unknown, f"add the scope for {unknown} to METHOD_SCOPES and manifest.yml"
    needed = {METHOD_SCOPES[m] for m in calls if METHOD_SCOPES[m]} | {"commands"}
    needed |= {"users:read"}  # users:read.email requires users:read alongside it
    assert set(manifest()["oauth_config"]["scopes"]["bot"]) == needed


def test_one_request_url_and_the_slash_command() -> None:
    data = manifest()
    urls = [
        data["settings"]["interactivity"]["request_url"],
        data["settings"]["event_subscriptions"]["request_url"],
        *(c["url"] for c in data["features"]["slash_commands"]),
    ]
    assert all(url.endswith("/slack/events") for url in urls)
    assert [c["command"] for c in data["features"]["slash_commands"]] == ["/signoff"]
    assert data["settings"]["interactivity"]["is_enabled"] is True
    assert "REPLACE" in (ROOT / "manifest.yml").read_text()
