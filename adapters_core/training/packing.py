"""Sequence packing and collation.

Packing puts several whole tokenised examples into one row (first-fit decreasing) and keeps them from
attending to each other. How transformers (5.x) isolates them, in ``transformers/masking_utils.py``:

* ``_preprocess_mask_arguments``: when ``attention_mask`` is ``None``, ``position_ids`` are given and there
  is no cache, it calls ``find_packed_sequence_indices(position_ids)``, which starts a new sequence wherever
  consecutive position ids do not increase by exactly 1; ``create_causal_mask`` then wraps the causal mask
  function with ``packed_sequence_compatibility_function`` (block-diagonal causal mask) for sdpa, eager and
  flex attention. Passing any 2D ``attention_mask`` switches this detection off.
* a 4D ``attention_mask`` is returned as-is by ``_preprocess_mask_arguments``; eager attention adds it to
  the scores, so it must be an additive float mask (0 = attend, dtype minimum = blocked), which sdpa accepts too.

The packed-sequence detection is skipped whenever a cache exists, and Llama / GPT-2 create a
``DynamicCache`` whenever ``use_cache`` is true, which is the config default even in training mode. So
``collate_packed`` by default emits the explicit 4D additive ``attention_mask`` (isolation whatever the
forward's ``use_cache``; float32 works for bf16 models and under autocast too, at O(T^2) memory per row);
``mask="position_ids"`` emits no mask (O(T) memory, flash-attention friendly) and is correct only when the
forward runs with ``use_cache=False``. Both carry restarting ``position_ids``, which Llama (RoPE) and GPT-2
(learned ``wpe(position_ids)``) use, so a packed example sees exactly what it would see alone. Padding at
the end of a row is its own (ignored) sequence.

The loss shifts labels inside the model (``logits[..., :-1]`` predict ``labels[..., 1:]``), so the first
label of each packed example would be predicted from the previous example's last token; ``pack`` sets it
to ``-100`` (alone, an example's first label is never predicted anyway, so nothing else changes).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from adapters_core.training.examples import TokenizedExample

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    """Whole examples laid end to end; ``seq_lengths[i]`` tokens of the example from line ``lines[i]``."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    seq_lengths: list[int] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def add(self, example: TokenizedExample) -> None:
        """Append one example; its first label is masked (it would cross the example boundary)."""
        n = len(example.input_ids)
        self.input_ids.extend(example.input_ids)
        self.labels.extend([IGNORE_INDEX, *example.labels[1:]])
        self.position_ids.extend(range(n))
        self.seq_lengths.append(n)
        self.lines.append(example.line)


def pack(examples: Sequence[TokenizedExample], max_seq_len: int) -> list[PackedRow]:
    """First-fit decreasing: longest first, each into the first row with room, else a new row.

    Examples are never split; one longer than ``max_seq_len`` (or empty) is refused.
    """
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    for ex in examples:
        if not 0 < len(ex.input_ids) <= max_seq_len:
            raise ValueError(
                f"line {ex.line}: {len(ex.input_ids)} tokens; packing needs 1..{max_seq_len} (truncate first)"
            )
        if len(ex.labels) != len(ex.input_ids):
            raise ValueError(f"line {ex.line}: labels and input_ids differ in length")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    rows: list[PackedRow] = []
    for i in order:
        ex = examples[i]
        row = next((r for r in rows if len(r) + len(ex.input_ids) <= max_seq_len), None)
        if row is None:
            row = PackedRow()
            rows.append(row)
        row.add(ex)
    return rows


def block_causal_mask(seq_lengths: Sequence[Sequence[int]], length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive (batch, 1, length, length) mask: causal within each sequence, blocked elsewhere.

    Padding after the last sequence attends only to itself, so no row of the mask is fully blocked.
    """
    ids = torch.full((len(seq_lengths), length), -1, dtype=torch.long)
    for b, lengths in enumerate(seq_lengths):
        start = 0
        for k, n in enumerate(lengths):
            ids[b, start : start + n] = k
            start += n
    same = ids[:, :, None] == ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    eye = torch.eye(length, dtype=torch.bool)
    allowed = (same & (ids[:, :, None] >= 0) & causal) | eye
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def collate_packed(
    rows: Sequence[PackedRow],
    pad_token_id: int,
    *,
    mask: Literal["4d", "position_ids"] = "4d",
    mask_dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Batch packed rows (right-padded to the longest): ``input_ids``, ``labels``, ``position_ids``.

    ``mask="4d"`` (default) adds an additive block-diagonal causal ``attention_mask`` of ``mask_dtype``;
    ``mask="position_ids"`` adds none, leaving transformers to derive the block-diagonal mask from the
    restarting ``position_ids``, which it only does when the forward gets ``use_cache=False``.
    """
    if not rows:
        raise ValueError("no rows to collate")
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row)
        input_ids[b, :n] = torch.tensor(row.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(row.labels, dtype=torch.long)
        position_ids[b, :n] = torch.tensor(row.position_ids, dtype=torch.long)
        position_ids[b, n:] = torch.arange(length - n)  # padding: a separate sequence of its own
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if mask == "4d":
        batch["attention_mask"] = block_causal_mask([r.seq_lengths for r in rows], length, mask_dtype)
    elif mask != "position_ids":
        raise ValueError(f"mask must be 'position_ids' or '4d', got {mask!r}")
    return batch


def collate_padded(
    examples: Sequence[TokenizedExample],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """One example per row, padded to the longest: ``input_ids``, ``attention_mask``, ``labels`` (-100 on pads)."""
    if not examples:
        raise ValueError("no examples to collate")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    length = max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for b, ex in enumerate(examples):
        n = len(ex.input_ids)
        cols = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[b, cols] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[b, cols] = torch.tensor(ex.labels, dtype=torch.long)
        attention_mask[b, cols] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside an ``AdapterModel`` (or the model itself)."""
    from adapters_core.model import AdapterModel

    return model.model if isinstance(model, AdapterModel) else model


def supports_packing(model: nn.Module) -> bool:
    """Whether the model isolates packed examples given restarting ``position_ids`` and no attention mask.

    True when its modeling module builds masks with ``masking_utils.create_causal_mask`` (which detects
    packed sequences) and its attention implementation has a mask function there (sdpa, eager, flex, ...).
    Verified by tests on Llama and GPT-2.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    hf = _hf_model(model)
    config = getattr(hf, "config", None)
    if config is None:
        return False
    module = sys.modules.get(type(hf).__module__)
    if module is None or not hasattr(module, "create_causal_mask"):
        return False
    attn = getattr(config, "_attn_implementation", None)
    return attn in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
