"""``POST /generate``'s generation semantics at their edges, against HF ``generate`` and docs/serving.md: a
top_p below float32's range, prompts no encoding holds, a pad token the model's embeddings lack."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.serving.host import ServingHost
from app.serving.sampling import RowSampling, SamplingParams, sample
from app.settings import Settings
from tests.app.conftest import RecordingQueue
from tests.app.serving_helpers import PROMPTS, serving_settings
from tests.conftest import load_model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, base_host: Any) -> Iterator[TestClient]:
    """The app with serving on, answering server errors as HTTP 500 (as a real client sees them)."""
    settings = serving_settings(tmp_path_factory.mktemp("review-gen"), demo_model_dir)
    app = create_app(settings, queue=RecordingQueue(), base_model=base_host)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def host(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingHost]:
    served_host = ServingHost.load(Settings(data_dir=tmp_path_factory.mktemp("review-engine"),
                                            base_model=str(demo_model_dir)))
    yield served_host
    served_host.close()


# ------------------------------------------------------------------ top_p below float32's range
@pytest.mark.parametrize("top_p", [1e-300, 1e-46])
def test_a_tiny_top_p_keeps_the_likeliest_token_as_hf_does(top_p: float) -> None:
    """HF's TopPLogitsWarper always keeps the likeliest token (min_tokens_to_keep=1): any top_p in (0, 1],
    which the API accepts, samples the arg-max when it is tiny. The sampler casts top_p to float32, where
    1e-300 is 0, masks every token and raises on NaN probabilities."""
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    want = int(TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.long), logits.clone()).argmax())
    assert want == int(logits.argmax())
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=0)
    got = sample(logits, [RowSampling(params, params.generator(torch.device("cpu")), 0)], [])
    assert got.tokens == [want]


def test_a_tiny_top_p_request_is_served_the_likeliest_tokens(served: TestClient) -> None:
    """top_p=1e-300 is valid input (0 < top_p <= 1): answered 200 with the greedy tokens (a nucleus of one
    token, as HF's TopPLogitsWarper keeps). It answered 500 internal_error."""
    greedy = served.post("/generate", json={"prompt": PROMPTS[1], "max_new_tokens": 6, "temperature": 0})
    tiny = served.post("/generate", json={"prompt": PROMPTS[1], "max_new_tokens": 6, "temperature": 1.0,
                                          "top_p": 1e-300, "seed": 1})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["tokens"] == greedy.json()["tokens"]


def test_a_tiny_top_p_request_does_not_fail_another_request_in_its_batch(host: ServingHost) -> None:
    """Another client's greedy request, running when a top_p=1e-300 request joins its batch, finishes with
    its tokens (the sampler's error failed the whole step: every running row answered 500)."""
    engine = host.engine
    ids = host.encode_prompt(PROMPTS[2])
    long = SamplingParams(max_new_tokens=60, min_new_tokens=60, temperature=0)
    want = engine.submit(ids, long).wait(60).token_ids
    running = engine.submit(ids, long)
    deadline = time.monotonic() + 30
    while engine.running_rows == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    neighbour = engine.submit(host.encode_prompt(PROMPTS[1]),
                              SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1e-300, seed=1))
    with contextlib.suppress(Exception):  # (its own answer is the test above's)
        neighbour.wait(60)
    assert running.wait(60).token_ids == want


# ------------------------------------------------------------------ prompts the tokenizer cannot take
def post_json(client: TestClient, body: dict[str, Any]) -> Any:
    """POST /generate with ``body`` as JSON text (a lone surrogate goes as its ``\\ud800`` escape)."""
    return client.post("/generate", content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize(("prompt", "param"), [("hello \ud800", "prompt"), (["hello", "a\udc00b"], "prompt[1]")])
def test_a_prompt_with_a_lone_surrogate_is_refused_422_naming_it(served: TestClient, prompt: Any,
                                                                  param: str) -> None:
    """``"\\ud800"`` is valid JSON that no encoding holds; the tokenizer raises TypeError on it. ``messages``
    with the same text answer 422 naming the message's content; ``prompt`` answered 500 internal_error."""
    response = post_json(served, {"prompt": prompt, "max_new_tokens": 2})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param
    chat = post_json(served, {"messages": [{"role": "user", "content": "\ud800"}], "max_new_tokens": 2})
    assert chat.status_code == 422 and chat.json()["error"]["param"] == "messages[0].content", chat.text
    openai = served.post("/v1/completions", content=json.dumps({"model": "base", "prompt": prompt, "max_tokens": 2}),
                         headers={"content-type": "application/json"})
    assert openai.status_code == 422 and openai.json()["error"]["param"] == param, openai.text


# ------------------------------------------------------------------ left padding with the tokenizer's pad id
def test_prompts_of_different_lengths_batch_when_the_tokenizers_pad_token_is_not_in_the_model(
        demo_model_dir: Path, tmp_path: Path) -> None:
    """A tokenizer given a pad token that the model's embeddings do not hold (``add_special_tokens`` without
    ``resize_token_embeddings``, a common way to get a pad token): every prompt generates alone, as with HF
    ``generate``, but two prompts of different lengths prefilled together failed 500 (IndexError): the
    engine fills the left padding with that id, where any id would do (padding is masked)."""
    import shutil

    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(demo_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<|added-pad|>"})
    tokenizer.save_pretrained(model_dir)
    assert tokenizer.pad_token_id == vocab  # one past the model's embedding rows
    served_host = ServingHost.load(Settings(data_dir=tmp_path / "data", base_model=str(model_dir)))
    try:
        engine = served_host.engine
        params = SamplingParams(max_new_tokens=6, min_new_tokens=6, temperature=0)
        prompts = [served_host.encode_prompt("hi"), served_host.encode_prompt(PROMPTS[0] * 3)]
        alone = [engine.submit(ids, params).wait(60).token_ids for ids in prompts]
        together = [h.wait(60).token_ids for h in engine.submit_all([(ids, params, None) for ids in prompts])]
        assert together == alone
    finally:
        served_host.close()


# ------------------------------------------------------------------ PEFT's save_embedding_layers
def test_an_adapter_saved_with_its_embedding_tables_is_served_when_they_are_the_bases(
        served: TestClient, demo_model_dir: Path, tmp_path: Path) -> None:
    """``save_pretrained(save_embedding_layers=True)`` writes the whole input/output tables beside the adapter
    (the engine, as PEFT, writes them into the base on loading). Serving applies no table per request: the
    base's own tables are served exactly as the adapter without them, changed ones refused naming the key."""
    from safetensors.torch import load_file, save_file

    from tests.app.serving_helpers import peft_adapter, upload

    plain = peft_adapter(demo_model_dir, tmp_path / "plain", seed=5, r=4, target_modules=["q_proj"])
    with_tables = tmp_path / "tables"
    with_tables.mkdir()
    (with_tables / "adapter_config.json").write_bytes((plain / "adapter_config.json").read_bytes())
    tensors = load_file(plain / "adapter_model.safetensors")
    base = load_model(demo_model_dir)
    tables = {"base_model.model.model.embed_tokens.weight": base.get_input_embeddings().weight.detach().clone(),
              "base_model.model.lm_head.weight": base.get_output_embeddings().weight.detach().clone()}
    save_file({**tensors, **tables}, str(with_tables / "adapter_model.safetensors"))
    upload(served, "plain-tables", plain)
    upload(served, "with-tables", with_tables)
    body = {"prompt": "hello there", "max_new_tokens": 6, "temperature": 0}
    a = served.post("/generate?adapter=plain-tables", json=body).json()
    b = served.post("/generate?adapter=with-tables", json=body).json()
    assert a["tokens"] == b["tokens"]

    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "adapter_config.json").write_bytes((plain / "adapter_config.json").read_bytes())
    tables["base_model.model.lm_head.weight"] = tables["base_model.model.lm_head.weight"] + 0.5
    save_file({**tensors, **tables}, str(changed / "adapter_model.safetensors"))
    upload(served, "changed-tables", changed)  # a valid PEFT adapter (the engine loads it)
    refused = served.post("/generate?adapter=changed-tables", json=body)
    assert refused.status_code == 422, refused.text
    assert "lm_head.weight" in refused.json()["error"]["message"], refused.json()
