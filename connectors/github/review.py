"""The answer to GitHub: `POST .../actions/runs/{run_id}/deployment_protection_rule`.

Spec (review-custom-gates-for-run, vendored under tests/fixtures/reference/github/):
`{environment_name, state: approved|rejected, comment}` answered by 204. GitHub knows only those
two states, so an expired request is sent as `rejected` with a comment saying it expired, and a
cancelled (superseded) one is not sent at all: the newer request answers for the run.

GitHub has no idempotency header for this call. The job's idempotency key goes in the comment,
where it shows on the run's page next to the review, so a person can match a review to its
Signoff request and job.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from connectors.base import FinalDecision
from connectors.errors import TerminalSyncError
from connectors.redaction import redact_text

MAX_COMMENT = 4000


def review_url(api_url: str, sync: Mapping[str, Any]) -> str:
    """GitHub's own callback URL when it points at our API host; otherwise the same path built
    on `api_url`. The installation token goes wherever this points, so a payload may never
    steer it to another host."""
    base = api_url.rstrip("/")
    given = str(sync.get("callback_url") or "")
    if given and _same_api(given, base):
        return given
    owner, repo = quote(str(sync["owner"]), safe=""), quote(str(sync["repo"]), safe="")
    run_id = int(sync["run_id"])
    return f"{base}/repos/{owner}/{repo}/actions/runs/{run_id}/deployment_protection_rule"


def _same_api(url: str, base: str) -> bool:
    try:
        got, want = urlsplit(url), urlsplit(base)
        ports = (got.port, want.port)
    except ValueError:
        return False
    return (
        got.scheme == want.scheme
        and got.hostname == want.hostname
        and ports[0] == ports[1]
        and got.username is None
        and not got.query
        and got.path.startswith(want.path.rstrip("/") + "/repos/")
    )


def review_body(decision: FinalDecision) -> dict[str, str]:
    """The request body: the state GitHub knows, and a comment saying who and why."""
    environment = str(decision.sync.get("environment") or "")
    if not environment:
        raise TerminalSyncError(f"request {decision.request_id} has no environment to review")
    state = "approved" if decision.status == "approved" else "rejected"
    return {"environment_name": environment, "state": state, "comment": comment(decision)}


def comment(decision: FinalDecision) -> str:
    """`Approved in Signoff by Ana Lead (UA1), Bo Lead (UA2): reason` and the request and key."""
    who = ", ".join(_name(entry) for entry in decision.decided_by) or "nobody"
    reason = redact_text(decision.reason.strip())
    if decision.status == "approved":
        head = f"Approved in Signoff by {who}"
    elif decision.status == "rejected":
        head = f"Rejected in Signoff by {who}"
    elif decision.status == "expired":
        head = (
            "Expired in Signoff: no decision before the request's expiry, so this deployment "
            "is rejected (GitHub accepts only approved or rejected)"
        )
    else:
        head = f"{decision.status.capitalize()} in Signoff"
    text = head + (f". Reason: {reason}" if reason else ".")
    footer = f"\n\nSignoff request {decision.request_id} · {decision.idempotency_key}"
    if len(text) > MAX_COMMENT - len(footer):
        text = text[: MAX_COMMENT - len(footer) - 1] + "…"
    return text + footer


def _name(entry: Mapping[str, str]) -> str:
    ident, name = str(entry.get("id", "")), str(entry.get("name", ""))
    if name and ident and name != ident:
        return f"{name} ({ident})"
    return name or ident
