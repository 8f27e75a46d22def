"""The connector registry: which source systems this deployment talks to, built from settings.

Explicit on purpose: a connector is on when its settings are, and this is the one place that
says so. Each entry maps settings to the connector's constructor; the connector itself never
reads the environment. Adding a connector: see AGENTS.md.
"""

from __future__ import annotations

import httpx

from bot.settings import Settings
from connectors.alertmanager.connector import AlertmanagerConnector
from connectors.base import Connector
from connectors.webhook.connector import WebhookConnector


def build_connectors(settings: Settings, http: httpx.AsyncClient) -> dict[str, Connector]:
    """Every configured connector by name. The generic webhook one is always on."""
    assert settings.webhook_secret is not None  # required at start-up
    secret = settings.webhook_secret.get_secret_value()
    built: list[Connector] = [
        WebhookConnector(
            secret=secret,
            tolerance_seconds=settings.webhook_tolerance,
            client=http,
            timeout=settings.callback_timeout,
        )
    ]
    # Alertmanager: the hook is on with either setting. ALERTMANAGER_URL is what silences are
    # created through; without it alerts still get cards (and remediation callbacks), but no
    # card offers a silence. The token, when set, is required on every delivery.
    token = settings.alertmanager_webhook_token
    if settings.alertmanager_url is not None or token is not None:
        built.append(
            AlertmanagerConnector(
                client=http,
                timeout=settings.callback_timeout,
                callback_secret=secret,
                api_url=settings.alertmanager_url,
                token=token.get_secret_value() if token is not None else None,
            )
        )
    return {connector.name: connector for connector in built}
