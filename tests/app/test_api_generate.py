"""``POST /generate``: what users of the inference endpoint see.

The oracle is HF PEFT: adapters are written by ``peft``, uploaded through ``POST /adapters``, and the
server's greedy tokens must equal ``PeftModel.generate`` token for token, with log-probabilities
within 1e-4. Batches mixing adapters must give each row what it gives alone; new versions and
moved aliases are served without a restart; deleted versions stop being served.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

pytest.importorskip("peft", reason="peft is the test oracle")

from peft import PeftModel
from safetensors.torch import load_file, save_file
from sqlalchemy import event
from transformers import AutoTokenizer

from app.db import Database
from app.registry.adapters import VersionSpec, create_version, get_version
from app.settings import Settings
from tests.app.serving_helpers import (
    PROMPTS,
    hf_generate,
    peft_adapter,
    served_app,
    serving_settings,
    sse_events,
    upload,
)
from tests.conftest import load_model

N_ADAPTERS = 8
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def adapters(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return [peft_adapter(demo_model_dir, root / f"a{i}", seed=i, r=4 + 2 * (i % 3)) for i in range(N_ADAPTERS)]


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path, base_host: Any,
           adapters: list[Path]) -> Iterator[TestClient]:
    """One app for the module, with every test adapter uploaded as a0..a7."""
    settings = serving_settings(tmp_path_factory.mktemp("served"), demo_model_dir)
    with served_app(settings, base_host) as client:
        for i, folder in enumerate(adapters):
            upload(client, f"a{i}", folder)
        yield client


def generate(client: TestClient, adapter: str | None = None, **body: Any) -> Any:
    params = {"adapter": adapter} if adapter else {}
    return client.post("/generate", params=params, json=body)


def greedy(client: TestClient, adapter: str | None, prompt: str, n: int = 12, **extra: Any) -> Any:
    response = generate(client, adapter, prompt=prompt, max_new_tokens=n, temperature=0, logprobs=True, **extra)
    assert response.status_code == 200, response.text
    return response.json()


# ----------------------------------------------------------------------------------- the peft oracle
@pytest.mark.parametrize("index", [0, 1, 2])
def test_greedy_output_equals_peft_generate(index: int, served: TestClient, adapters: list[Path],
                                            demo_model_dir: Path, tokenizer: Any) -> None:
    prompt = PROMPTS[index]
    peft_model = PeftModel.from_pretrained(load_model(demo_model_dir), adapters[index]).eval()
    want, want_logprobs = hf_generate(peft_model, tokenizer, prompt, 16)
    got = greedy(served, f"a{index}", prompt, 16)
    assert got["adapter"] == f"a{index}@1"
    assert got["tokens"] == want
    assert max(abs(a - b) for a, b in zip(got["logprobs"], want_logprobs, strict=True)) <= LOGPROB_ATOL
    assert got["text"] == tokenizer.decode(want, skip_special_tokens=True)
    assert got["usage"] == {"prompt_tokens": len(tokenizer(prompt)["input_ids"]), "completion_tokens": len(want)}
    assert got["finish_reason"] == ("stop" if want[-1] in peft_model.generation_config.eos_token_id else "length")
    base_tokens, _ = hf_generate(load_model(demo_model_dir), tokenizer, prompt, 16)
    assert want != base_tokens, "the adapter does not change the output: the test could not fail"


def test_float16_adapter_slots_serve_peft_greedy_tokens(tmp_path: Path, demo_model_dir: Path, base_host: Any,
                                                        adapters: list[Path], tokenizer: Any) -> None:
    """``ADAPTERFORGE_ADAPTER_DTYPE=float16``: half the slot memory, products still in float32. The greedy
    tokens are PEFT's (float32) token for token, in a batch mixing adapters and the base model; the
    log-probabilities move by float16's rounding of the adapter weights (1e-3 at most here, against 1e-4
    with float32 slots), and every adapter still changes its output."""
    settings = serving_settings(tmp_path, demo_model_dir, adapter_dtype="float16")
    with served_app(settings, base_host) as client:
        assert client.app.state.services.serving.slotted.weight_dtype == torch.float16  # type: ignore[attr-defined]
        for i in range(3):
            upload(client, f"a{i}", adapters[i])
        refs: list[str | None] = ["a0", "a1", None, "a2"]
        body = {"prompt": PROMPTS[0], "max_new_tokens": 16, "temperature": 0, "logprobs": True}
        answers = concurrently(client, refs, body)
        # a weight float16 cannot hold: the adapter is refused, naming the layer; nothing else changes
        big = tmp_path / "big"
        shutil.copytree(adapters[3], big)
        tensors = load_file(big / "adapter_model.safetensors")
        key = next(k for k in sorted(tensors) if "lora_B" in k)
        tensors[key][0, 0] = 1e6
        save_file(tensors, big / "adapter_model.safetensors")
        upload(client, "big", big)
        refused = generate(client, "big", prompt="x", max_new_tokens=2)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        layer = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
        assert error["code"] == "invalid_adapter" and f"{layer} lora_B (scaled)" in error["message"], error
        assert "torch.float16" in error["message"]
        assert greedy(client, "a0", PROMPTS[0], 16)["tokens"] == answers[0].json()["tokens"]
    for ref, response in zip(refs, answers, strict=True):
        assert response.status_code == 200, response.text
        got = response.json()
        model = load_model(demo_model_dir)
        if ref is not None:
            model = PeftModel.from_pretrained(model, adapters[int(ref[1:])]).eval()
        want, want_logprobs = hf_generate(model, tokenizer, PROMPTS[0], 16)
        assert got["tokens"] == want, ref
        drift = max(abs(a - b) for a, b in zip(got["logprobs"], want_logprobs, strict=True))
        assert drift <= (LOGPROB_ATOL if ref is None else 1e-3), (ref, drift)
    assert len({tuple(a.json()["tokens"]) for a in answers}) == len(refs)  # each adapter changes the output


def test_no_adapter_is_the_base_model(served: TestClient, demo_model_dir: Path, tokenizer: Any) -> None:
    want, want_logprobs = hf_generate(load_model(demo_model_dir), tokenizer, PROMPTS[3], 16)
    got = greedy(served, None, PROMPTS[3], 16)
    assert got["adapter"] is None and got["tokens"] == want
    assert max(abs(a - b) for a, b in zip(got["logprobs"], want_logprobs, strict=True)) <= LOGPROB_ATOL


def concurrently(client: TestClient, refs: list[str | None], body: dict[str, Any]) -> list[Any]:
    """One request per ref, sent together so that they decode in one batch (checked), answers in order."""
    engine = client.app.state.services.serving.engine  # type: ignore[attr-defined]
    engine.peak_rows = 0
    results: dict[int, Any] = {}
    start = threading.Barrier(len(refs))

    def call(i: int) -> None:
        start.wait()
        results[i] = generate(client, refs[i], **body)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(refs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.peak_rows >= len(refs), "the requests did not share a batch"
    return [results[i] for i in range(len(refs))]


def test_batch_mixing_8_adapters_and_the_base_equals_each_alone(served: TestClient) -> None:
    """Nine concurrent clients (8 adapters + base) decode in one batch; each row answers what it answers alone."""
    refs: list[str | None] = [f"a{i}" for i in range(N_ADAPTERS)] + [None]
    body = {"prompt": PROMPTS[0], "max_new_tokens": 48, "min_new_tokens": 48, "temperature": 0, "logprobs": True}
    results = concurrently(served, refs, body)
    alone = [generate(served, ref, **body).json() for ref in refs]
    for i in range(len(refs)):
        mixed = results[i].json()
        assert mixed["tokens"] == alone[i]["tokens"], refs[i]
        assert max(abs(a - b) for a, b in zip(mixed["logprobs"], alone[i]["logprobs"], strict=True)) <= LOGPROB_ATOL
    assert len({tuple(r["tokens"]) for r in alone}) == len(refs), "two adapters gave the same output"


def test_a_list_of_prompts_answers_each_in_order(served: TestClient) -> None:
    batch = generate(served, "a1", prompt=PROMPTS, max_new_tokens=8, temperature=0).json()
    assert batch["adapter"] == "a1@1" and len(batch["results"]) == len(PROMPTS)
    for prompt, result in zip(PROMPTS, batch["results"], strict=True):
        assert result["tokens"] == greedy(served, "a1", prompt, 8)["tokens"]
    assert batch["usage"]["completion_tokens"] == sum(len(r["tokens"]) for r in batch["results"])


def test_chat_messages_use_the_chat_template(served: TestClient, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is two plus two?"}]
    got = generate(served, "a2", messages=messages, max_new_tokens=8, temperature=0).json()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert got["usage"]["prompt_tokens"] == len(ids)
    same = generate(served, "a2", prompt=tokenizer.decode(ids), max_new_tokens=8, temperature=0).json()
    assert got["tokens"] == same["tokens"]


# ------------------------------------------------------------------------------- sampling and stops
def test_seeded_sampling_is_reproducible(served: TestClient) -> None:
    body = {"prompt": PROMPTS[1], "max_new_tokens": 24, "min_new_tokens": 24, "temperature": 1.0, "top_p": 0.9,
            "top_k": 50}
    first = generate(served, "a3", seed=7, **body).json()["tokens"]
    assert generate(served, "a3", seed=7, **body).json()["tokens"] == first
    assert generate(served, "a3", seed=8, **body).json()["tokens"] != first
    assert len(first) == 24


def test_top_k_one_is_greedy_and_logprobs_of_top_tokens(served: TestClient) -> None:
    want = greedy(served, "a4", PROMPTS[2], 10)
    got = generate(served, "a4", prompt=PROMPTS[2], max_new_tokens=10, temperature=1.5, top_k=1, seed=3,
                   top_logprobs=3).json()
    assert got["tokens"] == want["tokens"]
    assert [step[0]["id"] for step in got["top_logprobs"]] == want["tokens"]
    assert all(len(step) == 3 and step[0]["logprob"] >= step[1]["logprob"] for step in got["top_logprobs"])


def test_stop_string_cuts_the_text(served: TestClient) -> None:
    full = greedy(served, "a5", PROMPTS[0], 24, min_new_tokens=24)
    text = full["text"]
    stop = text[5:8]
    assert stop and stop not in text[:5]
    cut = greedy(served, "a5", PROMPTS[0], 24, min_new_tokens=24, stop=[stop, "\u2603never"])
    assert cut["finish_reason"] == "stop" and cut["text"] == text[: text.index(stop)]
    assert len(cut["tokens"]) < 24


def test_min_new_tokens_suppresses_end_of_sequence(served: TestClient) -> None:
    got = generate(served, "a6", prompt=PROMPTS[1], max_new_tokens=30, min_new_tokens=30, temperature=0).json()
    assert len(got["tokens"]) == 30 and got["finish_reason"] == "length"


# ----------------------------------------------------------------------------------------- streaming
def test_streaming_sends_tokens_then_the_full_answer(served: TestClient) -> None:
    want = greedy(served, "a7", PROMPTS[2], 20, min_new_tokens=20)
    response = generate(served, "a7", prompt=PROMPTS[2], max_new_tokens=20, min_new_tokens=20, temperature=0,
                        logprobs=True, stream=True)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    tokens = [e for k, e in events if k == "token"]
    results = [e for k, e in events if k == "result"]
    assert len(tokens) >= 2 and len(results) == 1 and events[-1][0] == "result"
    assert "".join(t["text"] for t in tokens) == want["text"] == results[0]["text"]
    assert [i for t in tokens for i in t["tokens"]] == want["tokens"] == results[0]["tokens"]
    assert [x for t in tokens for x in t["logprobs"]] == pytest.approx(want["logprobs"], abs=LOGPROB_ATOL)


def test_streaming_a_batch_tags_events_with_the_prompt_index(served: TestClient) -> None:
    response = generate(served, "a0", prompt=PROMPTS[:2], max_new_tokens=6, temperature=0, stream=True)
    results = {e["index"]: e for k, e in sse_events(response) if k == "result"}
    assert set(results) == {0, 1}
    for i in (0, 1):
        assert results[i]["tokens"] == greedy(served, "a0", PROMPTS[i], 6)["tokens"]


def test_streaming_with_a_stop_string_never_sends_the_stop(served: TestClient) -> None:
    text = greedy(served, "a1", PROMPTS[3], 24, min_new_tokens=24)["text"]
    stop = text[6:9]
    response = generate(served, "a1", prompt=PROMPTS[3], max_new_tokens=24, min_new_tokens=24, temperature=0,
                        stop=stop, stream=True)
    events = sse_events(response)
    streamed = "".join(e["text"] for k, e in events if k == "token")
    assert streamed == text[: text.index(stop)] == events[-1][1]["text"]


# ---------------------------------------------------------------------------- versions, aliases, deletes
def test_new_version_and_moved_alias_are_served_without_restart(served: TestClient, adapters: list[Path]) -> None:
    upload(served, "swap", adapters[0])
    v1 = greedy(served, "swap", PROMPTS[1])
    assert v1["adapter"] == "swap@1" and v1["tokens"] == greedy(served, "a0", PROMPTS[1])["tokens"]
    upload(served, "swap", adapters[1])
    v2 = greedy(served, "swap", PROMPTS[1])
    assert v2["adapter"] == "swap@2" and v2["tokens"] == greedy(served, "a1", PROMPTS[1])["tokens"]
    assert v2["tokens"] != v1["tokens"]
    assert served.put("/adapters/swap/aliases/prod", json={"version": 1}).status_code == 201  # created
    assert greedy(served, "swap@prod", PROMPTS[1])["tokens"] == v1["tokens"]
    assert served.put("/adapters/swap/aliases/prod", json={"version": 2}).status_code == 200
    moved = greedy(served, "swap@prod", PROMPTS[1])
    assert moved["adapter"] == "swap@2" and moved["tokens"] == v2["tokens"]
    assert greedy(served, "swap@1", PROMPTS[1])["tokens"] == v1["tokens"]


def test_deleted_version_is_evicted_and_no_longer_served(served: TestClient, adapters: list[Path]) -> None:
    version = upload(served, "gone", adapters[2])
    assert greedy(served, "gone", PROMPTS[0])["adapter"] == "gone@1"
    bank = served.app.state.services.serving.bank
    assert bank.where(version["id"]) == "device"
    assert served.delete("/adapters/gone/versions/1").status_code == 200
    assert bank.where(version["id"]) == "store"
    response = generate(served, "gone", prompt="x", max_new_tokens=2)
    assert response.status_code == 404 and response.json()["error"]["param"] == "adapter"


def test_a_version_registered_by_another_process_is_served_by_the_next_request(served: TestClient,
                                                                               adapters: list[Path]) -> None:
    """A request for a version this process has served reads only which version its ref names (one
    query); a version another process registers (a worker finishing a job: its own engine, straight
    to the database) is what the very next request gets."""
    upload(served, "elsewhere", adapters[3])
    first = greedy(served, "elsewhere", PROMPTS[2])
    assert first["tokens"] == greedy(served, "a3", PROMPTS[2])["tokens"]
    services = served.app.state.services
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(services.db.engine, "before_cursor_execute", record)
    try:
        again = greedy(served, "elsewhere", PROMPTS[2])
    finally:
        event.remove(services.db.engine, "before_cursor_execute", record)
    assert again["adapter"] == "elsewhere@1" and again["tokens"] == first["tokens"]
    assert len(statements) == 1, statements
    worker = Database(services.db.url)
    try:
        with worker.session() as s:
            a4 = get_version(s, "a4", 1)  # its files, registered again under this name
            create_version(s, "elsewhere", VersionSpec(method=a4.method, config=dict(a4.config),
                                                       files=dict(a4.files), size=a4.size, base_model=a4.base_model))
    finally:
        worker.dispose()
    swapped = greedy(served, "elsewhere", PROMPTS[2])
    assert swapped["adapter"] == "elsewhere@2"
    assert swapped["tokens"] == greedy(served, "a4", PROMPTS[2])["tokens"] != first["tokens"]


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("adapter", "body", "status", "param"),
    [
        ("nope", {"prompt": "x"}, 404, "adapter"),
        ("a0@9", {"prompt": "x"}, 404, "adapter"),
        ("a0@nope", {"prompt": "x"}, 404, "adapter"),
        ("bad name!", {"prompt": "x"}, 422, "adapter"),
        (None, {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 422, None),
        (None, {}, 422, None),
        (None, {"prompt": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
        (None, {"prompt": "x", "temperature": -1}, 422, "temperature"),
        (None, {"prompt": "x", "top_p": 0}, 422, "top_p"),
        (None, {"prompt": "x", "stop": [""]}, 422, None),
        (None, {"prompt": "x", "min_new_tokens": 5, "max_new_tokens": 2}, 422, None),
        (None, {"prompt": "x", "best_of": 2}, 422, "best_of"),
        (None, {"prompt": "x", "max_new_tokens": 300}, 422, "max_new_tokens"),  # context is 256
        (None, {"prompt": ""}, 422, "prompt"),
    ],
)
def test_bad_requests_answer_4xx_naming_the_field(served: TestClient, adapter: str | None, body: dict[str, Any],
                                                  status: int, param: str | None) -> None:
    response = generate(served, adapter, **body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_a_misspelt_adapter_parameter_is_refused_not_served_by_the_base_model(served: TestClient) -> None:
    response = served.post("/generate", params={"adaptor": "a0"}, json={"prompt": "x", "max_new_tokens": 2})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "adaptor"
    assert "`adapter`" in response.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": ["hello", ""], "max_new_tokens": 2}, "prompt[1]"),  # which prompt of the batch
    ({"prompt": ["hello", "x", "hello " * 400], "max_new_tokens": 2}, "prompt[2]"),
    ({"prompt": "hello " * 400, "max_new_tokens": 1}, "prompt"),  # no max_new_tokens could make it fit
    ({"prompt": "hello", "max_new_tokens": 255}, "max_new_tokens"),  # the prompt fits, not with that many more
    ({"messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "hello " * 400}]],
      "max_new_tokens": 2}, "messages[1]"),
])
def test_a_prompt_too_long_or_empty_is_named_or_max_new_tokens_when_it_is_at_fault(
        served: TestClient, body: dict[str, Any], param: str) -> None:
    response = generate(served, **body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"], error


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "max_new_tokens": True}, "max_new_tokens"),  # not 1
    ({"prompt": "x", "max_new_tokens": "4"}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 4.0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 2, "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "max_new_tokens": 2, "logprobs": 1}, "logprobs"),  # not true
])
def test_values_of_the_wrong_type_are_refused_not_converted(served: TestClient, body: dict[str, Any],
                                                            param: str) -> None:
    response = generate(served, **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


def test_adapter_base_is_not_found_and_says_how_to_ask_for_the_base_model(served: TestClient) -> None:
    response = generate(served, "base", prompt="x", max_new_tokens=2)
    assert response.status_code == 404 and response.json()["error"]["param"] == "adapter"
    assert "without `adapter`" in response.json()["error"]["message"]


@pytest.mark.parametrize("order", [("nope", "a0"), ("a0", "nope")])
def test_an_adapter_parameter_given_twice_is_refused_not_resolved_to_one_of_them(
        served: TestClient, order: tuple[str, str]) -> None:
    response = served.post("/generate", params=[("adapter", order[0]), ("adapter", order[1])],
                           json={"prompt": "x", "max_new_tokens": 2})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "adapter" and "2 times" in error["message"]


def test_uploads_are_judged_on_their_own_files_whatever_came_before(
        tmp_path: Path, demo_model_dir: Path, base_host: Any, tokenizer: Any) -> None:
    """LoRA on a module and a modules_to_save copy of it, in either order, and PEFT's default save of an
    embedding LoRA (which also writes the unchanged table): each upload is accepted and served as PEFT serves it."""
    made = {
        "head-lora": peft_adapter(demo_model_dir, tmp_path / "hl", seed=31, r=4, target_modules=["q_proj", "lm_head"]),
        "head-copy": peft_adapter(demo_model_dir, tmp_path / "hc", seed=32, r=4, target_modules=["q_proj"],
                                  modules_to_save=["lm_head"]),
        "embed-lora": peft_adapter(demo_model_dir, tmp_path / "el", seed=33, r=4,
                                   target_modules=["q_proj", "embed_tokens"]),
        "embed-copy": peft_adapter(demo_model_dir, tmp_path / "ec", seed=34, r=4, target_modules=["q_proj"],
                                   modules_to_save=["embed_tokens"]),
    }
    assert any("base_layer" in k for k in load_file(made["embed-lora"] / "adapter_model.safetensors"))
    order = ["head-lora", "head-copy", "embed-copy", "embed-lora"]
    with served_app(serving_settings(tmp_path, demo_model_dir), base_host) as client:
        for name in order:
            upload(client, name, made[name])
        upload(client, "head-lora-again", made["head-lora"])  # after a copy of the head was checked
        for name in order:
            model = PeftModel.from_pretrained(load_model(demo_model_dir), made[name]).eval()
            want, _ = hf_generate(model, tokenizer, PROMPTS[1], 8)
            assert greedy(client, name, PROMPTS[1], n=8)["tokens"] == want, name
        assert greedy(client, "head-lora-again", PROMPTS[1], n=8) == greedy(client, "head-lora", PROMPTS[1], n=8) | {
            "adapter": "head-lora-again@1"}


def test_modules_to_save_match_as_peft_matches_them_and_whole_blocks_are_refused_at_upload(
        tmp_path: Path, demo_model_dir: Path, base_host: Any, tokenizer: Any) -> None:
    """PEFT saves every module whose name ends with an entry: ``norm`` saves the input and post-attention norms
    too (it was refused, naming the files). An entry naming a block of modules (``mlp``, ``layers.0``) is refused
    at upload naming modules_to_save: it was accepted, then served or refused at generate time depending on the
    adapters served before it, and failed base-model rows in a batch beside it."""
    norm = peft_adapter(demo_model_dir, tmp_path / "norm", seed=51, r=4, target_modules=["q_proj"],
                        modules_to_save=["norm"])
    plain = peft_adapter(demo_model_dir, tmp_path / "plain", seed=52, r=4, target_modules="all-linear")
    blocks = {name: peft_adapter(demo_model_dir, tmp_path / name.replace(".", "_"), seed=53, r=4,
                                 target_modules=["q_proj"], modules_to_save=[name]) for name in ("mlp", "layers.0")}
    with served_app(serving_settings(tmp_path, demo_model_dir), base_host) as client:
        upload(client, "plain", plain)
        want_plain = greedy(client, "plain", PROMPTS[1], n=8)["tokens"]
        for name, folder in blocks.items():
            files = [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
            refused = client.post("/adapters", files=[("name", (None, "block")), *files])
            assert refused.status_code == 422 and refused.json()["error"]["param"] == "modules_to_save", name
        upload(client, "norm", norm)
        model = PeftModel.from_pretrained(load_model(demo_model_dir), norm).eval()
        want, _ = hf_generate(model, tokenizer, PROMPTS[1], 8)
        assert greedy(client, "norm", PROMPTS[1], n=8)["tokens"] == want
        assert greedy(client, "plain", PROMPTS[1], n=8)["tokens"] == want_plain


def test_stored_weights_that_no_longer_match_their_sha256_answer_500_and_are_not_served(
        tmp_path: Path, demo_model_dir: Path, base_host: Any, adapters: list[Path]) -> None:
    """Bytes flipped in the store were served (other tokens, 200); a truncated file answered 422 blaming the
    base model. The store names each file by its sha256: a file that no longer has it is the server's fault."""
    import hashlib

    with served_app(serving_settings(tmp_path, demo_model_dir), base_host) as client:
        upload(client, "dmg", adapters[0])
        data = (adapters[0] / "adapter_model.safetensors").read_bytes()
        stored = client.app.state.services.store.path(hashlib.sha256(data).hexdigest())
        assert stored.read_bytes() == data
        damaged = bytearray(data)
        damaged[-8] ^= 0x40  # one bit of the last weight
        stored.write_bytes(bytes(damaged))
        for _ in range(2):  # (nothing of it is cached)
            answer = generate(client, "dmg", prompt=PROMPTS[0], max_new_tokens=4)
            assert answer.status_code == 500, answer.text
            assert answer.json()["error"]["code"] == "internal_error" and "damaged" in answer.json()["error"]["message"]
        stored.write_bytes(data[: len(data) // 2])
        assert generate(client, "dmg", prompt=PROMPTS[0], max_new_tokens=4).status_code == 500
        stored.write_bytes(data)
        assert greedy(client, "dmg", PROMPTS[0], n=4)["adapter"] == "dmg@1"


def test_copies_of_layers_called_with_more_than_one_input_are_refused_at_upload(
        tmp_path: Path, demo_model_dir: Path, base_host: Any, tokenizer: Any) -> None:
    """A copy of ``rotary_emb`` (called with ``position_ids``, answering a tuple) was accepted and served alone,
    then failed every row of a batch it shared, other users' included, with a 500. Refused at upload naming
    modules_to_save; a copy of a one-input layer (``act_fn``) is served beside others, as PEFT serves it."""
    rotary = peft_adapter(demo_model_dir, tmp_path / "rotary", seed=61, r=4, target_modules=["q_proj"],
                          modules_to_save=["rotary_emb"])
    act = peft_adapter(demo_model_dir, tmp_path / "act", seed=62, r=4, target_modules=["q_proj"],
                       modules_to_save=["act_fn"])
    with served_app(serving_settings(tmp_path, demo_model_dir), base_host) as client:
        files = [("files", (n, (rotary / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
        refused = client.post("/adapters", files=[("name", (None, "rotary")), *files])
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["param"] == "modules_to_save" and "position_ids" in error["message"], error
        upload(client, "act", act)
        model = PeftModel.from_pretrained(load_model(demo_model_dir), act).eval()
        want, _ = hf_generate(model, tokenizer, PROMPTS[1], 8)
        both = generate(client, "act", prompt=[PROMPTS[1], PROMPTS[2]], max_new_tokens=8, temperature=0)
        assert both.status_code == 200 and both.json()["results"][0]["tokens"] == want, both.text


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "hi", "min_new_tokens": 10, "max_new_tokens": 5}, "min_new_tokens"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": ["x"] * 65}, "prompt"),
    ({"prompt": "hi", "stop": ["s"] * 17}, "stop"),
    ({"prompt": 5}, "prompt"),  # (not pydantic's "prompt.str")
    ({"messages": [{"role": "user", "content": "hi", "mood": 1}]}, "messages.0.mood"),
])
def test_refusals_name_the_field(served: TestClient, body: dict[str, Any], param: str) -> None:
    response = generate(served, None, **body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == param and param.split(".")[0] in error["message"], error
    assert "Value error" not in error["message"]


def test_adapter_made_for_another_base_model_is_refused(served: TestClient, adapters: list[Path]) -> None:
    services = served.app.state.services
    files = upload(served, "other-base", adapters[0])["files"]
    with services.db.session() as session:
        create_version(session, "other-base", VersionSpec("lora", {}, files, 0, base_model="some/other-model"))
    response = generate(served, "other-base@2", prompt="x", max_new_tokens=2)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "incompatible_base_model"
    assert "some/other-model" in response.json()["error"]["message"]


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga"])
def test_adapter_whose_init_rewrote_the_base_is_refused(init: str, served: TestClient, adapters: list[Path],
                                                        tmp_path: Path) -> None:
    """Its weights only fit the base as its initialisation rewrote it: serving them on ours would be wrong. The
    upload is refused; a version that reached the registry another way is refused when asked for."""
    folder = tmp_path / init
    shutil.copytree(adapters[0], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    files = [("files", (n, (folder / n).read_bytes())) for n in ("adapter_config.json", "adapter_model.safetensors")]
    refused = served.post("/adapters", files=[("name", (None, f"init-{init}")), *files])
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "init_lora_weights", refused.text
    assert served.get(f"/adapters/init-{init}").status_code == 404  # nothing stored
    stored = upload(served, f"init-{init}", adapters[0])["files"]
    with served.app.state.services.db.session() as session:  # type: ignore[attr-defined]
        create_version(session, f"init-{init}", VersionSpec("lora", {**config, "init_lora_weights": init}, stored, 0))
    response = generate(served, f"init-{init}@2", prompt="x", max_new_tokens=2)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_adapter"
    assert f"init_lora_weights={init!r}" in response.json()["error"]["message"]


def test_rank_above_the_server_limit_is_refused(tmp_path: Path, demo_model_dir: Path, base_host: Any,
                                                adapters: list[Path]) -> None:
    settings = serving_settings(tmp_path, demo_model_dir, max_lora_rank=4)
    with served_app(settings, base_host) as client:
        upload(client, "big", adapters[1])  # r=6
        response = generate(client, "big", prompt="x", max_new_tokens=2)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "rank_too_large"
        assert "ADAPTERFORGE_MAX_LORA_RANK" in response.json()["error"]["message"]
        assert generate(client, None, prompt="x", max_new_tokens=2).status_code == 200


def test_cpu_kernels_off_serves_the_same_tokens_through_torch(tmp_path: Path, demo_model_dir: Path, base_host: Any,
                                                            adapters: list[Path], served: TestClient,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixed batches decode through the compiled CPU kernel where it can be built; with
    ``ADAPTERFORGE_CPU_KERNELS=off`` they never call it and answer what each request answers alone."""
    from adapters_core.serving import cpu_bgmv

    calls = {"n": 0}
    original = cpu_bgmv.BankCall.__call__

    def counting(self: cpu_bgmv.BankCall, x: Any, out: Any, slots: Any, highest: int) -> Any:
        calls["n"] += 1
        return original(self, x, out, slots, highest)

    monkeypatch.setattr(cpu_bgmv.BankCall, "__call__", counting)
    refs: list[str | None] = ["a0", "a1", None, "a2"]
    body = {"prompt": PROMPTS[1], "max_new_tokens": 12, "min_new_tokens": 12, "temperature": 0, "logprobs": True}
    concurrently(served, refs, body)
    assert (calls["n"] > 0) == (cpu_bgmv._cpu_supported() is None)
    alone = [generate(served, ref, **body).json() for ref in refs]
    calls["n"] = 0
    with served_app(serving_settings(tmp_path, demo_model_dir, cpu_kernels="off"), base_host) as client:
        for i in range(3):
            upload(client, f"a{i}", adapters[i])
        mixed = [r.json() for r in concurrently(client, refs, body)]
    assert calls["n"] == 0
    for i, ref in enumerate(refs):
        assert mixed[i]["tokens"] == alone[i]["tokens"], ref
        assert max(abs(a - b) for a, b in zip(mixed[i]["logprobs"], alone[i]["logprobs"], strict=True)) <= LOGPROB_ATOL


def _triton_interpreted() -> bool:
    from adapters_core.serving.gpu_bgmv import KernelUnavailable, load_gpu_bgmv_or_raise

    try:
        return load_gpu_bgmv_or_raise().interpret
    except KernelUnavailable:
        return False


@pytest.mark.skipif(not _triton_interpreted(), reason="needs Triton, run by its interpreter (TRITON_INTERPRET=1)")
def test_gpu_kernels_on_serves_the_same_tokens_through_the_fused_kernel(
        tmp_path: Path, demo_model_dir: Path, base_host: Any, adapters: list[Path], served: TestClient) -> None:
    """``ADAPTERFORGE_GPU_KERNELS=on`` requires the fused decode kernel; here, on a CPU, Triton's interpreter runs
    it: a mixed batch through the whole server answers what each request answers alone on the default paths
    (tokens, and log-probabilities to 1e-4), and its decode steps were the kernel's."""
    refs: list[str | None] = ["a0", "a1", None, "a2"]
    body = {"prompt": PROMPTS[2], "max_new_tokens": 6, "min_new_tokens": 6, "temperature": 0, "logprobs": True}
    alone = [generate(served, ref, **body).json() for ref in refs]
    settings = serving_settings(tmp_path, demo_model_dir, cpu_kernels="off", gpu_kernels="on")
    from adapters_core.serving.gpu_bgmv import load_gpu_bgmv_or_raise

    before_start = load_gpu_bgmv_or_raise().launches
    with served_app(settings, base_host) as client:
        kernel = client.app.state.services.serving.slotted.gpu_kernel  # type: ignore[attr-defined]
        assert kernel is not None
        assert kernel.launches > before_start  # warmed up (its variants compiled) before taking requests
        for i in range(3):
            upload(client, f"a{i}", adapters[i])
        launches = kernel.launches
        mixed = [r.json() for r in concurrently(client, refs, body)]
        assert kernel.launches > launches
        assert client.get("/readyz").json()["checks"]["serving"]["lora_kernel"] == "triton"
    for i, ref in enumerate(refs):
        assert mixed[i]["tokens"] == alone[i]["tokens"], ref
        assert max(abs(a - b) for a, b in zip(mixed[i]["logprobs"], alone[i]["logprobs"], strict=True)) <= LOGPROB_ATOL


# --------------------------------------------------------------------------- slots, eviction, overload
def test_more_adapters_than_slots_are_evicted_and_reloaded(tmp_path: Path, demo_model_dir: Path, base_host: Any,
                                                           adapters: list[Path], served: TestClient) -> None:
    one = Path(adapters[0]) / "adapter_model.safetensors"
    settings = serving_settings(tmp_path, demo_model_dir, adapter_slots=2,
                                adapter_host_cache_bytes=2 * one.stat().st_size)
    want = {i: greedy(served, f"a{i}", PROMPTS[0])["tokens"] for i in range(5)}
    with served_app(settings, base_host) as client:
        for i in range(5):
            upload(client, f"a{i}", adapters[i])
        for _ in range(2):
            for i in range(5):
                assert greedy(client, f"a{i}", PROMPTS[0])["tokens"] == want[i]
        metrics = client.get("/metrics").text
    evictions = {tier: _metric(metrics, "adapterforge_adapter_cache_total", tier=tier, event="eviction")
                 for tier in ("device", "host")}
    assert evictions["device"] >= 8 and evictions["host"] >= 1, evictions
    assert _metric(metrics, "adapterforge_adapter_cache_total", tier="host", event="miss") >= 6


def test_cache_metrics_count_one_lookup_per_request_in_each_tier(tmp_path: Path, demo_model_dir: Path,
                                                                  base_host: Any, adapters: list[Path]) -> None:
    """The first request reads its adapter from the store (a miss in both tiers); the next ones find it
    in host memory and in a slot: one hit per tier per request, not two."""
    with served_app(serving_settings(tmp_path, demo_model_dir), base_host) as client:
        upload(client, "a0", adapters[0])
        for _ in range(3):
            greedy(client, "a0", PROMPTS[0], n=2)
        greedy(client, None, PROMPTS[0], n=2)  # the base model looks nothing up
        metrics = client.get("/metrics").text
    counts = {(tier, event): _metric(metrics, "adapterforge_adapter_cache_total", tier=tier, event=event)
              for tier in ("host", "device") for event in ("hit", "miss")}
    assert counts == {("host", "hit"): 2, ("host", "miss"): 1, ("device", "hit"): 2, ("device", "miss"): 1}


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_overload_answers_429_with_retry_after(tmp_path: Path, demo_model_dir: Path, base_host: Any,
                                              adapters: list[Path]) -> None:
    settings = serving_settings(tmp_path, demo_model_dir, max_batch_size=1, max_queue_depth=1)
    with served_app(settings, base_host) as client:
        engine = client.app.state.services.serving.engine
        bank = client.app.state.services.serving.bank
        version_id = upload(client, "cold", adapters[0])["id"]
        long = {"prompt": "x", "max_new_tokens": 200, "min_new_tokens": 200, "temperature": 0}
        answers: list[Any] = []
        threads = [threading.Thread(target=lambda: answers.append(generate(client, None, **long))) for _ in range(2)]
        threads[0].start()
        _wait(lambda: engine.running_rows == 1)
        threads[1].start()
        _wait(lambda: engine.queue_depth == 1)
        refused = generate(client, None, prompt="y", max_new_tokens=2)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limited" and int(refused.headers["Retry-After"]) >= 1
        on_adapter = generate(client, "cold", prompt="y", max_new_tokens=2)
        assert on_adapter.status_code == 429, on_adapter.text
        assert bank.where(version_id) == "store"  # refused before its files were read and laid out for nothing
        for t in threads:
            t.join()
        assert [a.status_code for a in answers] == [200, 200]
        assert generate(client, None, prompt="y", max_new_tokens=2).status_code == 200


def test_generation_metrics_count_what_happened_to_refused_cancelled_and_failed_requests(
        tmp_path: Path, demo_model_dir: Path, base_host: Any) -> None:
    """A batch refused with 429 leaves nothing queued and counts nowhere (it was counted as a cancelled
    generation, its prompt as read); a generation cancelled while it waits counts as cancelled, with no prompt
    tokens read; a failed one counts as an error, with what it read and generated (it counted nowhere)."""
    from app.serving.sampling import SamplingParams

    settings = serving_settings(tmp_path, demo_model_dir, max_batch_size=1, max_queue_depth=2)
    with served_app(settings, base_host) as client:
        engine = client.app.state.services.serving.engine  # type: ignore[attr-defined]

        def counts() -> dict[str, float]:
            text = client.get("/metrics").text
            return {reason: _metric(text, "adapterforge_generate_requests_total", adapter="base", finish_reason=reason)
                    for reason in ("length", "cancelled", "error")} | {
                    name: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))
                    for name in ("adapterforge_prompt_tokens_total", "adapterforge_generated_tokens_total")}

        long = SamplingParams(max_new_tokens=150, min_new_tokens=150, temperature=0)
        running = engine.submit([5, 6, 7], long)
        _wait(lambda: engine.running_rows == 1)
        waiting = engine.submit([5, 6, 7, 8, 9], SamplingParams(max_new_tokens=2))
        before = counts()
        refused = generate(client, None, prompt=["hello there", "z"], max_new_tokens=2)  # 2 do not fit in 1 place
        assert refused.status_code == 429, refused.text
        assert engine.queue_depth == 1 and counts() == before
        waiting.cancel()
        assert waiting.wait(30).finish_reason == "cancelled"
        assert counts() == {**before, "cancelled": before["cancelled"] + 1}  # no prompt tokens: never read
        assert len(running.wait(60).token_ids) == 150
        before = counts()
        original = engine._forward
        calls = {"n": 0}

        def fail_the_third(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:  # the prefill and one decode step went through: two tokens
                raise RuntimeError("simulated device failure")
            return original(*args, **kwargs)

        engine._forward = fail_the_third
        try:
            failed = generate(client, None, prompt="hello there", max_new_tokens=6, min_new_tokens=6)
        finally:
            engine._forward = original
        assert failed.status_code == 500
        prompt = len(client.app.state.services.serving.encode_prompt("hello there"))  # type: ignore[attr-defined]
        assert counts() == {**before, "error": before["error"] + 1,
                            "adapterforge_prompt_tokens_total": before["adapterforge_prompt_tokens_total"] + prompt,
                            "adapterforge_generated_tokens_total": before["adapterforge_generated_tokens_total"] + 2}


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_metrics_count_requests_tokens_and_latencies(served: TestClient) -> None:
    greedy(served, "a3", PROMPTS[0], 5, min_new_tokens=5)
    text = served.get("/metrics").text
    assert _metric(text, "adapterforge_generate_requests_total", adapter="a3", finish_reason="length") >= 1
    for name in ("adapterforge_generated_tokens_total", "adapterforge_prompt_tokens_total",
                 "adapterforge_time_to_first_token_seconds_count", "adapterforge_inter_token_latency_seconds_count"):
        assert any(line.startswith(name) and float(line.split()[-1]) > 0 for line in text.splitlines()), name
    assert "adapterforge_generate_queue_depth" in text and "adapterforge_adapter_slots_used" in text
    ready = served.get("/readyz").json()
    from adapters_core.serving.cpu_bgmv import load_bgmv

    kernel = "cpu" if load_bgmv() is not None else "torch"  # (the compiled CPU kernel where it builds)
    assert ready["checks"]["serving"] == {"ok": True, "enabled": True, "queued": 0, "running": 0,
                                          "lora_kernel": kernel}


def test_pinned_adapters_load_at_start_and_keep_their_slot(tmp_path: Path, demo_model_dir: Path, base_host: Any,
                                                          adapters: list[Path]) -> None:
    settings = serving_settings(tmp_path, demo_model_dir, adapter_slots=2)
    with served_app(settings, base_host) as client:
        pinned_id = upload(client, "keep", adapters[0])["id"]
        other_ids = [upload(client, name, adapters[i])["id"] for i, name in ((1, "other"), (2, "third"))]
    pinned = Settings(**{**settings.model_dump(), "pinned_adapters": ["keep"]})  # (validated, unlike model_copy)
    with served_app(pinned, base_host) as client:
        bank = client.app.state.services.serving.bank
        assert bank.where(pinned_id) == "host"  # read and checked at start
        assert greedy(client, "keep", PROMPTS[0])["adapter"] == "keep@1"
        assert bank.where(pinned_id) == "device"
        for name in ("other", "third", "other"):  # the other adapters take turns in the one unpinned slot
            assert greedy(client, name, PROMPTS[1])["adapter"] == f"{name}@1"
            assert bank.where(pinned_id) == "device"
        assert sorted(bank.where(v) for v in other_ids) == ["device", "host"]
        assert greedy(client, "keep", PROMPTS[1])["adapter"] == "keep@1"
        serving = client.get("/readyz").json()["checks"]["serving"]  # (counts: the probe needs no key)
        assert (serving["pinned"], serving["pinned_missing"]) == (1, 0)


def test_pinning_every_slot_is_refused_at_start(tmp_path: Path, demo_model_dir: Path) -> None:
    """With every slot pinned, every other adapter would answer 503 (with a Retry-After that never helps)."""
    with pytest.raises(ValueError, match="pin fewer than adapter_slots"):
        serving_settings(tmp_path, demo_model_dir, adapter_slots=2, pinned_adapters=["a", "b@prod"])
    assert serving_settings(tmp_path, demo_model_dir, adapter_slots=2, pinned_adapters=["a", "a"]).adapter_slots == 2


def test_a_pinned_ref_that_names_no_adapter_does_not_keep_the_server_from_starting(
        tmp_path: Path, demo_model_dir: Path, base_host: Any, adapters: list[Path],
        caplog: pytest.LogCaptureFixture) -> None:
    """Deleting a pinned adapter (or configuring one before it is uploaded) must not break the next start."""
    settings = serving_settings(tmp_path, demo_model_dir, adapter_slots=3)
    with served_app(settings, base_host) as client:
        upload(client, "keep", adapters[0])
        assert client.delete("/adapters/keep").status_code == 200
    pinned = Settings(**{**settings.model_dump(), "pinned_adapters": ["keep", "later"]})
    with caplog.at_level(logging.WARNING, logger="app.main"), served_app(pinned, base_host) as client:
        serving = client.get("/readyz").json()["checks"]["serving"]
        assert (serving["pinned"], serving["pinned_missing"]) == (0, 2) and "keep" not in json.dumps(serving)
        assert greedy(client, None, PROMPTS[0])["adapter"] is None
        upload(client, "later", adapters[1])
        assert greedy(client, "later", PROMPTS[0])["adapter"] == "later@1"
    warned = [r.getMessage() for r in caplog.records if "ADAPTERFORGE_PINNED_ADAPTERS" in r.getMessage()]
    assert len(warned) == 2 and "'keep'" in warned[0] and "'later'" in warned[1], warned
