"""The GitHub connector: deployment protection rule webhooks in, reviews out."""

from __future__ import annotations

import json
from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from connectors.base import Delivery, FinalDecision, SyncReceipt
from connectors.errors import RetryableSyncError, TerminalSyncError
from connectors.github import intake
from connectors.github.app_auth import AppAuth, github_headers
from connectors.github.review import review_body, review_url
from connectors.github.signature import HubSignature
from connectors.outbound import AnswerError, Outbound, send
from connectors.redaction import redact_url


class GitHubConnector:
    name = intake.NAME
    sync_kind = intake.SYNC_KIND

    def __init__(
        self,
        *,
        webhook_secret: str,
        api_url: str,
        app_id: str,
        private_key: RSAPrivateKey,
        client: Outbound,
        timeout: float,
    ) -> None:
        self.verifier = HubSignature(webhook_secret)
        self.auth = AppAuth(
            app_id=app_id, private_key=private_key, api_url=api_url, client=client, timeout=timeout
        )
        self._api_url = api_url
        self._client = client
        self._timeout = timeout

    async def receive(self, *, body: bytes, headers: Mapping[str, str]) -> Delivery:
        return intake.receive(body, headers, verifier=self.verifier)

    async def apply(self, *, decision: FinalDecision) -> SyncReceipt:
        sync = decision.sync
        if decision.status == "cancelled":
            # Superseded by a newer request for the same run and environment, which answers
            # GitHub itself; answering this one too would review the same gate twice.
            return SyncReceipt(detail="cancelled in Signoff: nothing sent to GitHub")
        try:
            installation = int(sync["installation_id"])
            url = review_url(self._api_url, sync)
        except (KeyError, TypeError, ValueError):
            raise TerminalSyncError(
                f"request {decision.request_id} lacks the GitHub run or installation to answer"
            ) from None
        body = review_body(decision)
        try:
            token = await self.auth.token(installation)
        except AnswerError as exc:
            if limited := _rate_limited(exc):
                raise limited from exc
            raise
        try:
            await send(
                self._client,
                "POST",
                url,
                what="GitHub review",
                timeout=self._timeout,
                content=json.dumps(body).encode(),
                headers={**github_headers(token), "content-type": "application/json"},
            )
        except AnswerError as exc:
            raise self._refusal(exc, installation, token) from exc
        return SyncReceipt(
            detail=f"GitHub review {body['state']} for {body['environment_name']} at "
            f"{redact_url(url)}",
            refs={
                "run_id": str(sync.get("run_id", "")),
                "environment": body["environment_name"],
                "state": body["state"],
            },
        )

    def _refusal(self, exc: AnswerError, installation: int, token: str) -> Exception:
        if limited := _rate_limited(exc):
            return limited
        if exc.status == 401:
            # Revoked, or expired early (the App's key was rotated...): fetch a new token and
            # try again; a second 401 with a fresh token ends the same way, then dead-letters
            # after the worker's attempt budget.
            self.auth.forget(installation, token)
            return RetryableSyncError(f"{exc}; a new installation token will be fetched")
        if exc.status == 422:
            # GitHub documents only the 204 for this call. A 422 means it will not take this
            # review: the run is no longer waiting on this rule (already reviewed, cancelled,
            # timed out) or the environment is wrong. Retrying cannot change that; whether an
            # earlier attempt of ours landed shows on the run, as a review carrying this job's
            # key in its comment.
            return TerminalSyncError(
                f"{exc} (if an earlier attempt timed out, its review may have landed: look for "
                "this job's key in the run's deployment review comments)"
            )
        return exc


def _rate_limited(exc: AnswerError) -> RetryableSyncError | None:
    """GitHub answers an exhausted or secondary rate limit with 403 as well as 429 (docs: "Rate
    limits for the REST API"); `connectors.outbound` retries only the 429."""
    if exc.status == 403 and "rate limit" in exc.snippet.lower():
        return RetryableSyncError(str(exc))
    return None
