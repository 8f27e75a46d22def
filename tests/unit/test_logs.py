"""The log formatters: one JSON object per line, the correlation id, secrets masked."""

from __future__ import annotations

import io
import json
import logging

from bot.logs import JsonFormatter, SecretMask, TextFormatter, bound

PEM = (
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n"
    "BKcwggSjAgEAAoIBAQC7\n-----END PRIVATE KEY-----\n"
)


def emit(formatter: logging.Formatter, message: str, *args, **kw) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("signoff.test.logs")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        logger.info(message, *args, **kw)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_json_line_has_the_fields_and_the_bound_correlation_id() -> None:
    with bound("r_abc"):
        out = emit(JsonFormatter(), "hello %s", "world", extra={"job_kind": "webhook.callback"})
    assert out.count("\n") == 1
    line = json.loads(out)
    assert line["message"] == "hello world"
    assert line["level"] == "INFO" and line["logger"] == "signoff.test.logs"
    assert line["correlation_id"] == "r_abc"
    assert line["job_kind"] == "webhook.callback"
    assert line["timestamp"].endswith("+00:00")
    # An explicit id on the line wins over the bound one.
    with bound("r_abc"):
        out = emit(JsonFormatter(), "x", extra={"correlation_id": "r_other"})
    assert json.loads(out)["correlation_id"] == "r_other"
    assert json.loads(emit(JsonFormatter(), "y"))["correlation_id"] is None


def test_configured_secrets_are_masked_everywhere_in_the_line() -> None:
    mask = SecretMask(["plain-api-token-123", PEM])
    try:
        raise ValueError("token plain-api-token-123 rejected")
    except ValueError:
        out = emit(
            JsonFormatter(mask),
            "far side said %s and %s",
            "plain-api-token-123",
            PEM,
            exc_info=True,
            extra={"detail": "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"},
        )
    assert "plain-api-token-123" not in out
    assert "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in out
    line = json.loads(out)
    assert "[redacted]" in line["message"] and "[redacted]" in line["exception"]
    # Credential-looking values are masked without being configured.
    assert "xoxb-1234-abcdef" not in emit(JsonFormatter(mask), "t=%s", "xoxb-1234-abcdef")


def test_text_format_for_people() -> None:
    with bound("r_abc"):
        out = emit(TextFormatter(SecretMask(["s3cr3t-value-000"])), "said s3cr3t-value-000")
    assert "[r_abc]" in out and "INFO signoff.test.logs" in out
    assert "s3cr3t-value-000" not in out


def test_log_format_setting_and_the_secrets_it_masks(tmp_path) -> None:
    import pytest

    from bot.settings import SettingsError, load_settings
    from tests.support import SECRET

    with pytest.raises(SettingsError, match="SIGNOFF_LOG_FORMAT"):
        load_settings(SIGNOFF_LOG_FORMAT="xml")
    assert load_settings().log_format == "json"
    key_file = tmp_path / "app.pem"
    key_file.write_text(PEM)
    settings = load_settings(
        SIGNOFF_LOG_FORMAT="text",
        SIGNOFF_WEBHOOK_SECRET=SECRET,
        SIGNOFF_API_TOKEN="api-token-for-the-test",
        GITHUB_APP_PRIVATE_KEY_FILE=str(key_file),
        GITHUB_APP_PRIVATE_KEY=PEM.replace("\n", "\\n"),
    )
    assert settings.log_format == "text"
    values = settings.secret_values()
    assert {SECRET, SECRET.removeprefix("whsec_"), "api-token-for-the-test", PEM} <= set(values)
    # The key given with `\n` escapes is masked as it is used: with real newlines.
    assert values.count(PEM) == 2
