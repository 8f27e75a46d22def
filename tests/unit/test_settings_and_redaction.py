"""Settings fail with one line naming the variable; secrets never survive redaction."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bot.settings import SettingsError, load_settings
from connectors.redaction import MASK, may_hold_secret, redact, redact_text, redact_url

GOOD_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in (
        "SIGNOFF_PORT",
        "SIGNOFF_DATABASE_URL",
        "SIGNOFF_WEBHOOK_SECRET",
        "ALERTMANAGER_URL",
        "ALERTMANAGER_WEBHOOK_TOKEN",
        "SIGNOFF_OPERATORS",
    ):
        monkeypatch.delenv(name, raising=False)


def test_defaults_follow_the_contract() -> None:
    settings = load_settings()
    assert settings.database_url == "sqlite+aiosqlite:///./signoff.db"
    assert (settings.host, settings.port) == ("127.0.0.1", 3000)
    assert settings.max_body_bytes == 256 * 1024


def test_reads_dotenv(tmp_path) -> None:
    (tmp_path / ".env").write_text("SIGNOFF_PORT=4123\n")
    assert load_settings().port == 4123


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("SIGNOFF_PORT", "eighty", "invalid setting SIGNOFF_PORT: Input should be a valid integer"),
        ("SIGNOFF_PORT", "70000", "invalid setting SIGNOFF_PORT:"),
        ("SIGNOFF_DATABASE_URL", "mysql://db", "invalid setting SIGNOFF_DATABASE_URL: must start"),
        ("SIGNOFF_WEBHOOK_SECRET", "whsec_!!notbase64!!", "invalid setting SIGNOFF_WEBHOOK_SECRET"),
        (
            "SIGNOFF_WEBHOOK_SECRET",
            "whsec_c2hvcnQ=",
            "invalid setting SIGNOFF_WEBHOOK_SECRET: must decode to at least 16 bytes",
        ),
        ("SIGNOFF_LOG_LEVEL", "LOUD", "invalid setting SIGNOFF_LOG_LEVEL"),
        ("ALERTMANAGER_URL", "alertmanager:9093", "invalid setting ALERTMANAGER_URL"),
        (
            "ALERTMANAGER_WEBHOOK_TOKEN",
            "short-SECRET",
            "invalid setting ALERTMANAGER_WEBHOOK_TOKEN",
        ),
        (
            "SIGNOFF_OPERATORS",
            "U0OPS, @dana",
            "invalid setting SIGNOFF_OPERATORS: must be Slack user ids (U… or W…), comma-separated;"
            " not '@dana'",
        ),
    ],
)
def test_invalid_setting_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message
    if "SECRET" in name or "TOKEN" in name:
        assert value not in message, "a secret's value must never be echoed"


def test_operators_are_a_set_of_slack_user_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().operator_ids == frozenset(), "empty: nobody may replay from Slack"
    monkeypatch.setenv("SIGNOFF_OPERATORS", " U0OPS,W0LEAD , ")
    assert load_settings().operator_ids == {"U0OPS", "W0LEAD"}


def test_required_setting_is_named() -> None:
    with pytest.raises(SettingsError, match="SIGNOFF_WEBHOOK_SECRET is required for intake"):
        load_settings().require("webhook_secret", purpose="intake")


def test_secret_settings_do_not_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNOFF_WEBHOOK_SECRET", GOOD_SECRET)
    settings = load_settings()
    assert GOOD_SECRET not in repr(settings)
    assert GOOD_SECRET not in str(settings.model_dump())


def test_redacts_by_key_and_by_shape() -> None:
    data = {
        "password": "hunter2",
        "nested": {"API_KEY": "abc", "tokens_used": 5, "fine": "ok"},
        "list": ["xoxb-123456-abcdef", "plain"],
        "url": "https://user:pw@example.com/x?token=abc&page=2",
        "pem": "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----",
    }
    masked = redact(data)
    assert masked["password"] == MASK
    assert masked["nested"] == {"API_KEY": MASK, "tokens_used": 5, "fine": "ok"}
    assert masked["list"] == [MASK, "plain"]
    assert "pw@" not in masked["url"] and "token=abc" not in masked["url"]
    assert "page=2" in masked["url"]
    assert masked["pem"] == MASK
    assert data["password"] == "hunter2", "the input is not modified"


def test_redact_text_and_url() -> None:
    assert redact_text("Authorization: Bearer abcdefghijklmnop") == f"Authorization: {MASK}"
    assert redact_text("secret whsec_MfKQ9r8GKYqrTwjUPD8I") == f"secret {MASK}"
    url = redact_url("http://u:p@127.0.0.1:9000/cb?sig=abc&x=1")
    assert url == f"http://{MASK}@127.0.0.1:9000/cb?sig={MASK}&x={MASK}"


@pytest.mark.parametrize(
    ("env", "on", "silences"),
    [
        ({}, False, False),
        ({"ALERTMANAGER_URL": "http://127.0.0.1:9093"}, True, True),
        ({"ALERTMANAGER_WEBHOOK_TOKEN": "t" * 16}, True, False),
    ],
)
async def test_alertmanager_is_on_with_either_setting(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], on: bool, silences: bool
) -> None:
    from bot.connectors import build_connectors
    from connectors.outbound import Outbound

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(SIGNOFF_WEBHOOK_SECRET=GOOD_SECRET)
    async with Outbound() as client:
        connectors = build_connectors(settings, client)
        assert ("alertmanager" in connectors) is on
        if on:
            firing = (
                Path(__file__).resolve().parents[2] / "connectors/alertmanager/fixtures/firing.json"
            ).read_bytes()
            headers = {"Authorization": f"Bearer {'t' * 16}"}
            delivery = await connectors["alertmanager"].receive(body=firing, headers=headers)
            assert ("silence" in delivery.events[0].sync) is silences


@pytest.mark.parametrize(
    "data",
    [
        {"headers": {"Authorization": "Basic abc"}},
        {"a": [{"b": "token xoxb-1234567890-abcdef"}]},
        {"url": "https://user:hunter2@example.com/x"},
        {"url": "https://example.com/cb?access_token=abc123"},
        {"note": "use Bearer\nabcdefghijk please"},
        {"k": "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"},
        {"client_secret": "s3cr3t"},
        {"nested": {"deeper": {"ghp": "ghp_" + "a" * 30}}},
    ],
)
def test_documents_with_secrets_are_walked(data: dict) -> None:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert may_hold_secret(text)
    assert redact(data) != data  # and the walk does mask something


def test_documents_the_fast_path_skips_are_unchanged_by_redact() -> None:
    """The document-level check must never skip what `redact` would mask: random documents
    built from harmless and dangerous pieces agree with the walk, both ways."""
    rng = random.Random(11)
    pieces = [
        "Refund $4,200",
        "https://dashboard.example.com/re_123",
        "http://127.0.0.1:9/cb",
        "ACME Corp",
        "dana@example.com",
        "a?b",
        "x&y",
        "xoxb-123456-abcdef",
        "whsec_abcdefghij",
        "https://u:p@h/x",
        "https://h/x?sig=abc",
        "Bearer abcdefghij",
        "tokens",
        42,
        3.5,
        None,
    ]
    keys = ["title", "summary", "amount", "links", "password", "tokens_used", "api_key", "x"]

    def build(depth: int) -> object:
        roll = rng.random()
        if depth > 2 or roll < 0.4:
            return rng.choice(pieces)
        if roll < 0.7:
            return [build(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(keys): build(depth + 1) for _ in range(rng.randint(0, 3))}

    for _ in range(2000):
        data = {"event": build(0)}
        text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        if not may_hold_secret(text):
            assert redact(data) == data, text
