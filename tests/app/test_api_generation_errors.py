"""A generation that fails after it was queued (its scores turn NaN): what each route answers.

One prompt of a request fails; the others run. Streams name the failed prompt (`index`), use the
same error code as the JSON answers (`internal_error`), and the OpenAI streams still end with
`[DONE]`; a JSON answer that is an error stops the request's other generations.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")

from fastapi.testclient import TestClient

from tests.app.serving_helpers import peft_adapter, served_app, serving_settings, sse_events, upload

GOOD, BAD = "hello there", "The quick brown fox"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, base_host: Any) -> Iterator[TestClient]:
    settings = serving_settings(tmp_path_factory.mktemp("errors"), demo_model_dir, max_lora_rank=8)
    with served_app(settings, base_host) as test_client:
        root = tmp_path_factory.mktemp("adapters")
        upload(test_client, "bot", peft_adapter(demo_model_dir, root / "bot", seed=21, r=4))
        upload(test_client, "wide", peft_adapter(demo_model_dir, root / "wide", seed=22, r=16))
        yield test_client


@contextlib.contextmanager
def failing(client: TestClient, prompt: str | None) -> Iterator[None]:
    """Rows whose prompt is ``prompt`` (``None``: every row) get NaN scores once they have 2 tokens (an
    overflowing adapter)."""
    services = client.app.state.services  # type: ignore[attr-defined]
    engine, host = services.serving.engine, services.serving
    bad_ids = None if prompt is None else host.encode_prompt(prompt)
    original = engine._forward

    def corrupting(*args: Any, **kwargs: Any) -> torch.Tensor:
        logits = original(*args, **kwargs)
        if kwargs.get("last_only") is False and len(engine._rows) == logits.shape[0]:
            for i, row in enumerate(engine._rows):
                if bad_ids in (None, row.request.prompt_ids) and len(row.generated) >= 2:
                    logits = logits.clone()
                    logits[i, ..., 5] = float("nan")
        return logits

    engine._forward = corrupting
    try:
        yield
    finally:
        engine._forward = original
        deadline = time.monotonic() + 60
        while engine.running_rows and time.monotonic() < deadline:
            time.sleep(0.01)


def finished(client: TestClient, reason: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if (line.startswith("adapterforge_generate_requests_total{") and 'adapter="bot"' in line
                and f'finish_reason="{reason}"' in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_streamed_batch_names_the_prompt_that_failed(client: TestClient) -> None:
    with failing(client, BAD):
        response = client.post("/generate?adapter=bot", json={"prompt": [GOOD, BAD], "max_new_tokens": 8,
                                                               "temperature": 0, "stream": True})
    assert response.status_code == 200
    events = sse_events(response)
    errors = [data for kind, data in events if kind == "error"]
    assert len(errors) == 1, events
    assert errors[0]["index"] == 1
    assert errors[0]["error"]["code"] == "internal_error" and "not finite" in errors[0]["error"]["message"]
    assert [data["index"] for kind, data in events if kind == "result"] == [0]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_an_openai_stream_that_fails_says_so_then_ends_with_done(client: TestClient, route: str) -> None:
    body: dict[str, Any] = {"model": "bot", "max_tokens": 8, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    if route == "/v1/completions":
        body["prompt"] = BAD
    else:
        body["messages"] = [{"role": "user", "content": BAD}]
    with failing(client, None):
        response = client.post(route, json=body)
    assert response.status_code == 200
    events = sse_events(response)
    assert events[-1] == ("message", "[DONE]"), events[-3:]
    errors = [data["error"] for _, data in events if isinstance(data, dict) and "error" in data]
    assert len(errors) == 1 and errors[0]["code"] == "internal_error", events


@pytest.mark.parametrize("route", ["/generate?adapter=bot", "/v1/completions"])
def test_a_failed_json_answer_stops_the_requests_other_generations(client: TestClient, route: str) -> None:
    body: dict[str, Any] = {"prompt": [GOOD, BAD], "temperature": 0}
    if route == "/v1/completions":
        body |= {"model": "bot", "max_tokens": 200, "min_tokens": 200}
    else:
        body |= {"max_new_tokens": 200, "min_new_tokens": 200}
    before = {reason: finished(client, reason) for reason in ("length", "cancelled", "error")}
    with failing(client, BAD):
        response = client.post(route, json=body)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    after = {reason: finished(client, reason) for reason in ("length", "cancelled", "error")}
    assert {k: after[k] - before[k] for k in after} == {"length": 0, "cancelled": 1, "error": 1}


def test_an_openai_route_names_model_where_generate_names_adapter(client: TestClient) -> None:
    """The rank check happens when the version is leased, after the name resolved: its error still names
    the request's own field."""
    native = client.post("/generate?adapter=wide", json={"prompt": GOOD, "max_new_tokens": 2})
    assert native.status_code == 422 and native.json()["error"]["param"] == "adapter"
    for stream in (False, True):
        answer = client.post("/v1/completions", json={"model": "wide", "prompt": GOOD, "max_tokens": 2,
                                                      "stream": stream})
        assert answer.status_code == 422, answer.text
        assert answer.json()["error"]["param"] == "model" and "rank" in answer.json()["error"]["message"]


@contextlib.contextmanager
def failing_slot_loads(client: TestClient) -> Iterator[None]:
    """Every copy of an adapter into a slot fails (before the request has any output)."""
    host = client.app.state.services.serving  # type: ignore[attr-defined]
    original = host.slotted.load

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated slot copy failure")

    host.slotted.load = refuse
    try:
        yield
    finally:
        host.slotted.load = original


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_a_stream_whose_request_fails_before_any_output_answers_with_the_errors_status(
        client: TestClient, demo_model_dir: Path, tmp_path: Path, route: str) -> None:
    """A stream's status goes out with its first byte: held until the first event, an error that comes
    first (here a failed slot load) is the answer's own status, not a 200 stream carrying only it."""
    name = "cold-" + route.strip("/").replace("/", "-")  # a new adapter: the request loads it into a slot
    upload(client, name, peft_adapter(demo_model_dir, tmp_path / name, seed=31, r=4))
    if route == "/generate":
        url, body = f"/generate?adapter={name}", {"prompt": GOOD, "max_new_tokens": 4, "stream": True}
    elif route == "/v1/completions":
        url, body = route, {"model": name, "prompt": GOOD, "max_tokens": 4, "stream": True}
    else:
        url, body = route, {"model": name, "messages": [{"role": "user", "content": GOOD}], "max_tokens": 4,
                            "stream": True}
    with failing_slot_loads(client):
        failed = client.post(url, json=body)
    assert failed.status_code == 500, failed.text
    assert failed.headers["content-type"].startswith("application/json")
    error = failed.json()["error"]
    assert error["code"] == "internal_error" and "simulated slot copy failure" in error["message"], error
    served = client.post(url, json=body)  # the slot went back: the next request streams
    assert served.status_code == 200 and served.headers["content-type"].startswith("text/event-stream")
    assert sse_events(served)


def test_a_streamed_batch_still_reports_each_prompts_error_in_the_stream(
        client: TestClient, demo_model_dir: Path, tmp_path: Path) -> None:
    """Several prompts: one's error does not end the others, so the errors stay in the stream (a 200)."""
    upload(client, "cold-batch", peft_adapter(demo_model_dir, tmp_path / "cold-batch", seed=32, r=4))
    with failing_slot_loads(client):
        response = client.post("/generate?adapter=cold-batch", json={"prompt": [GOOD, BAD], "max_new_tokens": 4,
                                                                    "stream": True})
    assert response.status_code == 200
    errors = [data for kind, data in sse_events(response) if kind == "error"]
    assert sorted(e["index"] for e in errors) == [0, 1] and all(e["error"]["code"] == "internal_error" for e in errors)
