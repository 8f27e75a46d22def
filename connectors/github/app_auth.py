"""GitHub App authentication: an app JWT, exchanged for installation access tokens, cached.

GitHub's rules (docs: "Generating a JSON Web Token for a GitHub App", "Generating an
installation access token"): the JWT is RS256-signed with the App's private key, `iss` is the
App id, `iat` is set 60 seconds in the past to allow for clock drift, and `exp` is at most ten
minutes after `iat`. `POST /app/installations/{id}/access_tokens` answers 201 with a token that
lasts an hour (`expires_at`). Tokens are kept per installation until `REFRESH_MARGIN` before
they expire, so a review never starts with a token about to lapse mid-call.

Neither the key, the JWT nor a token ever appears in an error message: `connectors.outbound`
reports the URL and GitHub's answer, and nothing here adds to that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints, ValidationError

from connectors.errors import TerminalSyncError
from connectors.outbound import Outbound, send

REFRESH_MARGIN = timedelta(minutes=5)
# GitHub refuses an `exp` more than ten minutes ahead; `iat` is backdated by a minute for drift.
JWT_BACKDATE = 60
JWT_LIFETIME = 540
API_VERSION = "2022-11-28"


def load_private_key(pem: str) -> RSAPrivateKey:
    """The App's private key (the PEM GitHub lets you download). ValueError if it is not an RSA
    private key; the message never contains the key."""
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ValueError("not a PEM RSA private key without a passphrase") from None
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("not an RSA private key (GitHub Apps sign with RS256)")
    return key


def github_headers(token: str) -> dict[str, str]:
    return {
        "accept": "application/vnd.github+json",
        "authorization": f"Bearer {token}",
        "x-github-api-version": API_VERSION,
    }


class _AccessToken(BaseModel):
    model_config = ConfigDict(extra="ignore")

    token: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    expires_at: AwareDatetime


@dataclass(frozen=True)
class _Cached:
    token: str
    use_until: datetime


class AppAuth:
    """Installation tokens for one GitHub App, fetched on demand and cached per installation."""

    def __init__(
        self,
        *,
        app_id: str,
        private_key: RSAPrivateKey,
        api_url: str,
        client: Outbound,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._app_id = app_id
        self._key = private_key
        self._api_url = api_url.rstrip("/")
        self._client = client
        self._timeout = timeout
        self._clock = clock
        self._tokens: dict[int, _Cached] = {}
        # One exchange per installation at a time: jobs that start together share its token.
        self._locks: dict[int, asyncio.Lock] = {}

    def app_jwt(self) -> str:
        now = int(self._clock())
        claims = {"iat": now - JWT_BACKDATE, "exp": now + JWT_LIFETIME, "iss": self._app_id}
        return jwt.encode(claims, self._key, algorithm="RS256")

    async def token(self, installation_id: int) -> str:
        """A token for the installation, from the cache unless it is near its expiry."""
        lock = self._locks.setdefault(installation_id, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(installation_id)
            if cached is not None and self._now() < cached.use_until:
                return cached.token
            fresh = await self._exchange(installation_id)
            self._tokens[installation_id] = _Cached(fresh.token, fresh.expires_at - REFRESH_MARGIN)
            return fresh.token

    def forget(self, installation_id: int, token: str) -> None:
        """Drop a token GitHub refused, unless another job has already replaced it."""
        cached = self._tokens.get(installation_id)
        if cached is not None and cached.token == token:
            del self._tokens[installation_id]

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    async def _exchange(self, installation_id: int) -> _AccessToken:
        url = f"{self._api_url}/app/installations/{installation_id}/access_tokens"
        answer = await send(
            self._client,
            "POST",
            url,
            what="GitHub App installation token",
            timeout=self._timeout,
            headers=github_headers(self.app_jwt()),
        )
        try:
            return _AccessToken.model_validate_json(answer.body)
        except ValidationError:
            raise TerminalSyncError(
                f"GitHub App installation token: {url} answered {answer.status} without a "
                "token and expires_at"
            ) from None
