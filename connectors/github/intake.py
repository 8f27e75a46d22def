"""A GitHub webhook delivery becomes a Delivery: verify, dispatch on the event type, parse.

`deployment_protection_rule` / `requested` is GitHub asking "may this job deploy to this
environment?" for a custom deployment protection rule (a GitHub App): it becomes one Event,
answered later through the review-custom-gates endpoint (see `review.py`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from pydantic import ValidationError

from connectors.base import Delivery
from connectors.errors import MalformedPayload
from connectors.events import Event, Risk
from connectors.github.payload import DeploymentProtectionRuleRequested, Envelope
from connectors.github.signature import HubSignature
from connectors.webhook.intake import describe_validation_error, json_object

NAME = "github"
# The outbox job kind that answers GitHub's deployment protection rule.
SYNC_KIND = "github.review"

# GitHub's GUIDs are 36 characters; allow some room, nothing unprintable.
_DELIVERY = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The review-custom-gates path, on api.github.com or under a GHES `/api/v3` prefix.
_CALLBACK_PATH = re.compile(
    r".*/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/actions/runs/(?P<run_id>\d+)"
    r"/deployment_protection_rule/?"
)
MAX_PULL_REQUEST_LINKS = 5

_M = TypeVar("_M", Envelope, DeploymentProtectionRuleRequested)


def receive(body: bytes, headers: Mapping[str, str], *, verifier: HubSignature) -> Delivery:
    """Verify the signature before reading anything, then dispatch on `X-GitHub-Event`."""
    lowered = {key.lower(): value for key, value in headers.items()}
    verifier.verify(body, lowered)
    event_type = lowered.get("x-github-event", "")
    if not event_type:
        raise MalformedPayload("the X-GitHub-Event header is missing")
    delivery = lowered.get("x-github-delivery", "")
    if not _DELIVERY.fullmatch(delivery):
        raise MalformedPayload("the X-GitHub-Delivery header is missing or not a delivery id")
    data = json_object(body)
    if event_type == "ping":
        # GitHub pings a new hook (and on "Redeliver"): it only wants a 2xx back.
        return Delivery(reply={"ok": True, "event": "ping"})
    if event_type != "deployment_protection_rule":
        # Acknowledged without reading further: its shape is not ours to judge.
        return Delivery(ignored=f"GitHub event {event_type!r} is not handled")
    action = _parse(Envelope, data).action
    if action != "requested":
        return Delivery(ignored=f"deployment_protection_rule action {action!r} is not handled")
    payload = _parse(DeploymentProtectionRuleRequested, data)
    return Delivery(events=[deployment_event(payload, delivery_id=f"{NAME}:{delivery}")])


def deployment_event(payload: DeploymentProtectionRuleRequested, *, delivery_id: str) -> Event:
    """The Event for one deployment waiting on this rule, and what the review needs."""
    callback = _CALLBACK_PATH.fullmatch(urlsplit(payload.deployment_callback_url).path)
    if callback is None:
        raise MalformedPayload(
            "deployment_callback_url: not a .../repos/{owner}/{repo}/actions/runs/{run_id}"
            "/deployment_protection_rule URL"
        )
    run_id = int(callback["run_id"])
    repo, deployment, sender = payload.repository, payload.deployment, payload.sender
    owner, name = repo.owner.login, repo.name
    named = f"{unquote(callback['owner'])}/{unquote(callback['repo'])}"
    # Both come from GitHub in one signed payload; differing, there is no telling which run
    # the review should go to. GitHub compares owner and repository names case-insensitively.
    if named.lower() != f"{owner}/{name}".lower():
        raise MalformedPayload(
            f"deployment_callback_url: names {named}, the repository is {owner}/{name}"
        )
    environment = payload.environment
    sha, ref = deployment.sha, deployment.ref
    repo_url = repo.html_url.rstrip("/")
    run_url = f"{repo_url}/actions/runs/{run_id}"
    short_ref = ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
    pull_requests = payload.pull_requests
    # Who triggered the run is the actor: the card shows it as "Requested by".
    context = [
        ("Repository", repo.full_name),
        ("Environment", environment),
        ("Ref", ref),
        ("Commit", sha),
        ("Trigger", payload.event),
        ("Workflow run", str(run_id)),
        ("Deployment", f"{deployment.id} ({deployment.task})"),
        ("Pull requests", ", ".join(f"#{pr.number} {pr.title}".strip() for pr in pull_requests)),
    ]
    links = [
        {"title": "Workflow run", "url": run_url},
        {"title": f"Commit {sha[:7]}", "url": f"{repo_url}/commit/{sha}"},
    ]
    links += [
        {"title": f"Pull request #{pr.number}", "url": pr.html_url}
        for pr in pull_requests[:MAX_PULL_REQUEST_LINKS]
        if pr.html_url
    ]
    summary = (
        deployment.description
        or f"{sender.login} is deploying {short_ref} ({sha[:7]}) to {environment}"
    )
    fields: dict[str, Any] = {
        "source": NAME,
        "kind": "deployment",
        "subject": f"{repo.full_name}/runs/{run_id}/{environment}",
        # A re-run of the same run deploys again under a new deployment id: a new version that
        # supersedes the pending one; GitHub redelivering the same request keeps the same id.
        "version": str(deployment.id),
        "title": _clip(f"Deploy {repo.full_name}@{short_ref} to {environment}", 1000),
        "summary": _clip(summary, 5000),
        "actor": {
            "id": sender.login,
            "name": sender.name or sender.login,
            "email": sender.email or "",
        },
        "risk": Risk.high if deployment.production_environment else Risk.medium,
        "attributes": {
            "repo": repo.full_name,
            "owner": owner,
            "environment": environment,
            "ref": ref,
            "sha": sha,
            "event": payload.event,
            "run_id": run_id,
            "deployment_id": deployment.id,
            "task": deployment.task,
            "production": bool(deployment.production_environment),
            "pull_requests": [pr.number for pr in pull_requests],
        },
        "context": [
            {"label": label, "value": _clip(value, 2000)} for label, value in context if value
        ],
        "links": links,
        "occurred_at": deployment.created_at,
        "delivery_id": delivery_id,
        "received_at": datetime.now(UTC),
        "sync": {
            "callback_url": payload.deployment_callback_url,
            "owner": owner,
            "repo": name,
            "run_id": run_id,
            "environment": environment,
            "installation_id": payload.installation.id,
        },
    }
    try:
        return Event.model_validate(_without_nul(fields))
    except ValidationError as exc:
        # Only payload text reaches these fields (a link GitHub sent that is not http...).
        raise MalformedPayload(describe_validation_error(exc)) from None


def _parse(model: type[_M], data: Any) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MalformedPayload(describe_validation_error(exc)) from None


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _without_nul(value: Any) -> Any:
    # PostgreSQL cannot store U+0000 in text or JSONB; GitHub text (a PR title) may carry it.
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {key: _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value
