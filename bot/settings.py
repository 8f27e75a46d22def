"""Settings from the environment and `.env`. Names are part of the operator contract (DESIGN.md).

Only the top layer reads the environment; everything below takes plain arguments.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from bot.schedule import cron_trigger
from connectors.errors import SignoffError

# A Slack user id as Slack writes it (U0CFO, W012A3CDE); checked so a typo such as a display
# name fails at start-up instead of silently letting nobody replay.
_SLACK_USER_ID = re.compile(r"^[UW][A-Z0-9]+$")


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class SettingsError(SignoffError):
    """A setting is missing or invalid; the message is one line naming it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", populate_by_name=False
    )

    database_url: str = Field(
        "sqlite+aiosqlite:///./signoff.db", validation_alias=_env("SIGNOFF_DATABASE_URL")
    )
    policy_path: Path | None = Field(None, validation_alias=_env("SIGNOFF_POLICY_PATH"))
    host: str = Field("127.0.0.1", validation_alias=_env("SIGNOFF_HOST"))
    port: Annotated[int, Field(ge=0, le=65535)] = Field(3000, validation_alias=_env("SIGNOFF_PORT"))

    webhook_secret: SecretStr | None = Field(None, validation_alias=_env("SIGNOFF_WEBHOOK_SECRET"))
    webhook_tolerance: Annotated[int, Field(ge=1, le=3600)] = Field(
        300, validation_alias=_env("SIGNOFF_WEBHOOK_TOLERANCE")
    )
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = Field(
        256 * 1024, validation_alias=_env("SIGNOFF_MAX_BODY_BYTES")
    )
    api_token: SecretStr | None = Field(None, validation_alias=_env("SIGNOFF_API_TOKEN"))

    outbox_max_attempts: Annotated[int, Field(ge=1, le=100)] = Field(
        8, validation_alias=_env("SIGNOFF_OUTBOX_MAX_ATTEMPTS")
    )
    outbox_backoff_base: Annotated[float, Field(gt=0, le=3600)] = Field(
        1.0, validation_alias=_env("SIGNOFF_OUTBOX_BACKOFF_BASE")
    )
    outbox_backoff_max: Annotated[float, Field(gt=0, le=86400)] = Field(
        300.0, validation_alias=_env("SIGNOFF_OUTBOX_BACKOFF_MAX")
    )
    callback_timeout: Annotated[float, Field(gt=0, le=300)] = Field(
        10.0, validation_alias=_env("SIGNOFF_CALLBACK_TIMEOUT")
    )
    shutdown_grace: Annotated[float, Field(ge=0, le=600)] = Field(
        30.0, validation_alias=_env("SIGNOFF_SHUTDOWN_GRACE")
    )
    # Outbox worker processes `serve` runs beside its HTTP process (0: the worker runs inside
    # it). Side effects then never take the interpreter that answers requests.
    worker_processes: Annotated[int, Field(ge=0, le=16)] = Field(
        1, validation_alias=_env("SIGNOFF_WORKER_PROCESSES")
    )
    log_level: str = Field("INFO", validation_alias=_env("SIGNOFF_LOG_LEVEL"))
    # json: one object per line, for a log pipeline; text: for a person at a terminal.
    log_format: Literal["json", "text"] = Field("json", validation_alias=_env("SIGNOFF_LOG_FORMAT"))

    slack_bot_token: SecretStr | None = Field(None, validation_alias=_env("SLACK_BOT_TOKEN"))
    slack_signing_secret: SecretStr | None = Field(
        None, validation_alias=_env("SLACK_SIGNING_SECRET")
    )
    slack_app_token: SecretStr | None = Field(None, validation_alias=_env("SLACK_APP_TOKEN"))
    slack_api_url: str = Field("https://slack.com/api/", validation_alias=_env("SLACK_API_URL"))
    slack_user_map: Path | None = Field(None, validation_alias=_env("SIGNOFF_SLACK_USER_MAP"))
    slack_group_ttl: Annotated[float, Field(ge=0, le=86400)] = Field(
        300.0, validation_alias=_env("SIGNOFF_SLACK_GROUP_TTL")
    )
    # Slack user ids allowed to `/signoff replay`, comma-separated; empty: nobody.
    operators: str = Field("", validation_alias=_env("SIGNOFF_OPERATORS"))

    timer_interval: Annotated[float, Field(ge=0.05, le=3600)] = Field(
        15.0, validation_alias=_env("SIGNOFF_TIMER_INTERVAL")
    )
    digest_cron: str | None = Field(None, validation_alias=_env("SIGNOFF_DIGEST_CRON"))
    digest_timezone: str = Field("UTC", validation_alias=_env("SIGNOFF_DIGEST_TIMEZONE"))
    digest_channels: str | None = Field(None, validation_alias=_env("SIGNOFF_DIGEST_CHANNELS"))
    digest_catchup: Annotated[float, Field(ge=0, le=7 * 86400)] = Field(
        6 * 3600.0, validation_alias=_env("SIGNOFF_DIGEST_CATCHUP")
    )

    github_webhook_secret: SecretStr | None = Field(
        None, validation_alias=_env("GITHUB_WEBHOOK_SECRET")
    )
    github_api_url: str = Field("https://api.github.com", validation_alias=_env("GITHUB_API_URL"))
    github_app_id: str | None = Field(None, validation_alias=_env("GITHUB_APP_ID"))
    github_app_private_key: SecretStr | None = Field(
        None, validation_alias=_env("GITHUB_APP_PRIVATE_KEY")
    )
    # The PEM file GitHub lets you download, instead of its text in GITHUB_APP_PRIVATE_KEY.
    github_app_private_key_file: Path | None = Field(
        None, validation_alias=_env("GITHUB_APP_PRIVATE_KEY_FILE")
    )
    alertmanager_url: str | None = Field(None, validation_alias=_env("ALERTMANAGER_URL"))
    alertmanager_webhook_token: SecretStr | None = Field(
        None, validation_alias=_env("ALERTMANAGER_WEBHOOK_TOKEN")
    )

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @field_validator("worker_processes")
    @classmethod
    def _one_sqlite_worker(cls, value: int, info: ValidationInfo) -> int:
        # Cards are updated in order by one process; on SQLite one writes at a time anyway.
        url = str(info.data.get("database_url", ""))
        if value > 1 and url.startswith("sqlite"):
            raise ValueError("must be 0 or 1 on SQLite (one writer at a time); use PostgreSQL")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _standard_webhooks_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value().removeprefix("whsec_")
        try:
            key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            # Never echo the value: it is a secret.
            raise ValueError(
                "must be `whsec_` followed by base64 (the value is not shown)"
            ) from None
        if len(key) < 16:
            raise ValueError("must decode to at least 16 bytes of key (the value is not shown)")
        return value

    @field_validator("digest_timezone")
    @classmethod
    def _time_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r} (use e.g. UTC, Europe/Paris)") from None
        return value

    @field_validator("digest_cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            cron_trigger(value, "UTC")  # ValueError says what is wrong
        return value

    @property
    def digest_channel_list(self) -> list[str]:
        return [c.strip() for c in (self.digest_channels or "").split(",") if c.strip()]

    @field_validator("github_webhook_secret")
    @classmethod
    def _github_secret_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty secret would make every signature trivially forgeable.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("github_api_url")
    @classmethod
    def _github_api_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL, e.g. https://api.github.com")
        return value.rstrip("/")

    @field_validator("alertmanager_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")) or len(value) > 2000:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("alertmanager_webhook_token")
    @classmethod
    def _long_enough_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().strip()) < 16:
            raise ValueError("must be at least 16 characters (the value is not shown)")
        return value

    @field_validator("operators")
    @classmethod
    def _slack_user_ids(cls, value: str) -> str:
        ids = [part.strip() for part in value.split(",") if part.strip()]
        bad = [part for part in ids if not _SLACK_USER_ID.match(part)]
        if bad:
            raise ValueError(f"must be Slack user ids (U… or W…), comma-separated; not {bad[0]!r}")
        return ",".join(ids)

    @property
    def operator_ids(self) -> frozenset[str]:
        return frozenset(self.operators.split(",")) - {""}

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return upper

    def secret_values(self) -> list[str]:
        """Every configured secret's value, for the log formatter to mask wherever it shows up.
        The App key file is read here too: its text is as secret as the inline key."""
        values = [
            value.get_secret_value()
            for value in (
                self.webhook_secret,
                self.api_token,
                self.slack_bot_token,
                self.slack_signing_secret,
                self.slack_app_token,
                self.github_webhook_secret,
                self.github_app_private_key,
                self.alertmanager_webhook_token,
            )
            if value is not None
        ]
        if self.webhook_secret is not None:
            # Its key's base64 without the `whsec_` prefix is the secret too.
            values.append(self.webhook_secret.get_secret_value().removeprefix("whsec_"))
        if self.github_app_private_key is not None:
            # Given with `\\n` escapes, it is used (and could be printed) with real newlines.
            values.append(self.github_app_private_key.get_secret_value().replace("\\n", "\n"))
        if self.github_app_private_key_file is not None:
            with contextlib.suppress(OSError):  # unreadable: start-up says so, not the logger
                values.append(self.github_app_private_key_file.read_text())
        return [value for value in values if value]

    def require(self, *names: str, purpose: str) -> None:
        """Fail with one clear line if a setting that `purpose` needs is not set."""
        for name in names:
            if getattr(self, name) is None:
                raise SettingsError(f"{_env_name(name)} is required for {purpose} but is not set")


def _env_name(field_name: str) -> str:
    alias = Settings.model_fields[field_name].validation_alias
    return str(alias.choices[0]) if isinstance(alias, AliasChoices) else field_name


def load_settings(**overrides: object) -> Settings:
    """Read settings; any problem becomes a SettingsError whose message names the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        error = exc.errors()[0]
        field_name = str(error["loc"][0]) if error["loc"] else "?"
        name = _env_name(field_name) if field_name in Settings.model_fields else field_name
        message = error["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise SettingsError(f"invalid setting {name}: {message}{more}") from None
