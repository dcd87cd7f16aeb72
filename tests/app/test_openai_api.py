"""The OpenAI-compatible routes, driven by the official ``openai`` Python client, unchanged.

The client talks to the app through Starlette's TestClient (an ``httpx.Client``), so every request
goes through the real client code: URL building, auth header, streaming parser, error mapping.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

openai = pytest.importorskip("openai", reason="the official openai client is a dev dependency")
pytest.importorskip("peft", reason="peft writes the test adapters")

from app.registry.models import Adapter  # noqa: E402
from tests.app.serving_helpers import PROMPTS, peft_adapter, served_app, serving_settings, upload  # noqa: E402

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, base_host: Any) -> Iterator[TestClient]:
    settings = serving_settings(tmp_path_factory.mktemp("openai"), demo_model_dir, api_keys=[KEY])
    with served_app(settings, base_host) as test_client:
        test_client.headers["Authorization"] = f"Bearer {KEY}"
        root = tmp_path_factory.mktemp("adapters")
        upload(test_client, "support", peft_adapter(demo_model_dir, root / "s1", seed=11))
        upload(test_client, "support", peft_adapter(demo_model_dir, root / "s2", seed=12))
        upload(test_client, "legal", peft_adapter(demo_model_dir, root / "l1", seed=13, r=4))
        yield test_client


@pytest.fixture(scope="module")
def oai(client: TestClient) -> Any:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


def native(client: TestClient, adapter: str | None, prompt: str, n: int, **extra: Any) -> Any:
    params = {"adapter": adapter} if adapter else {}
    body = {"prompt": prompt, "max_new_tokens": n, "temperature": 0, "logprobs": True, **extra}
    response = client.post("/generate", params=params, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_base_and_adapters(oai: Any) -> None:
    models = {m.id: m for m in oai.models.list()}
    assert set(models) == {"base", "support", "legal"}
    assert models["support"].root == "support@2" and models["support"].parent == "base"
    assert oai.models.retrieve("support@1").root == "support@1"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("missing")


def test_a_models_created_time_is_when_its_adapter_appeared(oai: Any, client: TestClient) -> None:
    appeared = datetime(2020, 1, 2, tzinfo=UTC)
    with client.app.state.services.db.session() as session:  # type: ignore[attr-defined]
        session.execute(update(Adapter).where(Adapter.name == "legal").values(created_at=appeared))
    listed = {m.id: m.created for m in oai.models.list()}
    assert listed["legal"] == int(appeared.timestamp())
    assert oai.models.retrieve("legal").created == oai.models.retrieve("legal@1").created == listed["legal"]


def test_completion_equals_generate(oai: Any, client: TestClient) -> None:
    got = oai.completions.create(model="support@1", prompt=PROMPTS[0], max_tokens=12, temperature=0, logprobs=2)
    want = native(client, "support@1", PROMPTS[0], 12, top_logprobs=2)
    choice = got.choices[0]
    assert choice.text == want["text"] and got.model == "support@1"
    assert choice.logprobs.token_logprobs == pytest.approx(want["logprobs"])
    assert len(choice.logprobs.top_logprobs) == len(want["tokens"])
    for alts, step in zip(choice.logprobs.top_logprobs, want["top_logprobs"], strict=True):
        assert alts == {t["token"]: pytest.approx(t["logprob"]) for t in reversed(step)}  # OpenAI's dict form
    assert got.usage.completion_tokens == len(want["tokens"])
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_completion_with_several_prompts_and_choices(oai: Any, client: TestClient) -> None:
    got = oai.completions.create(model="legal", prompt=PROMPTS[:2], max_tokens=6, temperature=0.8, n=2, seed=5)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    again = oai.completions.create(model="legal", prompt=PROMPTS[:2], max_tokens=6, temperature=0.8, n=2, seed=5)
    assert [c.text for c in got.choices] == [c.text for c in again.choices]
    token_prompt = oai.completions.create(model="legal", prompt=[5, 6, 7], max_tokens=4, temperature=0)
    assert token_prompt.usage.prompt_tokens == 3


def test_completion_stream(oai: Any, client: TestClient) -> None:
    want = native(client, "support", PROMPTS[1], 16, min_new_tokens=16)
    stream = oai.completions.create(model="support", prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True,
                                    extra_body={"min_tokens": 16}, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_chat_completion_equals_generate_with_messages(oai: Any, client: TestClient) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    got = oai.chat.completions.create(model="support", messages=messages, max_tokens=10, temperature=0,
                                      logprobs=True, top_logprobs=3)
    response = client.post("/generate", params={"adapter": "support"},
                           json={"messages": messages, "max_new_tokens": 10, "temperature": 0, "logprobs": True})
    want = response.json()
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want["text"]
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(want["logprobs"])
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]


def test_chat_completion_stream_and_text_parts(oai: Any, client: TestClient) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}]
    whole = oai.chat.completions.create(model="legal", messages=messages, max_completion_tokens=12, temperature=0)
    stream = oai.chat.completions.create(model="legal", messages=messages, max_completion_tokens=12, temperature=0,
                                         stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_usage_counts_each_prompt_once_whatever_n(oai: Any) -> None:
    """OpenAI counts a prompt once however many choices it has; prompt_tokens used to be multiplied by n."""
    messages = [{"role": "user", "content": "What is two plus two?"}]
    for stream in (False, True):
        options: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        options["extra_body"] = {"min_tokens": 2}
        usage = {}
        for n in (1, 3):
            chat = oai.chat.completions.create(model="base", messages=messages, max_tokens=2, n=n, **options)
            text = oai.completions.create(model="base", prompt=PROMPTS[:2], max_tokens=2, n=n, **options)
            usage[n] = [list(r)[-1].usage if stream else r.usage for r in (chat, text)]
        assert [u.prompt_tokens for u in usage[3]] == [u.prompt_tokens for u in usage[1]]
        assert [u.completion_tokens for u in usage[3]] == [6, 12]  # every choice's tokens do count
        assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in usage[3])


def test_more_generations_than_may_wait_are_refused_naming_the_field(tmp_path: Path, demo_model_dir: Path,
                                                                      base_host: Any) -> None:
    """prompts x n above ADAPTERFORGE_MAX_QUEUE_DEPTH can never be queued: 422 naming the field, not a 429
    that asks to retry (it used to, on an idle server too); up to the limit is served."""
    settings = serving_settings(tmp_path, demo_model_dir, max_queue_depth=4)
    chat = [{"role": "user", "content": "hi"}]
    refused = [
        ("/v1/completions", {"model": "base", "prompt": ["hello"] * 2, "n": 3}, "n"),
        ("/v1/completions", {"model": "base", "prompt": ["hello"] * 5}, "prompt"),
        ("/v1/completions", {"model": "base", "prompt": ["hello"] * 5, "n": 2}, "prompt"),
        ("/v1/chat/completions", {"model": "base", "messages": chat, "n": 5}, "n"),
        ("/generate", {"prompt": ["hello"] * 5}, "prompt"),
        ("/generate", {"messages": [chat] * 5}, "messages"),
    ]
    with served_app(settings, base_host) as api:
        for path, body, param in refused:
            response = api.post(path, json={**body, "max_tokens" if "model" in body else "max_new_tokens": 2})
            assert response.status_code == 422, (path, body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and "limit of 4" in error["message"], error
        assert api.get("/readyz").json()["checks"]["serving"]["queued"] == 0
        fits = api.post("/v1/completions", json={"model": "base", "prompt": ["hello"] * 2, "n": 2, "max_tokens": 2})
        assert fits.status_code == 200 and len(fits.json()["choices"]) == 4


MULTIBYTE = "héllo wörld 日本 😀"
REPLACEMENT = "\ufffd"


def test_too_long_requests_name_the_openai_field_at_fault(oai: Any) -> None:
    """The field of the OpenAI request, never /generate's max_new_tokens: the length field when the prompt fits
    on its own, else the prompt (``prompt[i]`` in a list) or the messages."""
    long = "hello " * 400
    cases = [
        (oai.completions.create, {"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
        (oai.completions.create, {"prompt": ["hi", long], "max_tokens": 1}, "prompt[1]"),
        (oai.completions.create, {"prompt": long, "max_tokens": 1}, "prompt"),
        (oai.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
         "max_tokens"),
        (oai.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}],
                                       "max_completion_tokens": 100000}, "max_completion_tokens"),
        (oai.chat.completions.create, {"messages": [{"role": "user", "content": long}]}, "messages"),
    ]
    for create, kwargs, param in cases:
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            create(model="base", **kwargs)
        error = caught.value.response.json()["error"]
        assert error["param"] == param and "max_new_tokens" not in error["message"], (kwargs, error)


def test_chat_logprob_bytes_are_each_tokens_own_bytes(oai: Any) -> None:
    """Tokens holding part of a UTF-8 character (they decode alone to U+FFFD) answer their real bytes, so
    the chosen tokens' bytes, joined, decode to the message; their bytes used to be U+FFFD's."""
    messages = [{"role": "user", "content": MULTIBYTE}]
    partial = 0
    for seed in range(8):
        got = oai.chat.completions.create(model="base", messages=messages, max_tokens=12, seed=seed, logprobs=True,
                                          top_logprobs=5, extra_body={"min_tokens": 12})
        choice = got.choices[0]
        content = choice.logprobs.content
        assert bytes(b for t in content for b in t.bytes).decode("utf-8", "replace") == choice.message.content
        for token in content:
            for t in (token, *token.top_logprobs):
                assert bytes(t.bytes).decode("utf-8", "replace") == t.token
                partial += t.token == REPLACEMENT and bytes(t.bytes) != REPLACEMENT.encode()
    assert partial  # the sampled answers did split characters


def test_completion_text_offsets_count_characters_of_the_text(oai: Any) -> None:
    """``text_offset[i]`` is how many characters of ``text`` come before token i; a token that starts inside a
    character points at it. Each token holding part of a character used to count as one."""
    partial = 0
    for seed in range(8):
        got = oai.completions.create(model="base", prompt=MULTIBYTE, max_tokens=12, seed=seed, logprobs=0,
                                     extra_body={"min_tokens": 12})
        choice = got.choices[0]
        offsets, tokens, text = choice.logprobs.text_offset, choice.logprobs.tokens, choice.text
        assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(text)
        for offset, token in zip(offsets, tokens, strict=True):
            if REPLACEMENT in token:
                partial += 1
                assert len(text[offset].encode()) > 1  # the character it starts or continues
            else:
                assert text[offset:offset + len(token)] == token
    assert partial


def test_streamed_completion_logprobs_carry_the_same_text_offsets(oai: Any) -> None:
    for seed in range(4):
        kwargs = {"model": "base", "prompt": MULTIBYTE, "max_tokens": 12, "seed": seed, "logprobs": 0,
                  "extra_body": {"min_tokens": 12}}
        whole = oai.completions.create(**kwargs).choices[0]
        pieces = [c.choices[0] for c in oai.completions.create(stream=True, **kwargs) if c.choices]
        assert "".join(p.text for p in pieces) == whole.text
        streamed = [o for p in pieces if p.logprobs for o in p.logprobs.text_offset]
        assert streamed == whole.logprobs.text_offset


def test_streamed_text_offsets_equal_the_whole_ones_when_a_stop_string_cuts_the_text(oai: Any) -> None:
    """Stops of 2 and 3 characters across token boundaries: the engine streams tokens before the text that
    could still become a stop string; each chunk carries the tokens whose text it has reached, and the
    offsets never point past the text."""
    kwargs = {"model": "support", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0, "logprobs": 1}
    full = oai.completions.create(**kwargs).choices[0]
    text, offsets = full.text, full.logprobs.text_offset
    stops = {text[o - k + 1:o + 1] for o in offsets[2:] for k in (2, 3) if o - k + 1 > 0}
    stops = sorted(s for s in stops if s.isascii() and s.strip() == s and text.find(s) >= 0)[:6]
    assert stops
    for stop in stops:
        whole = oai.completions.create(stop=stop, **kwargs).choices[0]
        assert whole.finish_reason == "stop" and whole.text == text[:text.find(stop)]
        pieces = [c.choices[0] for c in oai.completions.create(stream=True, stop=stop, **kwargs) if c.choices]
        assert "".join(p.text for p in pieces) == whole.text
        streamed = [o for p in pieces if p.logprobs for o in p.logprobs.text_offset]
        tokens = [t for p in pieces if p.logprobs for t in p.logprobs.tokens]
        assert (streamed, tokens) == (whole.logprobs.text_offset, whole.logprobs.tokens), stop
        assert max(streamed) <= len(whole.text)
        seen = 0
        for p in pieces:  # a chunk's tokens start within the text streamed up to it
            seen += len(p.text)
            assert all(o <= seen for o in (p.logprobs.text_offset if p.logprobs else [])), stop


def test_completion_top_logprobs_always_hold_the_sampled_token(oai: Any) -> None:
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements": with logprobs=0, each step's dict is the sampled token alone."""
    for k in (0, 1, 3):
        kwargs = {"model": "support", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 1.0, "seed": 3,
                  "logprobs": k}
        lp = oai.completions.create(**kwargs).choices[0].logprobs
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
            # (tokens decoding to the same text, as partial UTF-8 characters do, share a key: the likeliest's)
            assert top[token] >= logprob - 1e-6 and len(top) <= k + 1
            if k == 0:
                assert top == {token: pytest.approx(logprob)}
        pieces = [c.choices[0] for c in oai.completions.create(stream=True, **kwargs) if c.choices]
        assert [t for p in pieces if p.logprobs for t in p.logprobs.top_logprobs] == lp.top_logprobs


def test_base_model_by_name_and_unknown_model(oai: Any, client: TestClient, demo_model_dir: Path) -> None:
    base = oai.completions.create(model="base", prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert base.choices[0].text == native(client, None, PROMPTS[2], 8)["text"]
    name = str(demo_model_dir)  # the base model's own name here: a path (HF ids have a '/' too)
    by_name = oai.completions.create(model=name, prompt=PROMPTS[2], max_tokens=8, temperature=0)
    assert by_name.choices[0].text == base.choices[0].text
    for model in (name, "base"):  # the base model's entry: id `base`, root its own name
        assert (oai.models.retrieve(model).id, oai.models.retrieve(model).root) == ("base", name)
    escaped = client.get("/v1/models/" + name.replace("/", "%2F"))
    assert escaped.status_code == 200 and escaped.json()["root"] == name
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="nope", prompt="x", max_tokens=2)
    assert info.value.body["param"] == "model"


def test_the_base_models_own_name_is_refused_while_an_adapter_bears_it(
        oai: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A base model with a plain name (``gpt2``) and an adapter of that name (made before the server served it,
    or by a job): `model=` that name would mean either, so it means neither; ``base`` and ``name@N`` still do."""
    from app.serving.host import ServingHost

    monkeypatch.setattr(ServingHost, "name", property(lambda self: "support"))
    for call in (lambda: oai.completions.create(model="support", prompt="x", max_tokens=2),
                 lambda: oai.models.retrieve("support")):
        with pytest.raises(openai.UnprocessableEntityError) as info:
            call()
        assert info.value.body["param"] == "model" and "both" in info.value.body["message"]
    monkeypatch.undo()  # (an adapter is checked against the served base model's name)
    adapter = oai.completions.create(model="support@2", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert adapter.choices[0].text == native(client, "support@2", PROMPTS[0], 6)["text"]
    monkeypatch.setattr(ServingHost, "name", property(lambda self: "plain-base"))  # no adapter bears it
    by_name = oai.completions.create(model="plain-base", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert by_name.choices[0].text == native(client, None, PROMPTS[0], 6)["text"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"echo": True}, "echo"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias"),
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"extra_body": {"min_tokens": 3}}, "min_tokens"),  # above max_tokens=2: never cut down silently
        ({"max_tokens": None, "extra_body": {"min_tokens": 17}}, "min_tokens"),  # above the default of 16
        ({"extra_body": {"unknown_field": 1}}, "unknown_field"),
    ],
)
def test_unsupported_fields_are_refused_not_ignored(oai: Any, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.completions.create(model="base", prompt="x", **{"max_tokens": 2, **kwargs})
    assert info.value.body["param"] == param and param in info.value.body["message"]
    assert "Value error" not in info.value.body["message"]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x", "mood": "happy"}]}, "messages.0.mood"),
    ],
)
def test_chat_refusals_name_the_field(oai: Any, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.chat.completions.create(**{"model": "base", "messages": [{"role": "user", "content": "x"}],
                                       "max_tokens": 2, **kwargs})
    assert info.value.body["param"] == param, info.value.body


@pytest.mark.parametrize(("route", "body", "param"), [
    ("completions", {"prompt": [True, False]}, "prompt"),  # not token ids 1 and 0
    ("completions", {"prompt": "x", "logprobs": True}, "logprobs"),  # not logprobs=1
    ("completions", {"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("completions", {"prompt": "x", "n": 1.0}, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": "3"}, "seed"),
])
def test_values_of_the_wrong_type_are_refused_not_converted(client: TestClient, route: str, body: dict[str, Any],
                                                            param: str) -> None:
    response = client.post(f"/v1/{route}", json={"model": "base", "max_tokens": 2, **body})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_a_participant_name_goes_to_the_chat_template_or_is_refused(oai: Any, client: TestClient,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo template has no use for ``name``: refused (it was dropped without a word). A template that
    uses it gets it."""
    said = [{"role": "user", "content": "hello there", "name": "Alice"}]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.chat.completions.create(model="base", messages=said, max_tokens=4)
    assert info.value.body["param"] == "messages[0].name"
    tokenizer = client.app.state.services.serving.tokenizer  # type: ignore[attr-defined]
    template = tokenizer.chat_template.replace("message['role'] }}", "message['role'] }}{{ message.get('name', '') }}")
    assert template != tokenizer.chat_template
    monkeypatch.setattr(tokenizer, "chat_template", template)
    usage = {name: oai.chat.completions.create(model="base", messages=[{**said[0], "name": name}], max_tokens=2,
                                               temperature=0).usage.prompt_tokens for name in ("Al", "Alice Liddell")}
    assert usage["Alice Liddell"] > usage["Al"]


def test_chat_refuses_tools_and_images(oai: Any) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], tools=[tool])
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.UnprocessableEntityError) as info:
        oai.chat.completions.create(model="base", messages=[{"role": "user", "content": image}])
    assert info.value.body["param"] == "messages[0].content"


def test_wrong_key_is_refused(client: TestClient) -> None:
    other = openai.OpenAI(base_url="http://testserver/v1", api_key="wrong", http_client=client, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        other.models.list()
