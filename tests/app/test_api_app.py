"""The app shell: error shape, schema check at start-up, health/readiness/metrics, API keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import SchemaOutOfDate, create_app
from app.settings import Settings


def test_server_refuses_an_out_of_date_schema_and_says_what_to_run(tmp_path: Path, base_host: Any) -> None:
    settings = Settings(data_dir=tmp_path, reconcile_interval_seconds=0)
    with pytest.raises(SchemaOutOfDate, match="adapterforge db upgrade"), TestClient(create_app(settings, base_model=base_host)):
        pass


def test_health_readiness_and_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert {k: v["ok"] for k, v in checks.items()} == {"database": True, "broker": True, "base_model": True,
                                                      "serving": True}
    assert checks["serving"]["enabled"] is False  # these API tests run without a resident model
    client.queue.fail = True  # type: ignore[attr-defined]
    down = client.get("/readyz")
    assert down.status_code == 503 and down.json()["checks"]["broker"]["ok"] is False
    text = client.get("/metrics").text
    assert 'adapterforge_http_requests_total{method="GET",route="/readyz",status="503"} 1.0' in text
    assert 'adapterforge_jobs{status="queued"} 0.0' in text


def test_unknown_routes_and_methods_use_the_error_shape(client: TestClient) -> None:
    missing = client.get("/no/such/route")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "Not Found", "param": None, "type": "invalid_request_error"}}
    wrong = client.delete("/healthz")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_unknown_query_parameters_are_refused_naming_the_parameter(client: TestClient) -> None:
    typo = client.get("/adapters", params={"limt": 1})
    assert typo.status_code == 422, typo.text
    error = typo.json()["error"]
    assert error["param"] == "limt"
    assert "`limt`" in error["message"] and "`limit`" in error["message"]  # names what the route takes
    assert client.get("/adapters", params={"limit": 1}).status_code == 200
    aliased = client.get("/adapters/x/versions/1/download", params={"archive_format": "zip"})
    assert aliased.status_code == 422 and aliased.json()["error"]["param"] == "archive_format"  # the name is `format`
    assert client.get("/healthz", params={"verbose": 1}).status_code == 422
    assert client.get("/healthz").status_code == 200
    twice = client.get("/adapters", params=[("limit", 1), ("limit", 50)])  # FastAPI alone would keep the last
    assert twice.status_code == 422 and twice.json()["error"]["param"] == "limit", twice.text


@pytest.mark.parametrize("value", ["1_0", "2.0", "+2", " 2 ", "\u0662"])
@pytest.mark.parametrize("route", ["/adapters", "/jobs", "/datasets"])
def test_integer_query_parameters_take_digits_only(client: TestClient, route: str, value: str) -> None:
    """pydantic's lax parsing would read 1_0 as 10 and 2.0 as 2: the page size asked for is not a guess."""
    response = client.get(route, params={"limit": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "limit" and repr(value) in response.json()["error"]["message"]
    assert client.get(route, params={"limit": "2"}).status_code == 200


@pytest.mark.parametrize("body", [
    b'{"type": "train", "type": "merge", "dataset_id": "ds_x", "adapter": {"name": "b"}}',
    b'{"type": "train", "dataset_id": "ds_x", "adapter": {"name": "b"}, "hyperparameters": {"epochs": 1, "epochs": 50}}',
], ids=["top-level", "nested"])
def test_a_json_body_giving_a_key_twice_is_refused(client: TestClient, body: bytes) -> None:
    """Python's json keeps the last of a repeated key silently: which one the client meant is unknowable."""
    response = client.post("/jobs", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] in ("type", "epochs") and "more than once" in error["message"]
    assert client.get("/jobs").json()["data"] == []


def test_api_keys_when_configured(api_settings: Settings, base_host: Any) -> None:
    from tests.app.conftest import RecordingQueue

    settings = api_settings.model_copy(update={"api_keys": ["sekrit"]})
    with TestClient(create_app(settings, queue=RecordingQueue(), base_model=base_host)) as c:
        assert c.get("/healthz").status_code == 200  # probes need no key
        denied = c.get("/metrics")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
        assert c.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert c.get("/adapters", params={"limt": 1}).status_code == 401  # the key before anything else
