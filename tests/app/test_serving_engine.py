"""The generation engine on its own: rows joining a running batch, sampling rules, text and stops."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import torch

from adapters_core.errors import ConfigError
from app.serving.engine import GenerationEngine
from app.serving.errors import RequestTooLarge
from app.serving.host import ServedVersion, ServingHost
from app.serving.sampling import RowSampling, SamplingParams, sample
from app.serving.text import TextTracker
from app.settings import Settings
from app.storage import LocalArtifactStore
from tests.app.serving_helpers import peft_adapter, sentencepiece_style_model


@pytest.fixture(scope="module")
def host(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingHost]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("engine"), base_model=str(demo_model_dir))
    served = ServingHost.load(settings)
    yield served
    served.close()


def alone(engine: GenerationEngine, ids: list[int], params: SamplingParams) -> list[int]:
    return engine.submit(ids, params).wait(60).token_ids


def test_rows_joining_a_running_batch_generate_what_they_generate_alone(host: ServingHost) -> None:
    """B (shorter prompt) and C (longer than A's cache) join while A decodes; A leaves first, B and C go on."""
    engine = host.engine
    greedy = SamplingParams(max_new_tokens=60, min_new_tokens=60, temperature=0)
    prompts = {"a": host.encode_prompt("The quick brown fox jumps over"), "b": host.encode_prompt("hi"),
               "c": host.encode_prompt("What is the capital of France? " * 6)}
    want = {k: alone(engine, ids, greedy) for k, ids in prompts.items()}
    a = engine.submit(prompts["a"], SamplingParams(max_new_tokens=30, min_new_tokens=30, temperature=0))
    while engine.running_rows == 0:
        time.sleep(0.001)
    time.sleep(0.01)  # A has decoded some steps: its cache is longer than B's prompt
    b, c = engine.submit(prompts["b"], greedy), engine.submit(prompts["c"], greedy)
    assert a.wait(60).token_ids == want["a"][:30]
    assert b.wait(60).token_ids == want["b"]
    assert c.wait(60).token_ids == want["c"]
    assert engine.peak_rows >= 2


def test_request_longer_than_the_context_is_refused(host: ServingHost) -> None:
    with pytest.raises(RequestTooLarge, match="context length of 256"):
        host.engine.submit([5] * 200, SamplingParams(max_new_tokens=100))


def rows(*params: SamplingParams) -> list[RowSampling]:
    return [RowSampling(p, p.generator(torch.device("cpu")), 0) for p in params]


def test_top_k_and_top_p_keep_sampling_inside_their_sets() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(3, 1)
    seen: list[set[int]] = [set(), set(), set()]
    params = (SamplingParams(top_k=2, seed=1), SamplingParams(top_p=0.7, seed=2), SamplingParams(seed=3))
    state = rows(*params)
    for _ in range(400):
        for i, token in enumerate(sample(logits, state, eos_ids=[]).tokens):
            seen[i].add(token)
    assert seen == [{0, 1}, {0, 1}, {0, 1, 2, 3}]


def test_top_k_1_draws_among_tokens_tied_for_the_best_as_hf_does() -> None:
    """HF's TopKLogitsWarper(1) keeps every token tied with the best: sampling draws among them (it was treated as
    greedy: always the lowest id). Without a tie, top_k=1 is the arg-max."""
    tied = torch.tensor([[3.0, 3.0, 3.0, 0.0]])
    drawn = {sample(tied, rows(SamplingParams(top_k=1, seed=seed)), []).tokens[0] for seed in range(100)}
    assert drawn == {0, 1, 2}
    plain = torch.tensor([[1.0, 3.0, 2.9, 0.0]])
    assert {sample(plain, rows(SamplingParams(top_k=1, seed=seed)), []).tokens[0] for seed in range(20)} == {1}


def test_seeded_rows_draw_the_same_whatever_shares_the_batch() -> None:
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.3, seed=42)
    solo = sample(logits[2:3], rows(p), []).tokens[0]
    for others in (SamplingParams(top_k=5, seed=9), SamplingParams(top_p=0.5, seed=9), SamplingParams(temperature=0)):
        mixed_rows = rows(SamplingParams(temperature=0.7, seed=1), others, p)
        assert sample(logits[:3], mixed_rows, []).tokens[2] == solo


def test_ties_at_a_rows_cut_do_not_depend_on_the_other_rows() -> None:
    """16-bit logits tie often: a seeded top_k row and a row's top_logprobs must come out the same whatever k the
    rows beside it ask for (top-k keeps every token tied with the k-th, as HF's TopKLogitsWarper)."""
    logits = torch.randn(300, 128, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    logits[:, 10:20] = logits.max(dim=-1, keepdim=True).values - 0.5  # ten-way ties around every cut
    for i in range(logits.shape[0]):
        row = logits[i:i + 1]
        mine = SamplingParams(top_k=3, seed=i, logprobs=True, top_logprobs=3)
        alone = sample(row, rows(mine), [])
        beside = sample(row.repeat(2, 1), rows(SamplingParams(top_k=5, seed=7, top_logprobs=5), mine), [])
        assert beside.tokens[1] == alone.tokens[0], i
        assert beside.top is not None and alone.top is not None and beside.top[1] == alone.top[0], i


def test_min_new_tokens_masks_end_of_sequence_and_logprobs_stay_raw() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    blocked = RowSampling(SamplingParams(temperature=0, min_new_tokens=2, logprobs=True, top_logprobs=2), None, 0)
    out = sample(logits, [blocked], eos_ids=[1])
    assert out.tokens == [2]
    raw = torch.log_softmax(logits, dim=-1)[0]
    assert out.logprobs == pytest.approx([float(raw[2])])
    assert out.top is not None and [t for t, _ in out.top[0]] == [1, 2]
    free = RowSampling(blocked.params, None, 2)
    assert sample(logits, [free], eos_ids=[1]).tokens == [1]



def test_a_tiny_temperature_is_greedy_and_leaves_the_rows_beside_it_alone(host: ServingHost) -> None:
    """temperature=1e-50 (0 once in float32) used to make NaN probabilities and fail every row of the batch."""
    engine = host.engine
    greedy = SamplingParams(max_new_tokens=40, min_new_tokens=40, temperature=0)
    ids, other = host.encode_prompt("The quick brown fox"), host.encode_prompt("hello there")
    want, want_other = alone(engine, ids, greedy), alone(engine, other, SamplingParams(max_new_tokens=5, temperature=0))
    running = engine.submit(ids, greedy)
    while engine.running_rows == 0:
        time.sleep(0.001)
    for temperature in (1e-50, 1e-30):
        tiny = engine.submit(other, SamplingParams(max_new_tokens=5, temperature=temperature, seed=3))
        assert tiny.wait(60).token_ids == want_other  # the arg-max, as the temperature tends to 0
    assert running.wait(60).token_ids == want


def test_sampler_leaves_out_only_the_rows_whose_logits_are_not_finite() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]]).repeat(5, 1)
    logits[1, 0] = float("nan")
    logits[2, 2] = float("inf")
    logits[3] = float("-inf")
    state = rows(SamplingParams(temperature=0), SamplingParams(temperature=0), SamplingParams(seed=1),
                 SamplingParams(top_p=0.5, seed=2), SamplingParams(temperature=1e-40, seed=4, logprobs=True))
    out = sample(logits, state, eos_ids=[])
    assert out.failed == {1, 2, 3}
    assert [out.tokens[0], out.tokens[4]] == [1, 1]


def test_a_row_with_non_finite_scores_fails_alone_and_the_batch_goes_on(host: ServingHost) -> None:
    """A NaN or +inf in one request's logits (an fp16 overflow on its adapter) fails that request with a
    clear error; the other rows keep decoding and answer what they answer alone."""
    from app.serving.errors import NonFiniteScores

    engine = host.engine
    original = engine._forward
    marker = 7  # max_new_tokens of the request whose logits turn bad
    bad = {"value": float("nan")}

    def corrupting(*args: Any, **kwargs: Any) -> torch.Tensor:
        logits = original(*args, **kwargs)
        if kwargs.get("last_only") is False and len(engine._rows) == logits.shape[0]:
            logits = logits.clone()
            for i, row in enumerate(engine._rows):
                if row.request.params.max_new_tokens == marker and len(row.generated) >= 2:
                    logits[i, 5] = bad["value"]
        return logits

    ids, other = host.encode_prompt("The quick brown fox"), host.encode_prompt("hello there")
    greedy = SamplingParams(max_new_tokens=60, min_new_tokens=60, temperature=0)
    want = alone(engine, ids, greedy)
    engine._forward = corrupting  # type: ignore[method-assign]
    try:
        for value in (float("nan"), float("inf")):
            bad["value"] = value
            running = engine.submit(ids, greedy)
            while engine.running_rows == 0:
                time.sleep(0.001)
            for stream in (False, True):
                victim = engine.submit(other, SamplingParams(max_new_tokens=marker, temperature=0), stream=stream)
                with pytest.raises(NonFiniteScores, match="not finite") as info:
                    victim.wait(60)
                assert info.value.status == 500
            assert running.wait(60).token_ids == want
    finally:
        engine._forward = original  # type: ignore[method-assign]


class CharTokenizer:
    """Decodes ids as characters (id 0 = an incomplete UTF-8 byte)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("\ufffd" if i == 0 else chr(i) for i in ids)


def test_text_tracker_cuts_at_stops_and_holds_back_partial_ones() -> None:
    tracker = TextTracker(CharTokenizer(), [ord(c) for c in "prompt"], stop=["END"])
    out = []
    for k, text in enumerate("abcEN"):
        tracker.update([ord(c) for c in "abcEN"[: k + 1]])
        out.append(tracker.delta(final=False))
        assert not tracker.stopped, text
    assert "".join(out) == "abc"  # "EN" could still become "END": held back
    tracker.update([ord(c) for c in "abcENDxyz"])
    assert tracker.stopped and tracker.text == "abc" and tracker.delta(final=True) == ""
    incomplete = TextTracker(CharTokenizer(), [])
    incomplete.update([ord("a")])
    incomplete.update([ord("a"), 0])
    assert incomplete.delta(final=False) == "a"  # the incomplete character waits
    assert incomplete.finish() == "a\ufffd" and incomplete.delta(final=True) == "\ufffd"


class CountingTokenizer:
    """A real tokenizer that counts the ids it is asked to decode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        text: str = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return text


def test_text_tracker_streams_exactly_the_whole_decode_at_constant_cost_per_token(host: ServingHost) -> None:
    """Random ids of the byte-level test tokenizer (characters split over several ids, special ids):
    the streamed pieces add up to decoding the whole sequence, and each new id costs a few ids of
    decoding, however long the sequence (no re-decode of everything per token)."""
    tokenizer = host.tokenizer
    gen = torch.Generator().manual_seed(0)
    multibyte = tokenizer.encode("é漢字😀", add_special_tokens=False)
    for trial in range(20):
        prompt = torch.randint(0, len(tokenizer), (12,), generator=gen).tolist()
        ids = torch.randint(0, len(tokenizer), (300,), generator=gen).tolist()
        ids[50:50] = multibyte  # characters of 2-4 bytes, arriving one id at a time
        counting = CountingTokenizer(tokenizer)
        tracker = TextTracker(counting, prompt)
        pieces = []
        for n in range(1, len(ids) + 1):
            tracker.update(ids[:n])
            pieces.append(tracker.delta(final=False))
        final = tracker.finish()
        pieces.append(tracker.delta(final=True))
        context = prompt[-6:]
        whole = tokenizer.decode(context + ids, skip_special_tokens=True)
        context_text = tokenizer.decode(context, skip_special_tokens=True)
        assert final == whole[len(context_text):], trial
        assert "".join(pieces) == final, trial
        assert counting.decoded <= 12 * (len(ids) + len(context)), (trial, counting.decoded)


def test_a_stop_string_completed_by_the_last_incomplete_character_finishes_with_stop(host: ServingHost) -> None:
    """The last generated id ends in part of a UTF-8 character: its text is read only when the row is answered.
    A stop string found then cuts the text, and the finish reason says so (it said "length")."""
    engine = host.engine
    ids = host.encode_prompt("hello there")
    greedy = SamplingParams(max_new_tokens=60, min_new_tokens=60, temperature=0)
    tokens = alone(engine, ids, greedy)
    ends_open = [n for n in range(4, 61) if host.tokenizer.decode(tokens[:n], skip_special_tokens=True).endswith("\ufffd")]
    assert ends_open, "the seeded demo model no longer ends a prefix in an incomplete character: pick another prompt"
    n = ends_open[0]
    exact = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0)
    full = engine.submit(ids, exact).wait(60)
    assert full.finish_reason == "length" and full.text.endswith("\ufffd")
    stop = full.text[-3:]
    assert full.text.find(stop) == len(full.text) - 3  # found only once the last id is read
    for stream in (False, True):
        handle = engine.submit(ids, dataclasses.replace(exact, stop=(stop,)), stream=stream)
        result = handle.wait(60)
        assert (result.text, result.finish_reason) == (full.text[:-3], "stop"), stream


def test_text_is_the_same_streamed_or_not_with_a_sentencepiece_style_tokenizer(tmp_path: Path) -> None:
    """With Llama-2/Mistral-style decoding, the text of the same tokens used to lose its leading space
    unless the request streamed or had a stop string."""
    from app.serving.engine import StreamDelta

    served = ServingHost.load(Settings(data_dir=tmp_path / "data", base_model=str(
        sentencepiece_style_model(tmp_path / "sp-model"))))
    try:
        engine, tokenizer = served.engine, served.tokenizer
        ids = served.encode_prompt("The capital of France is")
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=1)
        plain = engine.submit(ids, params).wait(60)
        assert tokenizer.convert_ids_to_tokens(plain.token_ids[0]).startswith("▁")  # a word after a space
        with_stop = engine.submit(ids, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, stop=("@@@",)))

        async def streamed() -> tuple[str, str]:
            pieces = []
            async for item in engine.submit(ids, params, loop=asyncio.get_running_loop(), stream=True).events():
                if isinstance(item, StreamDelta):
                    pieces.append(item.text)
                else:
                    return "".join(pieces), item.text
            raise AssertionError("no result")

        joined, result_text = asyncio.run(streamed())
        whole = tokenizer.decode(ids + plain.token_ids, skip_special_tokens=True)
        prompt_text = tokenizer.decode(ids, skip_special_tokens=True)
        assert plain.text.startswith(" ") and whole == prompt_text + plain.text
        assert with_stop.wait(60).text == joined == result_text == plain.text
    finally:
        served.close()


def test_engine_answers_every_queued_request_when_stopped(demo_model_dir: Path, tmp_path: Path) -> None:
    from app.serving.errors import ServingUnavailable

    served = ServingHost.load(Settings(data_dir=tmp_path, base_model=str(demo_model_dir), max_batch_size=1))
    handles = [served.engine.submit([5, 6, 7], SamplingParams(max_new_tokens=200, min_new_tokens=200)) for _ in range(3)]
    served.close()
    outcomes: list[Any] = []
    for handle in handles:
        try:
            outcomes.append(handle.wait(30).finish_reason)
        except ServingUnavailable as exc:
            outcomes.append(type(exc))
    assert ServingUnavailable in outcomes
    with pytest.raises(ServingUnavailable):
        served.engine.submit([5], SamplingParams(max_new_tokens=1))


def test_a_request_cancelled_while_waiting_is_answered(demo_model_dir: Path, tmp_path: Path) -> None:
    """Like a cancelled running row: a result with ``finish_reason`` ``cancelled`` (nothing generated), so a
    caller waiting on it never hangs."""
    served = ServingHost.load(Settings(data_dir=tmp_path, base_model=str(demo_model_dir), max_batch_size=1))
    try:
        running = served.engine.submit([5, 6, 7], SamplingParams(max_new_tokens=200, min_new_tokens=200))
        _wait_until(lambda: served.engine.running_rows == 1)
        waiting = served.engine.submit([8, 9], SamplingParams(max_new_tokens=5, temperature=0, logprobs=True))
        waiting.cancel()
        running.cancel()
        answer = waiting.wait(30)
        assert (answer.finish_reason, answer.token_ids, answer.logprobs) == ("cancelled", [], [])
        assert running.wait(30).finish_reason == "cancelled"
        _wait_until(lambda: served.engine.queue_depth == 0 and served.engine.running_rows == 0)
    finally:
        served.close()


def _wait_until(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_long_generation_equals_hf_generate(host: ServingHost, demo_model_dir: Path) -> None:
    """200 tokens: the cache grows past its preallocated room several times on the way."""
    from tests.conftest import load_model

    ids = host.encode_prompt("The rain in Spain")
    params = SamplingParams(max_new_tokens=200, min_new_tokens=200, temperature=0, logprobs=True)
    got = host.engine.submit(ids, params).wait(120)
    model = load_model(demo_model_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=200, min_new_tokens=200, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    want = out.sequences[0, len(ids):].tolist()
    assert got.token_ids == want
    want_lp = [float(torch.log_softmax(step[0], dim=-1)[t]) for step, t in zip(out.logits, want, strict=True)]
    assert got.logprobs == pytest.approx(want_lp, abs=1e-4)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(host: ServingHost) -> None:
    """A forward that raises answers its requests with an error (never a silent base-model answer),
    whether it fails in the prefill or in a decode step, and the next requests are served normally."""
    from app.serving.errors import ServingError

    engine = host.engine
    original = engine._forward
    calls = {"n": 0}

    def broken_from(call: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] >= call:
                raise RuntimeError("simulated device failure")
            return original(*args, **kwargs)
        return forward

    for failing_call in (1, 3):  # the prefill, then a decode step
        calls["n"] = 0
        engine._forward = broken_from(failing_call)  # type: ignore[method-assign]
        try:
            handle = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4, min_new_tokens=4, temperature=0))
            with pytest.raises(ServingError, match="simulated device failure") as info:
                handle.wait(30)
            assert info.value.status == 500
        finally:
            engine._forward = original  # type: ignore[method-assign]
        assert engine.running_rows == 0
    assert len(engine.submit([5, 6, 7], SamplingParams(max_new_tokens=4, min_new_tokens=4)).wait(30).token_ids) == 4


class SlowStore(LocalArtifactStore):
    """An artifact store whose reads wait for ``released`` (a slow disk or network volume)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.released = threading.Event()
        self.read_threads: list[str] = []

    def open(self, sha256: str) -> BinaryIO:
        self.read_threads.append(threading.current_thread().name)
        assert self.released.wait(60)
        return super().open(sha256)


def test_a_cold_adapter_read_never_stalls_running_rows(host: ServingHost, demo_model_dir: Path,
                                                       tmp_path: Path) -> None:
    """While a request waits for its adapter's files, rows already running keep decoding to the end;
    then the adapter loads and serves."""
    folder = peft_adapter(demo_model_dir, tmp_path / "adapter", seed=3)
    store = SlowStore(tmp_path / "store")
    files = {name: {"sha256": store.put_bytes((folder / name).read_bytes()).sha256}
             for name in ("adapter_config.json", "adapter_model.safetensors")}
    config = json.loads((folder / "adapter_config.json").read_text())
    version = ServedVersion("v-slow", "slow@1", config, files, None)
    params = SamplingParams(max_new_tokens=24, min_new_tokens=24, temperature=0)
    prompt = host.encode_prompt("hello there")
    running = host.engine.submit(prompt, params)
    leased: list[Any] = []
    reader = threading.Thread(target=lambda: leased.append(host.lease(version, store)), name="request-thread")
    reader.start()
    try:
        base = running.wait(60).token_ids
        assert len(base) == 24  # finished while the read is still blocked
        assert reader.is_alive() and store.read_threads == ["request-thread"]
    finally:
        store.released.set()
        reader.join(60)
    assert store.read_threads == ["request-thread", "request-thread"]  # config, then weights: never the engine
    with_adapter = host.engine.submit(prompt, params, lease=leased[0]).wait(60)
    assert with_adapter.adapter == "slow@1" and with_adapter.token_ids != base


def _stored_version(store: LocalArtifactStore, folder: Path, name: str) -> ServedVersion:
    files = {n: {"sha256": store.put_bytes((folder / n).read_bytes()).sha256}
             for n in ("adapter_config.json", "adapter_model.safetensors")}
    return ServedVersion(f"v-{name}", f"{name}@1", json.loads((folder / "adapter_config.json").read_text()), files, None)


def test_a_request_for_an_adapter_without_a_slot_is_not_overtaken_for_ever(demo_model_dir: Path,
                                                                           tmp_path: Path) -> None:
    """Two slots, both busy with a steady stream of requests on two adapters (clients that send their next
    request as soon as one ends, so neither adapter ever runs out of rows): a request on a third adapter is
    served while that stream goes on (a slot drains for it), and serves its own adapter. It used to wait until
    the stream stopped."""
    settings = Settings(data_dir=tmp_path / "data", base_model=str(demo_model_dir), adapter_slots=2,
                        max_batch_size=16)
    host = ServingHost.load(settings)
    store = LocalArtifactStore(tmp_path / "store")
    busy, third = [_stored_version(store, peft_adapter(demo_model_dir, tmp_path / n, seed=40 + i, r=4), n)
                   for i, n in enumerate(("a0", "a1"))], _stored_version(
                       store, peft_adapter(demo_model_dir, tmp_path / "a2", seed=42, r=4), "a2")
    prompt = host.encode_prompt("hello there")
    stop = threading.Event()
    served: list[float] = []

    def client(version: ServedVersion, lengths: list[int]) -> None:
        for turn in range(10_000):
            if stop.is_set():
                return
            n = lengths[turn % len(lengths)]
            params = SamplingParams(max_new_tokens=n, min_new_tokens=n, temperature=0)
            host.engine.submit(prompt, params, lease=host.lease(version, store)).wait(60)
            served.append(time.monotonic())

    clients = [threading.Thread(target=client, args=(busy[c % 2], [3 + (c * 5 + k * 7) % 14 for k in range(5)]),
                                daemon=True) for c in range(8)]
    try:
        alone_params = SamplingParams(max_new_tokens=8, min_new_tokens=8, temperature=0)
        want = host.engine.submit(prompt, alone_params, lease=host.lease(third, store)).wait(60).token_ids
        for thread in clients:
            thread.start()
        _wait_until(lambda: len(served) >= 16)  # both slots taken by the stream, which keeps them running
        asked = time.monotonic()
        got = host.engine.submit(prompt, alone_params, lease=host.lease(third, store)).wait(30)
        overtaken = sum(t > asked for t in served)
        assert not stop.is_set() and all(thread.is_alive() for thread in clients)  # the stream still runs
        assert got.adapter == "a2@1" and got.token_ids == want
        assert overtaken < 40, overtaken  # a drained slot's rows finish within 16 steps: a few dozen requests
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)
        host.close()


@pytest.mark.parametrize(("adapter_dtype", "model_dtype", "slot_dtype", "weight_dtype"), [
    ("auto", torch.bfloat16, torch.bfloat16, torch.bfloat16),
    ("float32", torch.bfloat16, torch.float32, torch.float32),
    ("float16", torch.float32, torch.float32, torch.float16),
    ("auto", torch.float32, torch.float32, torch.float32),
])
def test_adapter_dtype_sets_the_slots_precision(adapter_dtype: str, model_dtype: torch.dtype, slot_dtype: torch.dtype,
                                                weight_dtype: torch.dtype, demo_model_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``ADAPTERFORGE_ADAPTER_DTYPE`` decides the slots' precision: on a bfloat16 base model (as GPUs load
    16-bit checkpoints; simulated here by casting the loaded model) the model's own (auto) or float32
    (PEFT's arithmetic); on a float32 one (CPUs) float32, or float16 storage of LoRA A and B under
    float32 products. The model itself keeps its dtype either way."""
    served = _host_on(model_dtype, adapter_dtype, demo_model_dir, tmp_path, monkeypatch)
    try:
        assert next(served.model.parameters()).dtype == model_dtype
        assert served.slotted.dtype == slot_dtype and served.slotted.weight_dtype == weight_dtype
    finally:
        served.close()


def test_float16_adapter_weights_on_a_16_bit_model_stop_the_start(demo_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"ADAPTERFORGE_ADAPTER_DTYPE=float16 .* this one is torch\.bfloat16") as info:
        _host_on(torch.bfloat16, "float16", demo_model_dir, tmp_path, monkeypatch)
    assert info.value.field == "ADAPTERFORGE_ADAPTER_DTYPE"


def test_gpu_kernels_on_stops_the_start_where_the_kernel_cannot_run(demo_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``ADAPTERFORGE_GPU_KERNELS=on`` is a requirement: without Triton (or on a CPU, where only its interpreter
    runs the kernel) the server refuses to start and says why."""
    from adapters_core.serving import gpu_bgmv

    def no_triton() -> gpu_bgmv.GpuBgmv:
        raise gpu_bgmv.KernelUnavailable("Triton is not installed (No module named 'triton')")

    monkeypatch.setattr(gpu_bgmv, "_compiled", no_triton)
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'af.db'}",
                        base_model=str(demo_model_dir), gpu_kernels="on")
    with pytest.raises(ConfigError, match=r"ADAPTERFORGE_GPU_KERNELS=on: the GPU LoRA kernel cannot be used: "
                                          r"Triton is not installed") as info:
        ServingHost.load(settings)
    assert info.value.field == "ADAPTERFORGE_GPU_KERNELS"


@pytest.mark.parametrize("setting", ["on", "auto"])
def test_a_gpu_kernel_that_cannot_launch_is_found_at_start(setting: str, demo_model_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """The fused kernel is warmed up before the server takes requests; a Triton that cannot compile for the
    GPU shows there. ``on`` (required): the server does not start, and says why. ``auto``: it starts, logs why,
    serves on torch's operators, and ``/readyz`` reports it."""
    import logging

    from adapters_core.serving import SlottedModel, gpu_bgmv

    class CannotCompile:
        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                raise RuntimeError("PassManager::run failed")
            return launch

    broken = gpu_bgmv.GpuBgmv(CannotCompile(), (CannotCompile(), CannotCompile()), interpret=True)
    monkeypatch.setattr(SlottedModel, "_gpu_kernel", lambda self, wanted, model_dtype: broken)
    settings = Settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'af.db'}",
                        base_model=str(demo_model_dir), gpu_kernels=setting)  # type: ignore[arg-type]
    if setting == "on":
        with pytest.raises(ConfigError, match=r"ADAPTERFORGE_GPU_KERNELS=on, but the fused GPU kernel cannot launch "
                                              r"here: RuntimeError: PassManager::run failed") as info:
            ServingHost.load(settings)
        assert info.value.field == "ADAPTERFORGE_GPU_KERNELS"
        return
    with caplog.at_level(logging.WARNING, logger="app.serving.host"):
        started = ServingHost.load(settings)
    try:
        assert "the fused GPU kernel cannot launch here (RuntimeError: PassManager::run failed)" in caplog.text
        assert started.lora_kernel == {"lora_kernel": "torch", "lora_kernel_error": "RuntimeError: PassManager::run failed"}
        ids = started.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_new_tokens=3, min_new_tokens=3, temperature=0.0)
        assert len(alone(started.engine, ids, params)) == 3  # it serves
    finally:
        started.close()


def _host_on(model_dtype: torch.dtype, adapter_dtype: str, demo_model_dir: Path, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> ServingHost:
    """A serving host whose loaded base model is cast to ``model_dtype``."""
    from app.serving import host as host_module

    load_model = host_module._load_model

    def cast_model(settings: Settings) -> tuple[Any, torch.nn.Module, Any]:
        source, model, tokenizer = load_model(settings)
        return source, model.to(model_dtype), tokenizer

    monkeypatch.setattr(host_module, "_load_model", cast_model)
    return ServingHost.load(Settings(data_dir=tmp_path / "data", base_model=str(demo_model_dir),
                                     adapter_dtype=adapter_dtype))  # type: ignore[arg-type]
