"""GitHub intake: X-Hub-Signature-256 against GitHub's documented vector, every refusal, the
fixture checked against GitHub's schema, and the golden Event it becomes."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest

from connectors.errors import MalformedPayload, SignatureError
from connectors.github.intake import receive
from connectors.github.signature import HubSignature
from tests.conftest import reference
from tests.github_support import WEBHOOK_SECRET, deployment_payload, fixture, github_signed
from tests.golden import assert_golden

VERIFIER = HubSignature(WEBHOOK_SECRET)


@pytest.fixture(scope="module")
def vector() -> dict[str, str]:
    return dict(json.loads(reference("github", "github_signature_vector.json").read_text()))


@pytest.fixture(scope="module")
def schema_validator() -> jsonschema.Draft202012Validator:
    path = reference(
        "github", "gh_webhook_deployment_protection_rule_requested.bundled.schema.json"
    )
    return jsonschema.Draft202012Validator(
        json.loads(path.read_text()), format_checker=jsonschema.FormatChecker()
    )


# --- X-Hub-Signature-256 ---------------------------------------------------------------------


def test_signs_and_verifies_githubs_vector(vector: dict[str, str]) -> None:
    signer = HubSignature(vector["secret"])
    body = vector["body"].encode()
    assert signer.sign(body) == vector["expected_X-Hub-Signature-256"]
    signer.verify(body, {"X-Hub-Signature-256": vector["expected_X-Hub-Signature-256"]})
    # aiohttp hands headers over case-insensitively; a plain lowercase mapping works too.
    signer.verify(body, {"x-hub-signature-256": vector["expected_X-Hub-Signature-256"]})


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing"),
        ("", "missing"),
        ("sha1=757107ea0eb2509fc211221cce984b8a37570b6d", "not sha256="),
        ("sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17", "not sha256="),
        ("sha256=757107ea", "not sha256="),
        ("757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17", "not sha256="),
        ("sha256=" + "0" * 64, "does not match"),
    ],
)
def test_signature_refusals(vector: dict[str, str], header: str | None, message: str) -> None:
    headers = {} if header is None else {"X-Hub-Signature-256": header}
    with pytest.raises(SignatureError, match=message):
        HubSignature(vector["secret"]).verify(vector["body"].encode(), headers)


def test_a_body_changed_after_signing_is_refused(vector: dict[str, str]) -> None:
    headers = {"X-Hub-Signature-256": vector["expected_X-Hub-Signature-256"]}
    with pytest.raises(SignatureError, match="does not match"):
        HubSignature(vector["secret"]).verify(b"Hello, World?", headers)


def test_an_empty_secret_refuses_everything() -> None:
    # Even a delivery "signed" with the empty key: an HMAC anyone can compute proves nothing.
    raw, headers = github_signed(fixture("ping.json"), event="ping", secret="")
    with pytest.raises(SignatureError, match="not configured"):
        receive(raw, headers, verifier=HubSignature(""))


def test_signature_is_checked_before_the_body_is_read() -> None:
    raw, headers = github_signed(b"not json", secret="another secret")
    with pytest.raises(SignatureError):
        receive(raw, headers, verifier=VERIFIER)


# --- the fixture against GitHub's schema -----------------------------------------------------


def test_the_fixture_validates_against_githubs_schema(schema_validator) -> None:
    payload = fixture("deployment_protection_rule.requested.json")
    errors = [e.message for e in schema_validator.iter_errors(payload)]
    assert errors == []
    # The check can fail: the schema requires the sender and the repository's full name.
    broken = copy.deepcopy(payload)
    del broken["sender"]
    del broken["repository"]["full_name"]
    assert len(list(schema_validator.iter_errors(broken))) == 2


def test_golden_deployment_event() -> None:
    raw, headers = github_signed(
        fixture("deployment_protection_rule.requested.json"),
        delivery="72d3162e-cc78-11e3-81ab-4c9367dc0958",
    )
    delivery = receive(raw, headers, verifier=VERIFIER)
    [event] = delivery.events
    assert delivery.reply is None and not delivery.ignored and not delivery.cancellations
    produced = event.model_dump(mode="json", exclude={"received_at"})
    assert_golden("github_deployment_protection_rule.requested", produced)
    # What CEL sees: the documented attributes, usable in conditions.
    cel = event.to_cel()
    assert cel["attributes"]["repo"] == "terraform-test-github/sample-app"
    assert cel["attributes"]["environment"] == "production"
    assert cel["actor"]["id"] == "ilmax"


def test_golden_ping() -> None:
    raw, headers = github_signed(fixture("ping.json"), event="ping")
    delivery = receive(raw, headers, verifier=VERIFIER)
    assert delivery.reply == {"ok": True, "event": "ping"}
    assert delivery.events == () and not delivery.ignored


def test_same_request_redelivered_keeps_its_identity() -> None:
    payload = deployment_payload()
    first = receive(*github_signed(payload, delivery="d-1"), verifier=VERIFIER).events[0]
    again = receive(*github_signed(payload, delivery="d-1"), verifier=VERIFIER).events[0]
    rerun = receive(
        *github_signed(deployment_payload(deployment_id=1039846999), delivery="d-2"),
        verifier=VERIFIER,
    ).events[0]
    assert (again.delivery_id, again.subject, again.version) == (
        first.delivery_id,
        first.subject,
        first.version,
    )
    assert rerun.subject == first.subject and rerun.version != first.version


# --- ignored and malformed -------------------------------------------------------------------


def test_other_event_types_are_ignored() -> None:
    payload = json.loads(
        reference("github", "octokit_workflow_run_requested.payload.json").read_text()
    )
    delivery = receive(*github_signed(payload, event="workflow_run"), verifier=VERIFIER)
    assert delivery.events == () and "workflow_run" in delivery.ignored


def test_other_actions_are_ignored() -> None:
    payload = {**deployment_payload(), "action": "reviewed"}
    delivery = receive(*github_signed(payload), verifier=VERIFIER)
    assert delivery.events == () and "'reviewed'" in delivery.ignored


def _without(path: str) -> dict[str, Any]:
    payload = deployment_payload()
    *parents, last = path.split(".")
    node = payload
    for part in parents:
        node = node[part]
    del node[last]
    return payload


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"[]", "JSON object"),
        (_without("deployment"), "deployment: Field required"),
        (_without("deployment.sha"), "deployment.sha"),
        (_without("installation"), "installation: Field required"),
        (_without("environment"), "environment: Field required"),
        (_without("deployment_callback_url"), "deployment_callback_url"),
        (
            {**deployment_payload(), "deployment_callback_url": "https://api.github.com/x"},
            "deployment_callback_url: not a",
        ),
        (
            {
                **deployment_payload(),
                "deployment_callback_url": "https://api.github.com/repos/someone/else"
                "/actions/runs/1/deployment_protection_rule",
            },
            "names someone/else, the repository is terraform-test-github/sample-app",
        ),
        ({**deployment_payload(), "action": 7}, "action"),
        (
            {**deployment_payload(), "pull_requests": [{"number": "three"}]},
            "pull_requests.0.number",
        ),
    ],
)
def test_malformed_payloads_name_the_field(body: bytes | dict[str, Any], message: str) -> None:
    with pytest.raises(MalformedPayload, match=message):
        receive(*github_signed(body), verifier=VERIFIER)


@pytest.mark.parametrize("missing", ["X-GitHub-Event", "X-GitHub-Delivery"])
def test_missing_github_headers_are_malformed(missing: str) -> None:
    raw, headers = github_signed(deployment_payload())
    del headers[missing]
    with pytest.raises(MalformedPayload, match=missing):
        receive(raw, headers, verifier=VERIFIER)


def test_nul_in_payload_text_is_dropped() -> None:
    payload = deployment_payload()
    payload["pull_requests"][0]["title"] = "evil\x00title"
    [event] = receive(*github_signed(payload), verifier=VERIFIER).events
    assert "\x00" not in json.dumps(event.model_dump(mode="json"))
    assert any(field.value == "#3 eviltitle" for field in event.context)
