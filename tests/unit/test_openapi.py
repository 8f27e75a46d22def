"""The OpenAPI document (`bot/openapi.yaml`): a valid OpenAPI 3.1 document, its Event schemas the
same as the pydantic models the intake validates with, and every route of the app described."""

from __future__ import annotations

from typing import Any

import yaml
from openapi_spec_validator import validate

from bot.http import openapi_document
from connectors.events import EventBody

# The components generated from connectors.events: EventBody and the models it refers to.
GENERATED = ("EventBody", "Actor", "ContextField", "Link", "Anomaly", "Risk")


def document() -> dict[str, Any]:
    return dict(yaml.safe_load(openapi_document()))


def pydantic_components() -> dict[str, Any]:
    schema = EventBody.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs")
    return {"EventBody": schema, **defs}


def test_the_document_is_valid_openapi_3_1() -> None:
    spec = document()
    assert spec["openapi"].startswith("3.1")
    validate(spec)  # raises OpenAPIValidationError naming what is wrong


def test_event_schemas_match_the_pydantic_model() -> None:
    generated = pydantic_components()
    assert set(generated) == set(GENERATED), "a new model in EventBody: add it to GENERATED"
    shipped = {name: document()["components"]["schemas"][name] for name in GENERATED}
    if shipped != generated:
        block = yaml.safe_dump(generated, sort_keys=False, width=100, allow_unicode=True)
        raise AssertionError(
            "bot/openapi.yaml's Event schemas differ from connectors/events.py; replace the "
            "generated block at the end of the file with:\n" + block
        )


def test_every_route_is_described_with_its_methods() -> None:
    paths = document()["paths"]
    assert {path: sorted(item) for path, item in paths.items()} == {
        "/v1/events": ["post"],
        "/v1/requests/{id}": ["get"],
        "/hooks/github": ["post"],
        "/hooks/alertmanager": ["post"],
        "/healthz": ["get"],
        "/readyz": ["get"],
        "/openapi.yaml": ["get"],
    }


def test_intake_answers_document_every_status_the_code_returns() -> None:
    paths = document()["paths"]
    statuses = {
        ("/v1/events", "post"): {"202", "400", "401", "413", "503"},
        ("/v1/requests/{id}", "get"): {"200", "400", "401", "404", "503"},
        ("/hooks/github", "post"): {"200", "202", "400", "401", "413", "503"},
        ("/hooks/alertmanager", "post"): {"200", "202", "400", "401", "413", "503"},
    }
    for (path, method), expected in statuses.items():
        assert set(paths[path][method]["responses"]) == expected, path
