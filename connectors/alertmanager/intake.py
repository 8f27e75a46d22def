"""A webhook notification becomes one Event per firing alert and one Cancellation per resolved
alert, after the bearer token (if one is configured) is checked."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import AnyHttpUrl, TypeAdapter, ValidationError

from connectors.alertmanager.payload import VERSION, Alert, Notification, parse_time
from connectors.base import Cancellation, Delivery
from connectors.errors import MalformedPayload, SignatureError
from connectors.events import ContextField, Event, Link, Risk
from connectors.webhook.intake import describe_validation_error, json_object, refuse_nul

NAME = "alertmanager"
KIND = "alert"
# An annotation naming a URL to call (signed, like the generic callback) when the alert's
# request is approved: the hook that runs the remediation.
REMEDIATION_ANNOTATION = "signoff_remediation_url"
# Annotations shown as the card's title and summary, in order of preference.
TITLE_ANNOTATIONS = ("summary", "title", "message")
SUMMARY_ANNOTATIONS = ("description", "info", "message")
# Alertmanager's own severity words are free text; these are the common ones.
_RISK = {
    "critical": Risk.critical,
    "page": Risk.critical,
    "fatal": Risk.critical,
    "emergency": Risk.critical,
    "error": Risk.high,
    "high": Risk.high,
    "major": Risk.high,
    "warning": Risk.medium,
    "warn": Risk.medium,
    "medium": Risk.medium,
    "minor": Risk.low,
    "low": Risk.low,
    "info": Risk.low,
    "none": Risk.low,
}
MAX_CONTEXT = 50
# ContextField's limit; annotations (a long description) may be longer and are cut, not refused.
CONTEXT_VALUE_MAX = 2000
MAX_LINKS = 20

_URL = TypeAdapter(AnyHttpUrl)


def check_token(headers: Mapping[str, str], token: str | None) -> None:
    """With a token configured, `Authorization: Bearer <token>` is required (Alertmanager's
    `http_config.authorization` sends it). Constant-time; the token is never echoed."""
    if token is None:
        return
    given = headers.get("Authorization", "")
    scheme, _, credentials = given.partition(" ")
    if not given:
        raise SignatureError("missing Authorization: Bearer token")
    if scheme.lower() != "bearer" or not credentials:
        raise SignatureError("Authorization is not a Bearer token")
    if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
        raise SignatureError("wrong bearer token")


def parse(body: bytes) -> Notification:
    """Raise MalformedPayload naming the field; the version is checked before anything else, so
    a future format is refused for being one, not for a field it moved."""
    data = refuse_nul(json_object(body), body)
    version = data.get("version")
    if version != VERSION:
        raise MalformedPayload(
            f"version: only Alertmanager webhook version {VERSION} is supported, got {version!r}"
        )
    try:
        return Notification.model_validate(data)
    except ValidationError as exc:
        raise MalformedPayload(describe_validation_error(exc)) from None


def receive(
    body: bytes, headers: Mapping[str, str], *, token: str | None, silences: bool
) -> Delivery:
    """`silences`: Signoff can create silences (ALERTMANAGER_URL is set), so the events carry
    the labels to match and the card offers "Silence…"."""
    check_token(headers, token)
    notification = parse(body)
    if not notification.alerts:
        return Delivery(ignored="a notification without alerts")
    events: list[Event] = []
    cancellations: list[Cancellation] = []
    now = datetime.now(UTC)
    for alert in notification.alerts:
        if alert.status == "resolved":
            cancellations.append(_cancellation(alert))
        else:
            events.append(_event(alert, notification, silences=silences, now=now))
    return Delivery(events=events, cancellations=cancellations)


def _occurrence(alert: Alert) -> str:
    # Alertmanager resends a firing alert every repeat_interval and on every group change; the
    # same fingerprint and startsAt is the same occurrence, so its repeats deduplicate.
    return f"{NAME}:{alert.fingerprint}:{alert.starts_at}"


def _cancellation(alert: Alert) -> Cancellation:
    ended = _when(alert.ends_at)
    return Cancellation(
        source=NAME,
        subject=alert.fingerprint,
        reason=f"alert resolved at {ended}" if ended else "alert resolved",
        delivery_id=f"{_occurrence(alert)}:resolved",
    )


def _when(value: str) -> str:
    try:
        moment = parse_time(value)
    except ValidationError:
        return ""
    if moment.year < 2:  # Go's zero time: not set
        return ""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _event(alert: Alert, notification: Notification, *, silences: bool, now: datetime) -> Event:
    labels, annotations = alert.labels, alert.annotations
    alertname = labels.get("alertname", "") or "alert"
    headline = _first(annotations, TITLE_ANNOTATIONS)
    title = f"{alertname}: {headline}" if headline else alertname
    summary = _first(annotations, SUMMARY_ANNOTATIONS, skip=headline)
    severity = labels.get("severity", "")
    try:
        occurred_at: datetime | None = parse_time(alert.starts_at)
    except ValidationError:
        raise MalformedPayload(
            f"alerts: startsAt {alert.starts_at[:40]!r} is not an RFC 3339 time"
        ) from None

    links, url_annotations = _links(alert, notification)
    shown = set(TITLE_ANNOTATIONS) | set(SUMMARY_ANNOTATIONS) | url_annotations
    context = [ContextField(label="Started", value=_when(alert.starts_at) or alert.starts_at)]
    context += [
        ContextField(label=name, value=value[:CONTEXT_VALUE_MAX])
        for name, value in sorted(labels.items())
    ]
    context += [
        ContextField(label=name, value=value[:CONTEXT_VALUE_MAX])
        for name, value in sorted(annotations.items())
        if name not in shown and name != REMEDIATION_ANNOTATION
    ]
    attributes: dict[str, Any] = {
        "alertname": alertname,
        "severity": severity,
        "labels": dict(labels),
        # Not the remediation URL: it may carry a credential, and only the sync-back needs it.
        "annotations": {k: v for k, v in annotations.items() if k != REMEDIATION_ANNOTATION},
        "fingerprint": alert.fingerprint,
        "receiver": notification.receiver,
        "group_labels": dict(notification.group_labels),
    }
    # What the sync-back needs: the labels (a silence's matchers, the remediation call's
    # context), whether a silence may be offered, and where to call for remediation. Empty when
    # there is nothing to send back, so approving queues no job.
    sync: dict[str, Any] = {}
    if silences:
        sync["silence"] = True
    remediation = _http_url(annotations.get(REMEDIATION_ANNOTATION, ""))
    if remediation:
        sync["remediation_url"] = remediation
    if sync:
        sync["labels"] = dict(labels)
    try:
        return Event(
            source=NAME,
            kind=KIND,
            subject=alert.fingerprint,
            version=alert.starts_at,
            title=title[:1000],
            summary=summary[:5000],
            risk=_RISK.get(severity.strip().lower(), Risk.medium),
            attributes=attributes,
            context=context[:MAX_CONTEXT],
            links=links[:MAX_LINKS],
            occurred_at=occurred_at,
            delivery_id=_occurrence(alert),
            received_at=now,
            sync=sync,
        )
    except ValidationError as exc:
        raise MalformedPayload(describe_validation_error(exc)) from None


def _first(values: Mapping[str, str], names: tuple[str, ...], *, skip: str = "") -> str:
    for name in names:
        value = " ".join(values.get(name, "").split())
        if value and value != skip:
            return value
    return ""


def _http_url(value: str) -> str:
    value = value.strip()
    if not value.startswith(("http://", "https://")):
        return ""
    try:
        return str(_URL.validate_python(value))
    except ValidationError:
        return ""


def _links(alert: Alert, notification: Notification) -> tuple[list[Link], set[str]]:
    """The alert's source (Prometheus' graph), Alertmanager itself, and every annotation whose
    value is a web URL (runbook_url, dashboard...). Anything that is not http(s) is left out,
    so an annotation cannot put a `javascript:` link on a card."""
    links: list[Link] = []
    url_annotations: set[str] = set()
    source = _http_url(alert.generator_url)
    if source:
        links.append(Link(title="Source", url=source))
    for name, value in sorted(alert.annotations.items()):
        url = _http_url(value)
        if url and name != REMEDIATION_ANNOTATION:
            url_annotations.add(name)
            links.append(Link(title=name, url=url))
    external = _http_url(notification.external_url)
    if external:
        links.append(Link(title="Alertmanager", url=external))
    return links, url_annotations
