"""Standard Webhooks signing and verification, against the spec's own test vector."""

from __future__ import annotations

import json

import pytest

from connectors.errors import SignatureError
from connectors.webhook.signature import StandardWebhooks
from tests.conftest import reference


@pytest.fixture(scope="module")
def vector() -> dict[str, str]:
    return dict(json.loads(reference("webhooks", "standard_webhooks_vector.json").read_text()))


def headers_of(vector: dict[str, str], **changes: str) -> dict[str, str]:
    headers = {
        "webhook-id": vector["webhook-id"],
        "webhook-timestamp": vector["webhook-timestamp"],
        "webhook-signature": vector["expected_webhook-signature"],
    }
    headers.update(changes)
    return headers


def test_signs_the_vector(vector: dict[str, str]) -> None:
    signer = StandardWebhooks(vector["secret"])
    signature = signer.sign(
        msg_id=vector["webhook-id"],
        timestamp=int(vector["webhook-timestamp"]),
        body=vector["body"].encode(),
    )
    assert signature == vector["expected_webhook-signature"]


def test_verifies_the_vector_inside_its_window(vector: dict[str, str]) -> None:
    verifier = StandardWebhooks(vector["secret"])
    now = float(vector["webhook-timestamp"]) + 10
    assert (
        verifier.verify(vector["body"].encode(), headers_of(vector), now=now)
        == vector["webhook-id"]
    )


def test_accepts_any_matching_signature_among_several(vector: dict[str, str]) -> None:
    verifier = StandardWebhooks(vector["secret"])
    several = f"v1,AAAA v2,xyz {vector['expected_webhook-signature']}"
    now = float(vector["webhook-timestamp"])
    headers = headers_of(vector, **{"webhook-signature": several})
    assert verifier.verify(vector["body"].encode(), headers, now=now)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"webhook-signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA="}, "no webhook"),
        ({"webhook-signature": "v1"}, "no webhook"),
        ({"webhook-signature": "v1,%%%"}, "no webhook"),
        ({"webhook-id": "msg_other"}, "no webhook"),
        ({"webhook-timestamp": "1614265331"}, "no webhook"),
        ({"webhook-timestamp": "-5"}, "Unix time"),
        ({"webhook-timestamp": "1e9"}, "Unix time"),
        ({"webhook-id": ""}, "missing"),
        ({"webhook-id": "x" * 300}, "too long"),
    ],
)
def test_refuses_tampering(vector: dict[str, str], change: dict[str, str], message: str) -> None:
    verifier = StandardWebhooks(vector["secret"])
    with pytest.raises(SignatureError, match=message):
        verifier.verify(
            vector["body"].encode(),
            headers_of(vector, **change),
            now=float(vector["webhook-timestamp"]),
        )


def test_refuses_a_changed_body(vector: dict[str, str]) -> None:
    verifier = StandardWebhooks(vector["secret"])
    with pytest.raises(SignatureError):
        verifier.verify(
            b'{"test": 2432232315}', headers_of(vector), now=float(vector["webhook-timestamp"])
        )


@pytest.mark.parametrize(("offset", "message"), [(-301, "too old"), (301, "future")])
def test_replay_window(vector: dict[str, str], offset: int, message: str) -> None:
    verifier = StandardWebhooks(vector["secret"], tolerance_seconds=300)
    now = float(vector["webhook-timestamp"]) - offset
    with pytest.raises(SignatureError, match=message):
        verifier.verify(vector["body"].encode(), headers_of(vector), now=now)


def test_non_utf8_body_is_a_signature_error(vector: dict[str, str]) -> None:
    verifier = StandardWebhooks(vector["secret"])
    with pytest.raises(SignatureError, match="UTF-8"):
        verifier.verify(b"\xff\xfe", headers_of(vector), now=float(vector["webhook-timestamp"]))


def test_outbound_headers_verify(vector: dict[str, str]) -> None:
    signer = StandardWebhooks(vector["secret"])
    headers = signer.headers(msg_id="sync-r_1", body=b'{"a":1}', timestamp=1_700_000_000)
    assert signer.verify(b'{"a":1}', headers, now=1_700_000_000) == "sync-r_1"
