"""Edges of the OpenAI-compatible routes: one token-id prompt of any length, length fields that disagree,
`usage: null` on streamed chunks, OpenAI's error `type`, `best_of` below `n`, a message name the template drops."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

openai = pytest.importorskip("openai", reason="the official openai client is a dev dependency")
pytest.importorskip("peft", reason="peft writes the test adapters")

from tests.app.serving_helpers import PROMPTS, peft_adapter, served_app, serving_settings, sse_events, upload  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, base_host: Any) -> Iterator[TestClient]:
    settings = serving_settings(tmp_path_factory.mktemp("oai-edges"), demo_model_dir)
    with served_app(settings, base_host) as test_client:
        root = tmp_path_factory.mktemp("adapters")
        upload(test_client, "support", peft_adapter(demo_model_dir, root / "s1", seed=11))
        yield test_client


@pytest.fixture(scope="module")
def oai(client: TestClient) -> Any:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


CHAT = [{"role": "user", "content": "What is two plus two?"}]


def test_a_token_id_prompt_of_more_than_64_tokens_is_served(client: TestClient, oai: Any) -> None:
    """A flat list of token ids is ONE prompt: its length is not a count of prompts (64 at most)."""
    host = client.app.state.services.serving  # type: ignore[attr-defined]
    ids = (host.encode_prompt(" ".join(PROMPTS)) * 10)[:100]
    assert len(ids) == 100
    as_batch = oai.completions.create(model="support", prompt=[ids], max_tokens=4, temperature=0)  # served
    got = client.post("/v1/completions", json={"model": "support", "prompt": ids, "max_tokens": 4,
                                               "temperature": 0})
    assert got.status_code == 200, got.text
    assert got.json()["usage"]["prompt_tokens"] == 100
    assert got.json()["choices"][0]["text"] == as_batch.choices[0].text


def test_chat_max_tokens_is_not_silently_overridden_by_max_completion_tokens(client: TestClient) -> None:
    """Both length fields with different values: one of them would be ignored without a word."""
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, "temperature": 0,
                                                          "max_tokens": 2, "max_completion_tokens": 5})
    body = response.json()
    assert response.status_code == 422, body
    assert body["error"]["param"] == "max_tokens" and "max_completion_tokens" in body["error"]["message"]
    same = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, "temperature": 0,
                                                      "max_tokens": 3, "max_completion_tokens": 3})
    assert same.status_code == 200 and same.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_stream_chunks_before_the_usage_chunk_carry_usage_null(client: TestClient, route: str) -> None:
    """OpenAI: with stream_options.include_usage, "all other chunks will also include a usage field, but with
    a null value"; the last chunk before [DONE] has the usage and empty choices."""
    body: dict[str, Any] = {"model": "support", "max_tokens": 4, "temperature": 0, "stream": True,
                            "stream_options": {"include_usage": True}}
    body |= {"prompt": PROMPTS[0]} if route == "completions" else {"messages": CHAT}
    response = client.post(f"/v1/{route}", json=body)
    assert response.status_code == 200, response.text
    chunks = [data for _, data in sse_events(response)]
    assert chunks[-1] == "[DONE]"
    *others, last = chunks[:-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4
    assert all("usage" in c and c["usage"] is None for c in others), others[0]
    plain = client.post(f"/v1/{route}", json={**body, "stream_options": None})
    assert all("usage" not in data for _, data in sse_events(plain) if data != "[DONE]")  # not asked: no field


@pytest.mark.parametrize(("method", "path", "body"), [
    ("get", "/v1/models/missing", None),
    ("post", "/v1/completions", {"model": "missing", "prompt": "x", "max_tokens": 2}),
    ("post", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2, "echo": True}),
    ("post", "/v1/chat/completions", {"model": "base", "messages": CHAT, "tools": [{"type": "function"}]}),
])
def test_v1_errors_have_openais_type_field(client: TestClient, method: str, path: str, body: Any) -> None:
    """OpenAI's error object is {message, type, param, code}; clients (and the openai package's
    ``APIError.type``) read ``type``, e.g. ``invalid_request_error``."""
    response = client.request(method, path, json=body)
    assert response.status_code in (404, 422), response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error"


def test_error_type_follows_the_status(client: TestClient, oai: Any) -> None:
    """The openai package reads ``type`` from the body: 4xx ``invalid_request_error``."""
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("missing")
    assert info.value.type == "invalid_request_error" and info.value.code == "not_found"


def test_best_of_below_n_is_refused(client: TestClient) -> None:
    body = {"model": "base", "prompt": PROMPTS[0], "max_tokens": 2, "n": 2, "best_of": 1}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 422 and response.json()["error"]["param"] == "best_of", response.text
    assert "at least n" in response.json()["error"]["message"]
    assert client.post("/v1/completions", json={**body, "best_of": 2}).status_code == 200


def test_a_name_the_chat_template_drops_is_refused_even_when_another_message_name_is_used(
        oai: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A template that renders ``name`` for user turns only: the assistant turn's ``name`` changes nothing, so
    it must be refused (as a name is when no turn uses it), not dropped because the user's name was used."""
    tokenizer = client.app.state.services.serving.tokenizer  # type: ignore[attr-defined]
    template = tokenizer.chat_template.replace(
        "message['role'] }}", "message['role'] }}{% if message['role'] == 'user' %}{{ message.get('name', '') }}"
        "{% endif %}")
    assert template != tokenizer.chat_template
    monkeypatch.setattr(tokenizer, "chat_template", template)
    messages = [{"role": "user", "content": "hi", "name": "Alice"},
                {"role": "assistant", "content": "hello", "name": "Bot"},
                {"role": "user", "content": "What is two plus two?"}]
    host = client.app.state.services.serving  # type: ignore[attr-defined]
    renamed = [messages[0], {**messages[1], "name": "SomeoneElse"}, messages[2]]
    assert host.encode_chat(messages) == host.encode_chat(renamed)  # the assistant's name changes nothing
    assert host.encode_chat(messages) != host.encode_chat([{**messages[0], "name": "Carol"}, *messages[1:]])
    used_only = [messages[0], {"role": "assistant", "content": "hello"}, messages[2]]
    assert client.post("/v1/chat/completions", json={"model": "base", "messages": used_only,
                                                     "max_tokens": 2}).status_code == 200
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.chat.completions.create(model="base", messages=messages, max_tokens=2)
    assert info.value.body["param"] == "messages[1].name"


def test_the_documented_response_models_hold_what_the_routes_answer(client: TestClient) -> None:
    """The OpenAPI schema of /v1/completions and /v1/chat/completions names these models: they must parse the
    real answers, logprobs included, and the schema must point at them."""
    from app.api.openai_compat import ChatCompletionOut, CompletionOut

    done = client.post("/v1/completions", json={"model": "support", "prompt": ["hi", "there"], "n": 2,
                                                "max_tokens": 3, "logprobs": 2, "temperature": 0})
    assert done.status_code == 200, done.text
    assert len(CompletionOut.model_validate(done.json(), strict=False).choices) == 4
    chat = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, "max_tokens": 3,
                                                     "logprobs": True, "top_logprobs": 2})
    assert chat.status_code == 200, chat.text
    assert ChatCompletionOut.model_validate(chat.json(), strict=False).choices[0].logprobs is not None
    spec = client.get("/openapi.json").json()
    for path, name in (("/v1/completions", "CompletionOut"), ("/v1/chat/completions", "ChatCompletionOut")):
        schema = spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema["$ref"].endswith(name)
