"""The GitHub connector is on with GITHUB_WEBHOOK_SECRET, and then needs the App's id and key:
every missing or bad value stops start-up with one line that never shows a secret."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.connectors import build_connectors
from bot.settings import SettingsError, load_settings
from connectors.outbound import Outbound
from tests.github_support import APP_ID, WEBHOOK_SECRET, app_key_pem
from tests.support import SECRET


@pytest.fixture
async def http() -> AsyncIterator[Outbound]:
    async with Outbound() as client:
        yield client


def settings(**github: object):
    return load_settings(SIGNOFF_WEBHOOK_SECRET=SECRET, **github)


async def test_off_without_the_webhook_secret(http) -> None:
    assert set(build_connectors(settings(), http)) == {"webhook"}


async def test_on_with_secret_app_id_and_key(http) -> None:
    built = build_connectors(
        settings(
            GITHUB_WEBHOOK_SECRET=WEBHOOK_SECRET,
            GITHUB_APP_ID=APP_ID,
            GITHUB_APP_PRIVATE_KEY=app_key_pem(),
        ),
        http,
    )
    assert built["github"].sync_kind == "github.review"


async def test_key_from_a_file_or_with_escaped_newlines(http, tmp_path: Path) -> None:
    key_file = tmp_path / "app.pem"
    key_file.write_text(app_key_pem())
    from_file = settings(
        GITHUB_WEBHOOK_SECRET=WEBHOOK_SECRET,
        GITHUB_APP_ID=APP_ID,
        GITHUB_APP_PRIVATE_KEY_FILE=str(key_file),
    )
    escaped = settings(
        GITHUB_WEBHOOK_SECRET=WEBHOOK_SECRET,
        GITHUB_APP_ID=APP_ID,
        GITHUB_APP_PRIVATE_KEY=app_key_pem().replace("\n", "\\n"),
    )
    assert "github" in build_connectors(from_file, http)
    assert "github" in build_connectors(escaped, http)


@pytest.mark.parametrize(
    ("github", "message"),
    [
        (
            {"GITHUB_APP_PRIVATE_KEY": "x"},
            "^GITHUB_APP_ID is required for answering GitHub deployment protection rules",
        ),
        (
            {"GITHUB_APP_ID": APP_ID},
            "^GITHUB_APP_PRIVATE_KEY or GITHUB_APP_PRIVATE_KEY_FILE is required",
        ),
        (
            {"GITHUB_APP_ID": APP_ID, "GITHUB_APP_PRIVATE_KEY": "s3cr3t-not-a-key"},
            r"^invalid setting GITHUB_APP_PRIVATE_KEY: not a PEM .*\(the value is not shown\)$",
        ),
        (
            {"GITHUB_APP_ID": APP_ID, "GITHUB_APP_PRIVATE_KEY_FILE": "/nonexistent/app.pem"},
            "^GITHUB_APP_PRIVATE_KEY_FILE /nonexistent/app.pem: cannot read it",
        ),
        (
            {
                "GITHUB_APP_ID": APP_ID,
                "GITHUB_APP_PRIVATE_KEY": "x",
                "GITHUB_APP_PRIVATE_KEY_FILE": "/x.pem",
            },
            "not both",
        ),
    ],
)
async def test_one_line_errors(http, github: dict[str, str], message: str) -> None:
    configured = settings(GITHUB_WEBHOOK_SECRET=WEBHOOK_SECRET, **github)
    with pytest.raises(SettingsError, match=message) as caught:
        build_connectors(configured, http)
    text = str(caught.value)
    assert "\n" not in text and "s3cr3t" not in text and WEBHOOK_SECRET not in text


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GITHUB_WEBHOOK_SECRET", "  ", "invalid setting GITHUB_WEBHOOK_SECRET: must not be empty"),
        ("GITHUB_API_URL", "api.github.com", "invalid setting GITHUB_API_URL: must be an http"),
    ],
)
def test_bad_values_fail_at_load(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        settings(**{name: value})
