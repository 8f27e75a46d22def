"""Schemathesis against the running service: generated requests for every operation in
`bot/openapi.yaml` (valid and invalid ones), each answer checked against the document: never a
5xx, only documented status codes and content types, bodies matching their schemas.

Unsigned requests mostly get a 401, which must conform too; some `/v1/events` and
`/hooks/github` bodies are signed correctly, so the validation behind the signature is fuzzed as
well. The app runs on a real local port in a thread of its own (schemathesis calls it with a
blocking client), on SQLite, with the GitHub and Alertmanager hooks on and nothing reachable
beyond loopback: fuzzed callback URLs are dropped before signing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.github_support import APP_ID, WEBHOOK_SECRET, app_key_pem
from tests.integration import conftest as app_conftest
from tests.live import LoopThread
from tests.support import SECRET, free_port

DOCUMENT = Path(__file__).resolve().parents[2] / "bot" / "openapi.yaml"
AM_TOKEN = "fuzz-am-token-0123456789"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# Small on purpose: the whole module stays within a few seconds per operation.
EXAMPLES = 25
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)

schema = schemathesis.openapi.from_path(DOCUMENT)


class LiveApp:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApp]:
    db = tmp_path_factory.mktemp("fuzz") / "signoff.db"
    settings_ = app_conftest.test_settings(
        f"sqlite+aiosqlite:///{db}",
        GITHUB_WEBHOOK_SECRET=WEBHOOK_SECRET,
        # Nothing listens there: a review the worker might send goes nowhere.
        GITHUB_API_URL=f"http://127.0.0.1:{free_port()}",
        GITHUB_APP_ID=APP_ID,
        GITHUB_APP_PRIVATE_KEY=app_key_pem(),
        ALERTMANAGER_WEBHOOK_TOKEN=AM_TOKEN,
    )
    # The app's loop runs in a thread of its own: schemathesis calls it with a blocking client.
    with LoopThread() as loop:
        app = loop.enter(app_conftest.running_app(settings_))
        yield LiveApp(str(app.client.make_url("/")))


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as client:
        yield client


def run(case: Any, live: LiveApp, session: requests.Session, **kwargs: Any) -> requests.Response:
    response = case.call(base_url=live.url, session=session, **kwargs)
    case.validate_response(response, checks=CHECKS)
    # Shown by --hypothesis-show-statistics: which answers the run reached.
    event(f"{case.method} {case.path}: {response.status_code}")
    return response


def modes() -> st.SearchStrategy[GenerationMode]:
    return st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE])


@FUZZ
@given(data=st.data(), mode=modes())
def test_every_operation_unsigned(live: LiveApp, session: requests.Session, data, mode) -> None:
    case = data.draw(schema.as_strategy(generation_mode=mode))
    response = run(case, live, session)
    if case.path in ("/v1/events", "/hooks/github"):
        # Nothing generated here carries a valid signature.
        assert response.status_code in (400, 401, 413), response.text


def _signed_body(case: Any) -> bytes:
    body = case.body
    if isinstance(body, bytes):
        return body
    if isinstance(body, dict):
        # Never let the outbox worker call a fuzzed URL.
        body = {key: value for key, value in body.items() if key != "callback_url"}
    return json.dumps(body, default=str).encode()


def sign_bytes(raw: bytes) -> tuple[bytes, dict[str, str]]:
    """Standard Webhooks over any bytes (tests.support.sign needs UTF-8 text)."""
    msg_id, moment = f"msg_{uuid.uuid4().hex}", str(int(time.time()))
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{moment}.".encode() + raw, hashlib.sha256).digest()
    return raw, {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": moment,
        "webhook-signature": "v1," + base64.b64encode(mac).decode(),
    }


@FUZZ
@given(data=st.data(), mode=modes())
def test_signed_events(live: LiveApp, session: requests.Session, data, mode) -> None:
    case = data.draw(schema["/v1/events"]["POST"].as_strategy(generation_mode=mode))
    raw, headers = sign_bytes(_signed_body(case))
    # Over whatever header the negative mode generated: these are the request's real ones.
    case.headers = {**(case.headers or {}), **headers}
    response = run(case, live, session, data=raw)
    try:
        raw.decode()
    except UnicodeDecodeError:
        # Standard Webhooks signs text: a body that is not UTF-8 cannot carry a valid signature.
        assert response.status_code == 401, response.text
        return
    # Past the signature, a body is either accepted or refused for what it says.
    assert response.status_code in (202, 400, 413), response.text
    if response.status_code != 202:
        assert response.json()["error"]


@FUZZ
@given(data=st.data(), event=st.sampled_from(["deployment_protection_rule", "ping", "push"]))
def test_signed_github_deliveries(live: LiveApp, session: requests.Session, data, event) -> None:
    case = data.draw(schema["/hooks/github"]["POST"].as_strategy())
    raw = _signed_body(case)
    digest = hmac.new(WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
    headers = {
        "content-type": "application/json",
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": f"fuzz-{digest[:16]}",
    }
    case.headers = {**(case.headers or {}), **headers}
    response = run(case, live, session, data=raw)
    assert response.status_code in (200, 202, 400, 413), response.text


@FUZZ
@given(data=st.data(), mode=modes())
def test_alertmanager_with_the_token(live: LiveApp, session: requests.Session, data, mode) -> None:
    case = data.draw(schema["/hooks/alertmanager"]["POST"].as_strategy(generation_mode=mode))
    response = run(case, live, session, headers={"Authorization": f"Bearer {AM_TOKEN}"})
    assert response.status_code in (200, 202, 400, 401, 413), response.text


@FUZZ
@given(data=st.data(), mode=modes())
def test_requests_api_with_the_token(live: LiveApp, session: requests.Session, data, mode) -> None:
    case = data.draw(
        schema["/v1/requests/{id}"]["GET"].as_strategy(
            generation_mode=mode, query={"wait": "0"} if mode is GenerationMode.POSITIVE else None
        )
    )
    token = {"Authorization": f"Bearer {app_conftest.API_TOKEN}"}
    response = run(case, live, session, headers=token)
    # Negative cases may break the Authorization header itself.
    allowed = (200, 400, 404) if mode is GenerationMode.POSITIVE else (200, 400, 401, 404)
    assert response.status_code in allowed, response.text


def test_the_document_is_served(live: LiveApp, session: requests.Session) -> None:
    response = session.get(f"{live.url}/openapi.yaml", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/yaml")
    assert response.text == DOCUMENT.read_text()
