"""Packing: bin packing, collation, and isolation of packed examples on the real tiny models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from adapters_core.training.examples import TokenizedExample
from adapters_core.training.packing import (
    collate_packed,
    collate_padded,
    pack,
    supports_packing,
)
from tests.conftest import load_model

PAD = 0


def make_examples(lengths: list[int], vocab: int = 300, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for line, n in enumerate(lengths, start=1):
        ids = [rng.randrange(5, vocab) for _ in range(n)]
        labels = [t if rng.random() < 0.7 else -100 for t in ids]
        labels[-1] = ids[-1]
        out.append(TokenizedExample(input_ids=ids, labels=labels, line=line))
    return out


def test_pack_fits_rows_and_uses_every_example_once() -> None:
    lengths = [random.Random(1).randint(1, 32) for _ in range(60)]
    examples = make_examples(lengths)
    rows = pack(examples, max_seq_len=32)
    assert all(len(r) <= 32 for r in rows)
    assert sorted(line for r in rows for line in r.lines) == list(range(1, 61))
    assert len(rows) < len(examples)
    by_line = {ex.line: ex for ex in examples}
    for row in rows:
        assert sum(row.seq_lengths) == len(row) == len(row.labels) == len(row.position_ids)
        start = 0
        for n, line in zip(row.seq_lengths, row.lines, strict=True):
            ex = by_line[line]
            assert row.input_ids[start : start + n] == ex.input_ids
            assert row.position_ids[start : start + n] == list(range(n))
            assert row.labels[start] == -100
            assert row.labels[start + 1 : start + n] == ex.labels[1:]
            start += n


def test_pack_is_first_fit_decreasing_and_refuses_long_examples() -> None:
    rows = pack(make_examples([5, 7, 3, 4]), max_seq_len=10)
    assert [r.seq_lengths for r in rows] == [[7, 3], [5, 4]]
    with pytest.raises(ValueError, match="truncate"):
        pack(make_examples([11]), max_seq_len=10)


def test_collate_packed_pads_and_restarts_positions() -> None:
    rows = pack(make_examples([4, 3, 2]), max_seq_len=7)
    assert set(collate_packed(rows, PAD, mask="position_ids")) == {"input_ids", "labels", "position_ids"}
    batch = collate_packed(rows, PAD)
    assert set(batch) == {"input_ids", "labels", "position_ids", "attention_mask"}
    assert batch["input_ids"].shape == (2, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    assert batch["input_ids"][1, 2:].tolist() == [PAD] * 5
    assert batch["labels"][1, 2:].tolist() == [-100] * 5
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 7, 7)
    allowed = (mask[1, 0] == 0).int().tolist()
    assert allowed[1] == [1, 1, 0, 0, 0, 0, 0]
    assert allowed[4] == [0, 0, 0, 0, 1, 0, 0]  # padding sees only itself


def test_collate_padded_right_and_left() -> None:
    examples = make_examples([3, 5])
    right = collate_padded(examples, PAD)
    assert right["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert right["input_ids"][0].tolist() == [*examples[0].input_ids, PAD, PAD]
    assert right["labels"][0, 3:].tolist() == [-100, -100]
    left = collate_padded(examples, PAD, padding_side="left")
    assert left["attention_mask"][0].tolist() == [0, 0, 1, 1, 1]
    assert left["labels"][0].tolist() == [-100, -100, *examples[0].labels]


def per_example_losses(model: torch.nn.Module, examples: list[TokenizedExample]) -> tuple[float, int]:
    """Sum of per-token losses and number of counted tokens, each example run alone."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        out = model(input_ids=ids, labels=torch.tensor([ex.labels]))
        n = sum(lab != -100 for lab in ex.labels[1:])
        total += out.loss.item() * n
        count += n
    return total, count


@pytest.mark.parametrize(
    ("arch", "attn", "mask"),
    [
        ("llama", "sdpa", "position_ids"),
        ("llama", "eager", "position_ids"),
        ("llama", "sdpa", "4d"),
        ("llama", "eager", "4d"),
        ("gpt2", "sdpa", "position_ids"),
        ("gpt2", "eager", "position_ids"),
        ("gpt2", "sdpa", "4d"),
        ("gpt2", "eager", "4d"),
    ],
)
@torch.no_grad()
def test_packed_logits_and_loss_match_examples_alone(
    model_dirs: dict[str, Path], arch: str, attn: str, mask: str
) -> None:
    model = load_model(model_dirs[arch])
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    assert supports_packing(model)
    examples = make_examples([9, 6, 5, 4, 3, 2], vocab=model.config.vocab_size, seed=3)
    rows = pack(examples, max_seq_len=16)
    assert len(rows) >= 2 and any(len(r.seq_lengths) > 1 for r in rows)
    batch = collate_packed(rows, model.config.pad_token_id, mask=mask)  # type: ignore[arg-type]
    # a cache switches off the position-id detection; the 4D mask works either way
    out = model(**batch, use_cache=False) if mask == "position_ids" else model(**batch)
    by_line = {ex.line: ex for ex in examples}
    for b, row in enumerate(rows):
        start = 0
        for n, line in zip(row.seq_lengths, row.lines, strict=True):
            alone = model(input_ids=torch.tensor([by_line[line].input_ids])).logits[0]
            torch.testing.assert_close(out.logits[b, start : start + n], alone, atol=1e-5, rtol=1e-5)
            start += n
    total, count = per_example_losses(model, examples)
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert out.loss.item() == pytest.approx(total / count, abs=1e-5)


@torch.no_grad()
def test_packed_logits_match_through_adapter_model(tiny_llama_dir: Path) -> None:
    from adapters_core import AdapterModel, LoraConfig

    model = AdapterModel(load_model(tiny_llama_dir))
    model.add_adapter("a", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert supports_packing(model)
    examples = make_examples([7, 5, 3], vocab=model.config.vocab_size, seed=5)
    rows = pack(examples, max_seq_len=16)
    assert len(rows) == 1
    out = model(**collate_packed(rows, model.config.pad_token_id))
    start = 0
    for n, ex in zip(rows[0].seq_lengths, sorted(examples, key=lambda e: -len(e.input_ids)), strict=True):
        alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
        torch.testing.assert_close(out.logits[0, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


@torch.no_grad()
def test_default_4d_mask_isolates_with_a_cache_position_ids_do_not(tiny_llama_dir: Path) -> None:
    """Pins transformers' behaviour: with a cache (config.use_cache defaults to True) the packed-sequence
    detection from position_ids is skipped, so the training forward must pass use_cache=False; the 4D mask
    is used as-is either way."""
    model = load_model(tiny_llama_dir)
    examples = make_examples([6, 5], vocab=model.config.vocab_size, seed=7)
    rows = pack(examples, max_seq_len=11)
    second = model(input_ids=torch.tensor([examples[1].input_ids])).logits[0]
    leaky = model(**collate_packed(rows, model.config.pad_token_id, mask="position_ids")).logits[0, 6:]
    assert not torch.allclose(leaky, second, atol=1e-3)
    isolated = model(**collate_packed(rows, model.config.pad_token_id)).logits[0, 6:]
    torch.testing.assert_close(isolated, second, atol=1e-5, rtol=1e-5)


def test_supports_packing_false_without_mask_utils() -> None:
    assert not supports_packing(torch.nn.Linear(2, 2))
