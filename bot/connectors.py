"""The connector registry: which source systems this deployment talks to, built from settings.

Explicit on purpose: a connector is on when its settings are, and this is the one place that
says so. Each entry maps settings to the connector's constructor; the connector itself never
reads the environment. Adding a connector: see AGENTS.md.
"""

from __future__ import annotations

import httpx

from bot.settings import Settings
from connectors.base import Connector
from connectors.webhook.connector import WebhookConnector


def build_connectors(settings: Settings, http: httpx.AsyncClient) -> dict[str, Connector]:
    """Every configured connector by name. The generic webhook one is always on."""
    assert settings.webhook_secret is not None  # required at start-up
    built: list[Connector] = [
        WebhookConnector(
            secret=settings.webhook_secret.get_secret_value(),
            tolerance_seconds=settings.webhook_tolerance,
            client=http,
            timeout=settings.callback_timeout,
        )
    ]
    return {connector.name: connector for connector in built}
