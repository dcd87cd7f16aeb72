"""The OpenAPI document is complete and true: every route, parameter and field is described, and
error answers are documented with the one error shape the API really sends."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def _spec(client: TestClient) -> dict[str, Any]:
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return dict(response.json())


def test_every_route_parameter_and_field_is_described(client: TestClient) -> None:
    spec = _spec(client)
    missing = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if not op.get("summary") or not op.get("description"):
                missing.append(f"{method.upper()} {path}: summary/description")
            for param in op.get("parameters", []):
                if not param.get("description") and not param.get("schema", {}).get("description"):
                    missing.append(f"{method.upper()} {path}: parameter {param['name']}")
    for name, schema in spec["components"]["schemas"].items():
        for prop, prop_schema in schema.get("properties", {}).items():
            if not prop_schema.get("description"):
                missing.append(f"schema {name}.{prop}")
    assert not missing, "undocumented:\n" + "\n".join(missing)


def test_error_answers_are_documented_with_the_real_error_shape(client: TestClient) -> None:
    spec = _spec(client)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert set(spec["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}
    wrong = [
        f"{method.upper()} {path} {status}"
        for path, operations in spec["paths"].items()
        for method, op in operations.items()
        for status, response in op.get("responses", {}).items()
        if int(status) >= 400
        for media in response.get("content", {}).values()
        if media.get("schema") != {"$ref": "#/components/schemas/ErrorResponse"}
    ]
    assert not wrong, wrong
    # and what the schema says is what a 422 looks like
    body = client.post("/jobs", json={"type": "train"}).json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param", "type"}
    assert set(body["error"]) == set(spec["components"]["schemas"]["ErrorDetail"]["properties"])


def test_content_types_and_inference_errors_are_the_ones_sent(client: TestClient) -> None:
    spec = _spec(client)
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert list(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"]), path
        assert {"400", "404", "422", "429", "500", "503"} <= set(responses), path
