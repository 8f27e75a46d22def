"""The connector registry: which source systems this deployment talks to, built from settings.

Explicit on purpose: a connector is on when its settings are, and this is the one place that
says so. Each entry maps settings to the connector's constructor; the connector itself never
reads the environment. Adding a connector: see AGENTS.md.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from bot.settings import Settings, SettingsError
from connectors.alertmanager.connector import AlertmanagerConnector
from connectors.base import Connector
from connectors.github.app_auth import load_private_key
from connectors.github.connector import GitHubConnector
from connectors.outbound import Outbound
from connectors.webhook.connector import WebhookConnector


def build_connectors(settings: Settings, http: Outbound) -> dict[str, Connector]:
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
    if settings.github_webhook_secret is not None:
        built.append(_github(settings, http))
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


def _github(settings: Settings, http: Outbound) -> GitHubConnector:
    """On with GITHUB_WEBHOOK_SECRET. The App credentials are required with it: a deployment
    protection rule nobody answers holds the deployment until GitHub times the job out."""
    purpose = "answering GitHub deployment protection rules"
    settings.require("github_app_id", purpose=purpose)
    assert settings.github_webhook_secret is not None and settings.github_app_id is not None
    return GitHubConnector(
        webhook_secret=settings.github_webhook_secret.get_secret_value(),
        api_url=settings.github_api_url,
        app_id=settings.github_app_id,
        private_key=_github_private_key(settings, purpose),
        client=http,
        timeout=settings.callback_timeout,
    )


def _github_private_key(settings: Settings, purpose: str) -> RSAPrivateKey:
    inline, path = settings.github_app_private_key, settings.github_app_private_key_file
    if inline is not None and path is not None:
        raise SettingsError("set GITHUB_APP_PRIVATE_KEY or GITHUB_APP_PRIVATE_KEY_FILE, not both")
    if inline is not None:
        name = "GITHUB_APP_PRIVATE_KEY"
        # Environments that cannot hold newlines carry the PEM with literal `\n`s.
        pem = inline.get_secret_value().replace("\\n", "\n")
    elif path is not None:
        name = f"GITHUB_APP_PRIVATE_KEY_FILE {path}"
        try:
            pem = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{name}: cannot read it ({type(exc).__name__})") from None
    else:
        raise SettingsError(
            f"GITHUB_APP_PRIVATE_KEY or GITHUB_APP_PRIVATE_KEY_FILE is required for {purpose} "
            "but neither is set"
        )
    try:
        return load_private_key(pem)
    except ValueError as exc:
        raise SettingsError(f"invalid setting {name}: {exc} (the value is not shown)") from None
