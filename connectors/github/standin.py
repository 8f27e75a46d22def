"""A local stand-in for the two GitHub API calls Signoff makes, for tests and the demo.

It is strict where GitHub is: the access-token exchange verifies the App JWT's RS256 signature
with the App's public key, its issuer and its ten-minute lifetime, and issues expiring tokens;
the review call accepts only a live token it issued and a body with the fields the
review-custom-gates spec requires. A gate answers once: a second review of the same run and
environment gets 422 (the wording is the stand-in's own; GitHub documents only the 204).
`answers` queues statuses (404, 422, 500...) to answer instead, one per review call.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey


@dataclass(frozen=True)
class Review:
    owner: str
    repo: str
    run_id: int
    body: dict[str, Any]
    installation_id: int


@dataclass
class _Token:
    installation_id: int
    expires_at: datetime
    revoked: bool = False


class GitHubStandIn:
    """`POST /app/installations/{id}/access_tokens` and the review call, on a local port."""

    def __init__(
        self,
        *,
        app_id: str,
        public_key: RSAPublicKey,
        installations: set[int] | None = None,
        token_ttl: timedelta = timedelta(hours=1),
    ) -> None:
        self.app_id = app_id
        self.public_key = public_key
        # None: any installation id exists.
        self.installations = installations
        self.token_ttl = token_ttl
        # Statuses (or status and message) to answer review calls with instead, in order.
        self.answers: list[int | tuple[int, str]] = []
        self.token_calls: list[int] = []
        self.review_calls = 0
        self.reviews: list[Review] = []
        self.refusals: list[tuple[int, str]] = []
        self._tokens: dict[str, _Token] = {}
        self._reviewed: set[tuple[str, str, int, str]] = set()
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/app/installations/{installation}/access_tokens", self._access_token)
        app.router.add_post(
            "/repos/{owner}/{repo}/actions/runs/{run_id}/deployment_protection_rule", self._review
        )
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self._port = probe.getsockname()[1]
        await web.TCPSite(self._runner, "127.0.0.1", self._port, reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def issued_tokens(self) -> list[str]:
        return list(self._tokens)

    def revoke_tokens(self) -> None:
        for token in self._tokens.values():
            token.revoked = True

    async def wait_for_reviews(self, count: int, timeout: float = 10.0) -> list[Review]:
        deadline = time.monotonic() + timeout
        while len(self.reviews) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} reviews, got {len(self.reviews)} after "
                    f"{self.review_calls} calls; refusals: {self.refusals}"
                )
            await asyncio.sleep(0.02)
        return list(self.reviews)

    def _refuse(self, status: int, message: str) -> web.Response:
        self.refusals.append((status, message))
        return web.json_response({"message": message}, status=status)

    async def _access_token(self, request: web.Request) -> web.Response:
        installation = int(request.match_info["installation"])
        self.token_calls.append(installation)
        scheme, _, app_jwt = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not app_jwt:
            return self._refuse(401, "A JSON web token could not be decoded")
        try:
            claims = jwt.decode(
                app_jwt,
                self.public_key,
                algorithms=["RS256"],
                options={"require": ["iat", "exp", "iss"]},
            )
        except jwt.PyJWTError as exc:
            return self._refuse(401, f"JWT refused: {type(exc).__name__}")
        if str(claims["iss"]) != self.app_id:
            return self._refuse(401, "JWT issuer is not this App")
        if int(claims["exp"]) - int(claims["iat"]) > 600:
            return self._refuse(401, "JWT expiration is too far in the future")
        if self.installations is not None and installation not in self.installations:
            return self._refuse(404, "Not Found")
        token = "ghs_" + secrets.token_hex(18)
        expires_at = datetime.now(UTC).replace(microsecond=0) + self.token_ttl
        self._tokens[token] = _Token(installation, expires_at)
        return web.json_response(
            {
                "token": token,
                "expires_at": expires_at.isoformat().replace("+00:00", "Z"),
                "permissions": {"deployments": "write", "actions": "read"},
                "repository_selection": "all",
            },
            status=201,
        )

    async def _review(self, request: web.Request) -> web.Response:
        self.review_calls += 1
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        token = self._tokens.get(value) if scheme == "Bearer" else None
        if token is None or token.revoked or token.expires_at <= datetime.now(UTC):
            return self._refuse(401, "Bad credentials")
        try:
            body = await request.json()
        except ValueError:
            return self._refuse(400, "Problems parsing JSON")
        problem = _body_problem(body)
        if problem:
            return self._refuse(422, problem)
        if self.answers:
            answer = self.answers.pop(0)
            status, message = answer if isinstance(answer, tuple) else (answer, "")
            return self._refuse(status, message or f"answering {status} on purpose")
        owner, repo = request.match_info["owner"], request.match_info["repo"]
        run_id = int(request.match_info["run_id"])
        gate = (owner, repo, run_id, str(body["environment_name"]))
        if gate in self._reviewed:
            return self._refuse(422, "this deployment protection rule was already reviewed")
        self._reviewed.add(gate)
        self.reviews.append(Review(owner, repo, run_id, body, token.installation_id))
        return web.Response(status=204)


def _body_problem(body: Any) -> str:
    """What the spec's two schemas (comment-required, state-required) would refuse."""
    if not isinstance(body, dict):
        return "body must be an object"
    unknown = set(body) - {"environment_name", "state", "comment"}
    if unknown:
        return f"unknown fields: {sorted(unknown)}"
    if not isinstance(body.get("environment_name"), str):
        return "environment_name is required and must be a string"
    if "state" in body and body["state"] not in ("approved", "rejected"):
        return "state must be approved or rejected"
    if "comment" in body and not isinstance(body["comment"], str):
        return "comment must be a string"
    if "state" not in body and "comment" not in body:
        return "comment is required when state is not provided"
    return ""


__all__ = ["GitHubStandIn", "Review"]
