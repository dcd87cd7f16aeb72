"""What one request may cost the server before it is refused: the body's size, tokenizing on the event loop,
a batch's prompts after the first that cannot run, a chat template rendered once per named message; and text
that is not text (lone surrogates) or parts of a message the server would ignore."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

pytest.importorskip("peft", reason="peft writes the test adapters")

from tests.app.serving_helpers import PROMPTS, peft_adapter, served_app, serving_settings

LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, base_host: Any) -> Iterator[TestClient]:
    settings = serving_settings(tmp_path_factory.mktemp("bounds"), demo_model_dir, max_request_bytes=LIMIT)
    with served_app(settings, base_host) as test_client:
        yield test_client


def _host(client: TestClient) -> Any:
    return client.app.state.services.serving  # type: ignore[attr-defined]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_request_limit_is_refused_413_before_it_is_read_whole(client: TestClient,
                                                                              chunked: bool) -> None:
    big = b'{"prompt": "' + b"word " * LIMIT + b'"}'
    received: list[int] = []

    def body() -> Iterator[bytes]:  # no Content-Length: the limit is found while the body arrives
        for start in range(0, len(big), 8192):
            received.append(start)
            yield big[start:start + 8192]

    headers = {"content-type": "application/json"}
    response = client.post("/generate", content=body() if chunked else big, headers=headers)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and "ADAPTERFORGE_MAX_REQUEST_BYTES" in error["message"]
    assert str(LIMIT) in error["message"]
    fits = client.post("/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 2})
    assert fits.status_code == 200, fits.text


def test_uploads_keep_their_own_larger_limit(client: TestClient, tmp_path: Path, demo_model_dir: Path) -> None:
    """POST /adapters streams files under ADAPTERFORGE_MAX_UPLOAD_BYTES, not the JSON routes' limit."""
    folder = peft_adapter(demo_model_dir, tmp_path / "a", seed=3, r=64)
    weights = (folder / "adapter_model.safetensors").read_bytes()
    assert len(weights) > LIMIT
    files = [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    response = client.post("/adapters", files=[("name", (None, "big-upload")), *files])
    assert response.status_code == 201, response.text


def test_tokenizing_a_prompt_does_not_hold_up_other_requests(client: TestClient,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt being tokenized (long text takes seconds) runs off the event loop: /healthz answers meanwhile."""
    host = _host(client)
    started, release = threading.Event(), threading.Event()
    encode = host.encode_prompt

    def slow_encode(prompt: str, param: str = "prompt") -> list[int]:
        started.set()
        assert release.wait(30), "never released"
        return encode(prompt, param)

    monkeypatch.setattr(host, "encode_prompt", slow_encode)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/generate", json={"prompt": PROMPTS[0], "max_new_tokens": 2})
        try:
            assert started.wait(30)
            health = pool_call(client, "/healthz")  # would wait for the release if the loop were blocked
            assert health == 200
        finally:
            release.set()
        assert pending.result(60).status_code == 200


def pool_call(client: TestClient, path: str) -> int:
    """GET ``path`` from another thread; its status, or -1 if it takes more than 20 s (a blocked event loop)."""
    with ThreadPoolExecutor(1) as pool:
        try:
            return int(pool.submit(client.get, path).result(20).status_code)
        except TimeoutError:
            return -1


@pytest.mark.parametrize("route", ["/generate", "/v1/completions"])
def test_a_batch_stops_tokenizing_at_its_first_prompt_that_cannot_run(client: TestClient, route: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    host = _host(client)
    calls: list[str] = []
    encode = host.encode_prompt
    monkeypatch.setattr(host, "encode_prompt", lambda p, param="prompt": calls.append(param) or encode(p, param))
    too_long = "word " * 5000  # past the demo model's context
    body: dict[str, Any] = {"prompt": [PROMPTS[0], too_long, *PROMPTS[1:]]}
    body |= {"max_new_tokens": 2} if route == "/generate" else {"model": "base", "max_tokens": 2}
    response = client.post(route, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "prompt[1]"
    assert calls == ["prompt[0]", "prompt[1]"]  # the prompts after it were never tokenized


def test_named_messages_cost_two_renderings_not_one_per_message(client: TestClient,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    host = _host(client)
    tokenizer = host.tokenizer
    template = tokenizer.chat_template.replace("message['role'] }}", "message['role'] }}{{ message.get('name', '') }}")
    assert template != tokenizer.chat_template
    monkeypatch.setattr(tokenizer, "chat_template", template)
    renders = []
    apply = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: renders.append(1) or apply(*a, **k))
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}", "name": f"p{i % 3}"}
                for i in range(12)]
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert len(renders) == 2
    # a template that drops names: refused naming the first named message (checked once more, exactly)
    monkeypatch.setattr(tokenizer, "chat_template", template.replace("{{ message.get('name', '') }}", ""))
    renders.clear()
    refused = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 2})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "messages[0].name", refused.text
    assert len(renders) == 3


def test_a_conversation_too_long_for_the_context_is_refused_before_its_names_are_checked(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = _host(client).tokenizer
    renders = []
    apply = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: renders.append(1) or apply(*a, **k))
    messages = [{"role": "user", "content": "word " * 400, "name": f"p{i}"} for i in range(20)]
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 2})
    assert response.status_code == 422 and response.json()["error"]["param"] == "messages", response.text
    assert "no room" in response.json()["error"]["message"]
    assert len(renders) == 1


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/generate", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ("/generate", {"messages": [[{"role": "user", "content": "ok"}], [{"role": "user", "content": "\udfff"}]]},
     "messages[1][0].content"),
    ("/generate", {"prompt": "hi", "stop": ["x", "\ud800"]}, "stop"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "\ud83d"}]},
     "messages[0].content"),
    ("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "hi"}], "stop": "\ud800"},
     "stop"),
    ("/v1/completions", {"model": "base", "prompt": "hi", "stop": "\udc00"}, "stop"),
])
def test_lone_surrogates_anywhere_in_the_text_are_refused_naming_the_field(client: TestClient, route: str,
                                                                           body: dict[str, Any], param: str) -> None:
    body = {**body, "max_tokens" if route.startswith("/v1") else "max_new_tokens": 2}
    response = client.post(route, content=json.dumps(body), headers={"content-type": "application/json"})  # (\\ud800)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and "surrogate" in error["message"], error


def test_a_text_part_with_keys_the_server_does_not_read_is_refused(client: TestClient) -> None:
    part = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}
    response = client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 2,
                                                         "messages": [{"role": "user", "content": [part]}]})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "messages[0].content[0].cache_control"
    plain = {"type": "text", "text": "hi"}
    assert client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 2, "messages": [
        {"role": "user", "content": [plain]}]}).status_code == 200


@pytest.mark.parametrize(("path", "content_type"), [
    ("/generate", "application/x-www-form-urlencoded"),  # what `curl -d` sends
    ("/generate", "text/plain"),
    ("/v1/chat/completions", "application/x-www-form-urlencoded"),
])
def test_a_json_body_sent_as_another_media_type_is_415_saying_what_to_send(client: TestClient, path: str,
                                                                         content_type: str) -> None:
    body = {"prompt": "hi", "max_new_tokens": 2} if path == "/generate" else {
        "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    response = client.post(path, content=json.dumps(body), headers={"content-type": content_type})
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_media_type" and "Content-Type: application/json" in error["message"]
    assert content_type in error["message"]
    as_json = client.post(path, content=json.dumps(body), headers={"content-type": "application/json; charset=utf-8"})
    assert as_json.status_code == 200, as_json.text
    not_an_object = client.post(path, content="[1]", headers={"content-type": "application/json"})
    assert not_an_object.status_code == 422  # JSON, but not the object the route takes


@pytest.mark.parametrize(("path", "root"), [("/api/datasets", "/api"), ("/datasets/", ""), ("/datasets", "")])
def test_uploads_are_exempt_behind_a_root_path_and_with_a_trailing_slash(path: str, root: str) -> None:
    """uvicorn --root-path puts the prefix into the scope's path: the upload routes stopped matching, and their
    bodies were capped at the JSON routes' limit."""
    import asyncio

    from app.api.body_limit import BodyLimitMiddleware

    reached: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"x" * 100, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"refused: {message}")

    scope = {"type": "http", "method": "POST", "path": path, "root_path": root,
             "headers": [(b"content-length", b"100")]}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=10)(scope, receive, send))
    assert reached == [path]


def test_a_template_that_checks_names_gets_each_name_checked_on_its_own(client: TestClient,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A template that refuses names it finds malformed refused the markers, and the request with them (422)."""
    tokenizer = _host(client).tokenizer
    template = tokenizer.chat_template.replace(
        "message['role'] }}", "message['role'] }}{% if message.get('name') %}{% if not message['name'].isalpha() %}"
        "{{ raise_exception('names must be letters') }}{% endif %}{{ message['name'] }}{% endif %}")
    assert template != tokenizer.chat_template
    monkeypatch.setattr(tokenizer, "chat_template", template)
    messages = [{"role": "user", "content": "hi", "name": "alice"}, {"role": "user", "content": "yo", "name": "bob"}]
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text
    bad = client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi", "name": "b0b"}]})
    assert bad.status_code == 422 and "names must be letters" in bad.json()["error"]["message"]
