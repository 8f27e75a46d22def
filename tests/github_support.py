"""GitHub test helpers: a throwaway App key, signed deliveries, the fixture payloads, and the
running app wired to the GitHub API stand-in."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from connectors.github.standin import GitHubStandIn
from tests.conftest import reference

WEBHOOK_SECRET = "github-webhook-secret-for-tests"
APP_ID = "358923"
INSTALLATION = 35490125  # the fixture's installation id
FIXTURES = Path(__file__).resolve().parents[1] / "connectors" / "github" / "fixtures"
POLICY = Path(__file__).resolve().parent / "fixtures" / "github_policy.yaml"


@functools.cache
def app_key() -> rsa.RSAPrivateKey:
    """Generated per test run: no private key is ever committed."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def app_key_pem() -> str:
    return (
        app_key()
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


def deployment_payload(
    *,
    environment: str = "production",
    run_id: int = 5453085689,
    deployment_id: int = 1039846015,
    repo: str | None = None,
    api_url: str = "https://api.github.com",
) -> dict[str, Any]:
    """The fixture, for another environment, run or repository."""
    payload = copy.deepcopy(fixture("deployment_protection_rule.requested.json"))
    if repo is not None:
        owner, name = repo.split("/")
        payload["repository"].update(full_name=repo, name=name)
        payload["repository"]["owner"]["login"] = owner
        payload["repository"]["html_url"] = f"https://github.com/{repo}"
    full = payload["repository"]["full_name"]
    payload["environment"] = environment
    payload["deployment"].update(id=deployment_id, environment=environment)
    payload["deployment_callback_url"] = (
        f"{api_url}/repos/{full}/actions/runs/{run_id}/deployment_protection_rule"
    )
    return payload


def github_signed(
    payload: dict[str, Any] | bytes,
    *,
    event: str = "deployment_protection_rule",
    delivery: str | None = None,
    secret: str = WEBHOOK_SECRET,
) -> tuple[bytes, dict[str, str]]:
    """The body and the headers GitHub sends with it."""
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    digest = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return raw, {
        "content-type": "application/json",
        "User-Agent": "GitHub-Hookshot/a1b2c3d",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "423885699",
        "X-Hub-Signature-256": f"sha256={digest}",
    }


@contextlib.asynccontextmanager
async def github_standin(token_ttl: timedelta = timedelta(hours=1)) -> AsyncIterator[GitHubStandIn]:
    standin = GitHubStandIn(
        app_id=APP_ID,
        public_key=app_key().public_key(),
        installations={INSTALLATION},
        token_ttl=token_ttl,
    )
    await standin.start()
    try:
        yield standin
    finally:
        await standin.stop()


def github_settings(standin: GitHubStandIn) -> dict[str, object]:
    return {
        "GITHUB_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "GITHUB_API_URL": standin.url,
        "GITHUB_APP_ID": APP_ID,
        "GITHUB_APP_PRIVATE_KEY": app_key_pem(),
        # GitHub's payloads carry whole repository objects: ~45 KiB for the fixture.
        "SIGNOFF_MAX_BODY_BYTES": 256 * 1024,
    }


def review_schema() -> dict[str, Any]:
    """The review call's request body schema, as the vendored spec states it (`anyOf` of
    comment-required and state-required)."""
    spec = json.loads(reference("github", "gh_review_custom_gates_for_run.json").read_text())
    body = spec["requestBody"]["content"]["application/json"]["schema"]
    return {"anyOf": [spec["schemas"][ref["$ref"].rsplit("/", 1)[1]] for ref in body["anyOf"]]}
