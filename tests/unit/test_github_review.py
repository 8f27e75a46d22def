"""The review GitHub gets back: where it goes, what it says, and the App token behind it,
against the GitHub API stand-in (a real local server that verifies the App's JWT)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import jwt
import pytest

from connectors.base import FinalDecision, Voter
from connectors.errors import RetryableSyncError, TerminalSyncError
from connectors.github.app_auth import AppAuth, load_private_key
from connectors.github.connector import GitHubConnector
from connectors.github.review import comment, review_body, review_url
from connectors.github.standin import GitHubStandIn
from connectors.outbound import Outbound
from tests.github_support import (
    APP_ID,
    INSTALLATION,
    WEBHOOK_SECRET,
    app_key,
    app_key_pem,
    github_standin,
    review_schema,
)

SYNC = {
    "callback_url": "https://api.github.com/repos/octo-org/api/actions/runs/42/deployment_protection_rule",
    "owner": "octo-org",
    "repo": "api",
    "run_id": 42,
    "environment": "production",
    "installation_id": INSTALLATION,
}


def decision(
    status: str = "approved", *, sync: dict[str, Any] | None = None, **kw
) -> FinalDecision:
    fields: dict[str, Any] = {
        "request_id": "r_abc",
        "subject": "octo-org/api/runs/42/production",
        "version": "7",
        "status": status,
        "decided_by": [{"id": "UA1", "name": "Ana Lead"}, {"id": "UA2", "name": "Bo Lead"}],
        "reason": "looks good",
        "decided_at": datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
        "event": {"sync": SYNC if sync is None else sync},
        "votes": [Voter(id="UA1", name="Ana Lead", choice="approve")],
        "idempotency_key": "sync-r_abc",
    }
    fields.update(kw)
    return FinalDecision(**fields)


# --- where the review goes -------------------------------------------------------------------


def test_githubs_callback_url_is_used_on_the_api_host() -> None:
    assert review_url("https://api.github.com", SYNC) == SYNC["callback_url"]
    ghes = {
        **SYNC,
        "callback_url": "https://ghe.example.com/api/v3/repos/o/r/actions/runs/1/deployment_protection_rule",
    }
    assert review_url("https://ghe.example.com/api/v3", ghes) == ghes["callback_url"]


@pytest.mark.parametrize(
    "callback",
    [
        "https://evil.example/repos/octo-org/api/actions/runs/42/deployment_protection_rule",
        "https://api.github.com.evil.example/repos/octo-org/api/actions/runs/42/deployment_protection_rule",
        "http://api.github.com/repos/octo-org/api/actions/runs/42/deployment_protection_rule",
        "https://api.github.com:8443/repos/octo-org/api/actions/runs/42/deployment_protection_rule",
        "https://user@api.github.com/repos/octo-org/api/actions/runs/42/deployment_protection_rule",
        "https://api.github.com/elsewhere/actions/runs/42/deployment_protection_rule",
        "",
    ],
)
def test_a_callback_elsewhere_is_never_used(callback: str) -> None:
    # The installation token goes wherever the URL points: only our API host may get it.
    built = review_url("https://api.github.com/", {**SYNC, "callback_url": callback})
    assert built == SYNC["callback_url"]


# --- what the review says --------------------------------------------------------------------


def test_approved_names_the_approvers_the_reason_and_the_key() -> None:
    body = review_body(decision())
    jsonschema.validate(body, review_schema())
    assert body["state"] == "approved" and body["environment_name"] == "production"
    assert body["comment"].startswith("Approved in Signoff by Ana Lead (UA1), Bo Lead (UA2)")
    assert "Reason: looks good" in body["comment"]
    assert "sync-r_abc" in body["comment"] and "r_abc" in body["comment"]


def test_rejected_and_expired_are_sent_as_rejected() -> None:
    rejected = review_body(decision("rejected", reason="not during the freeze"))
    assert rejected["state"] == "rejected"
    assert rejected["comment"].startswith("Rejected in Signoff by Ana Lead (UA1)")
    expired = review_body(decision("expired", decided_by=[], reason="expired after 24h"))
    assert expired["state"] == "rejected"
    assert expired["comment"].startswith("Expired in Signoff")
    assert "expired after 24h" in expired["comment"]


def test_comment_masks_secrets_and_stays_bounded() -> None:
    text = comment(decision(reason="token ghp_" + "a" * 36 + " " + "x" * 10_000))
    assert "ghp_" not in text and len(text) <= 4000
    assert text.endswith("sync-r_abc"), "the key survives the cut"


# --- the App JWT and installation tokens -----------------------------------------------------


def test_app_jwt_claims() -> None:
    now = 1_700_000_000  # in the past: only the claims are checked here, not their freshness
    auth = AppAuth(
        app_id=APP_ID,
        private_key=app_key(),
        api_url="https://api.github.com",
        client=Outbound(),
        timeout=1,
        clock=lambda: now,
    )
    claims = jwt.decode(
        auth.app_jwt(), app_key().public_key(), algorithms=["RS256"], options={"verify_exp": False}
    )
    assert claims == {"iss": APP_ID, "iat": now - 60, "exp": now + 540}
    assert claims["exp"] - claims["iat"] <= 600


def test_a_bad_private_key_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="PEM") as caught:
        load_private_key("-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0\n-----END RSA PRIVATE KEY-----")
    assert "c2VjcmV0" not in str(caught.value)
    assert load_private_key(app_key_pem()).key_size == 2048


@pytest.fixture
async def http() -> AsyncIterator[Outbound]:
    async with Outbound() as client:
        yield client


def connector(standin: GitHubStandIn, http: Outbound) -> GitHubConnector:
    return GitHubConnector(
        webhook_secret=WEBHOOK_SECRET,
        api_url=standin.url,
        app_id=APP_ID,
        private_key=app_key(),
        client=http,
        timeout=2,
    )


async def test_review_lands_with_a_valid_installation_token(http) -> None:
    async with github_standin() as standin:
        receipt = await connector(standin, http).apply(decision=decision())
        [review] = standin.reviews
    assert (review.owner, review.repo, review.run_id) == ("octo-org", "api", 42)
    assert review.installation_id == INSTALLATION
    jsonschema.validate(review.body, review_schema())
    assert review.body["state"] == "approved" and "Ana Lead" in review.body["comment"]
    assert receipt.refs == {"run_id": "42", "environment": "production", "state": "approved"}
    assert "ghs_" not in receipt.detail


async def test_one_token_serves_two_reviews(http) -> None:
    async with github_standin() as standin:
        github = connector(standin, http)
        await github.apply(decision=decision())
        await github.apply(decision=decision(sync={**SYNC, "run_id": 43, "callback_url": ""}))
        assert len(standin.reviews) == 2
        assert standin.token_calls == [INSTALLATION]


async def test_a_token_near_its_expiry_is_replaced(http) -> None:
    # Tokens that lapse within the five-minute margin are used once, never cached.
    async with github_standin(token_ttl=timedelta(minutes=4)) as standin:
        github = connector(standin, http)
        await github.apply(decision=decision())
        await github.apply(decision=decision(sync={**SYNC, "run_id": 43, "callback_url": ""}))
        assert len(standin.reviews) == 2
        assert standin.token_calls == [INSTALLATION, INSTALLATION]


async def test_a_refused_token_is_dropped_and_the_job_retried(http) -> None:
    async with github_standin() as standin:
        github = connector(standin, http)
        await github.apply(decision=decision())
        standin.revoke_tokens()
        second = decision(sync={**SYNC, "run_id": 43, "callback_url": ""})
        with pytest.raises(RetryableSyncError, match="401") as caught:
            await github.apply(decision=second)
        assert "ghs_" not in str(caught.value)
        await github.apply(decision=second)  # the retry fetches a new token
        assert len(standin.reviews) == 2 and len(standin.token_calls) == 2


async def test_unknown_installation_is_terminal(http) -> None:
    async with github_standin() as standin:
        with pytest.raises(TerminalSyncError, match=r"installation token.*404"):
            await connector(standin, http).apply(
                decision=decision(sync={**SYNC, "installation_id": 1})
            )
        assert standin.review_calls == 0


async def test_a_cancelled_request_sends_nothing(http) -> None:
    async with github_standin() as standin:
        receipt = await connector(standin, http).apply(decision=decision("cancelled"))
        assert (standin.token_calls, standin.review_calls) == ([], 0)
    assert "nothing sent" in receipt.detail


async def test_a_second_review_of_the_same_gate_is_terminal(http) -> None:
    async with github_standin() as standin:
        github = connector(standin, http)
        await github.apply(decision=decision())
        with pytest.raises(TerminalSyncError, match=r"422.*already reviewed.*job's key"):
            await github.apply(decision=decision())
        assert len(standin.reviews) == 1


async def test_githubs_403_rate_limit_is_retried_other_403s_are_not(http) -> None:
    async with github_standin() as standin:
        github = connector(standin, http)
        standin.answers = [
            (403, "You have exceeded a secondary rate limit. Please wait a few minutes."),
            (403, "Resource not accessible by integration"),
        ]
        with pytest.raises(RetryableSyncError, match="secondary rate limit"):
            await github.apply(decision=decision())
        with pytest.raises(TerminalSyncError, match="not accessible"):
            await github.apply(decision=decision())
        await github.apply(decision=decision())
        assert len(standin.reviews) == 1
