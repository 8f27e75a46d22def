"""Parsing `POST /v1/events` bodies: every problem is a MalformedPayload naming the field."""

from __future__ import annotations

import json

import pytest

from connectors.errors import MalformedPayload, SignatureError
from connectors.webhook.intake import json_object, parse_body, receive
from connectors.webhook.signature import StandardWebhooks
from tests.support import SECRET, event_body, sign


def test_the_design_example_parses() -> None:
    body = parse_body(json.dumps(event_body(callback_url="http://127.0.0.1:9000/a")).encode())
    assert body.source == "payments"
    assert body.actor is not None and body.actor.id == "u-42"
    assert body.attributes["amount"] == 4200
    assert str(body.callback_url) == "http://127.0.0.1:9000/a"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"null", "JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (json.dumps(event_body(source="Payments!")).encode(), "source:"),
        (json.dumps(event_body(attributes={"not an identifier": 1})).encode(), "attributes"),
        (
            json.dumps(event_body(links=[{"title": "x", "url": "javascript:alert(1)"}])).encode(),
            "links.0.url",
        ),
        (json.dumps(event_body(version="")).encode(), "version:"),
        (json.dumps(event_body(context=[{"label": "x", "value": "y"}] * 51)).encode(), "context"),
    ],
)
def test_malformed(body: bytes, message: str) -> None:
    with pytest.raises(MalformedPayload, match=message):
        parse_body(body)


def test_receive_namespaces_the_delivery_id_and_keeps_the_callback() -> None:
    raw, headers = sign(event_body(callback_url="http://127.0.0.1:9/cb"), msg_id="msg_1")
    event = receive(raw, headers, verifier=StandardWebhooks(SECRET))
    assert event.delivery_id == "webhook:msg_1"
    assert event.sync == {"callback_url": "http://127.0.0.1:9/cb"}
    assert event.received_at.tzinfo is not None


def test_receive_checks_the_signature_before_parsing() -> None:
    raw, headers = sign(b"{not json")
    headers["webhook-signature"] = "v1,AAAA"
    with pytest.raises(SignatureError):
        receive(raw, headers, verifier=StandardWebhooks(SECRET))


def test_cel_view_of_an_event_without_actor_has_empty_fields() -> None:
    raw, headers = sign({k: v for k, v in event_body().items() if k != "actor"})
    view = receive(raw, headers, verifier=StandardWebhooks(SECRET)).to_cel()
    assert view["actor"] == {"id": "", "name": "", "email": "", "team": ""}
    assert view["context"] == {"Customer": "ACME Corp"}


def test_what_the_fast_parser_refuses_reads_as_the_standard_library_reads_it() -> None:
    """orjson reads bodies first (connectors.webhook.intake._loads); what it refuses, the
    standard library decides, as it did before."""
    for amount in (10**30, -(2**63) - 1):  # orjson would read a float
        big = parse_body(json.dumps(event_body(attributes={"amount": amount})).encode())
        assert big.attributes["amount"] == amount
        assert isinstance(big.attributes["amount"], int)
    assert json_object(b'{"a": "\\udcff", "b": NaN, "c": 1E400}') == {
        "a": "\udcff",
        "b": pytest.approx(float("nan"), nan_ok=True),
        "c": float("inf"),
    }
    assert json_object('{"title": "été"}'.encode("utf-16")) == {"title": "été"}
    assert json_object(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


def test_nul_is_found_only_where_an_escape_can_put_one() -> None:
    with pytest.raises(MalformedPayload, match="U\\+0000"):
        parse_body(json.dumps(event_body(summary="a\u0000b")).encode())
    with pytest.raises(MalformedPayload, match="U\\+0000"):
        parse_body(json.dumps(event_body(attributes={"k": ["\u0000"]})).encode())
    # A backslash followed by "u0000" is text, not a NUL: the walk looks and finds none.
    escaped = parse_body(json.dumps(event_body(summary="\\u0000")).encode())
    assert escaped.summary == "\\u0000"


def test_depth_is_checked_whatever_the_bracket_count() -> None:
    nested: object = 1
    for _ in range(70):
        nested = [nested]
    with pytest.raises(MalformedPayload, match="deeper than 64"):
        parse_body(json.dumps(event_body(attributes={"deep": nested})).encode())
    shallow = [[1]] * 100  # many brackets, little depth
    assert parse_body(json.dumps(event_body(attributes={"wide": shallow})).encode())
