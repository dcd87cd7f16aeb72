"""Batched LoRA products where every row of the batch may use a different adapter slot.

One operation, three strategies chosen by shape::

    out[i] += (x[i] @ A[sᵢ]) @ B[sᵢ]        A: (slots, in, r)   B: (slots, r, out)   (B pre-scaled)

* one slot for every row: two dense GEMMs on that slot's views (no gather);
* one token per row (decode) with per-row buffers (:func:`lora_delta_rows`): ``bmm`` on copies of
  each row's weights kept next to the batch, written once when the row joins; rows of different
  ranks in bands of rank columns (:func:`lora_delta_row_bands`), so that each row multiplies about
  its own rank's columns, not the batch's largest;
* one token per row (decode) without them: two ``embedding_bag`` calls with per-sample weights,
  which read each row's adapter straight from the slot bank without materialising a gathered
  copy (Punica's BGMV, in stock torch);
* several tokens per row (prefill): gather the rows' A and B, then ``bmm`` / ``baddbmm`` (the
  gather is amortised over the row's tokens).

Slot 0 holds zeros (the base model), so rows without an adapter cost work but change nothing. A
bank stored in another dtype than ``x`` (float16 weights under float32 products) is converted as it
is read: the dense paths convert the slot's views, the others gather and convert the rows' weights
(``embedding_bag`` needs one dtype). Fused kernels take over where they can run: the compiled CPU
kernel (:mod:`~adapters_core.serving.cpu_bgmv`) and, for GPU decode steps, Triton's
(:mod:`~adapters_core.serving.gpu_bgmv`); these functions are what runs without them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class RowIndex:
    """Per-forward cache of the flat indices that the ``embedding_bag`` path needs, by width."""

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots
        self._cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def rows(self, width: int, stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices ``sᵢ·stride + j`` (``j < width``, row by row) into a bank viewed as ``(slots·stride, ·)``,
        and each row's offset into them: ``embedding_bag``'s bags, one per row; ``stride`` defaults to
        ``width``. Built once per forward and shape (a decode step's layers share them: every torch call
        saved here is one fewer launch per layer on a GPU)."""
        stride = width if stride is None else stride
        bags = self._cache.get((width, stride))
        if bags is None:
            device = self.slots.device
            idx = (self.slots * stride).unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
            offsets = torch.arange(0, idx.numel(), width, device=device)
            bags = self._cache[(width, stride)] = (idx.reshape(-1), offsets)
        return bags


def _bag_sum(bags: tuple[torch.Tensor, torch.Tensor], flat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[i] = Σⱼ weights[i, j] · flat[idx[i, j]]``: ``(batch, features)``."""
    idx, offsets = bags
    return F.embedding_bag(idx, flat, offsets, mode="sum", per_sample_weights=weights.reshape(-1))


def lora_hidden(x: torch.Tensor, a: torch.Tensor, slots: torch.Tensor, uniform: int | None,
                index: RowIndex) -> torch.Tensor:
    """``h[i] = x[i] @ A[sᵢ]`` for ``x`` of shape ``(batch, tokens, in)``: ``(batch, tokens, r)``."""
    if uniform is not None:
        return x @ a[uniform].to(x.dtype)
    tokens, width = x.shape[1:]
    if tokens == 1 and a.dtype == x.dtype:
        flat = a.view(-1, a.shape[-1])
        return _bag_sum(index.rows(width), flat, x).unsqueeze(1)
    return torch.bmm(x, a.index_select(0, slots).to(x.dtype))


def lora_expand(h: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, uniform: int | None,
                index: RowIndex, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] += h[i] @ B[sᵢ]`` (in place when ``out`` is given, else a new ``(batch, tokens, out)``)."""
    tokens, rank = h.shape[1:]
    if uniform is not None:
        bu = b[uniform].to(h.dtype)
        if out is None:
            return h @ bu
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, rank), bu)
        return out
    if tokens == 1 and b.dtype == h.dtype:
        flat = b.view(-1, b.shape[-1])  # h may cover only the first rows of each slot's B
        delta = _bag_sum(index.rows(rank, b.shape[1]), flat, h).unsqueeze(1)
        if out is None:
            return delta
        return out.add_(delta)
    gathered = b.index_select(0, slots).to(h.dtype)
    if out is None:
        return torch.bmm(h, gathered)
    return out.baddbmm_(h, gathered)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slots: torch.Tensor, uniform: int | None,
               index: RowIndex, out: torch.Tensor | None = None, width: int | None = None) -> torch.Tensor:
    """``out[i] += (x[i] @ A[sᵢ]) @ B[sᵢ]`` (see the module docstring); ``x`` is ``(batch, tokens, in)``.

    ``width``: only the first ``width`` rank components (the slots' own ranks all fit; the rest of the
    padded bank is zeros). Dense and gathering products take strided views; the single-token path,
    which reads A as flat rows, computes ``h`` whole and then reads only ``width`` rows of each B."""
    if width is not None and width < a.shape[-1]:
        if uniform is not None or x.shape[1] > 1 or a.dtype != x.dtype:
            a, b = a[:, :, :width], b[:, :width]
        else:
            return lora_expand(lora_hidden(x, a, slots, uniform, index)[..., :width], b, slots, uniform, index, out)
    return lora_expand(lora_hidden(x, a, slots, uniform, index), b, slots, uniform, index, out)


def lora_delta_bank_step(x: torch.Tensor, flat_a: torch.Tensor, flat_b: torch.Tensor, index: RowIndex, width: int,
                         out: torch.Tensor) -> torch.Tensor:
    """A decode step's products straight from the slot bank, in as few torch calls as it takes (on a GPU
    each is a launch, and a small model's step is bound by them): ``out[i] += (x[i] @ A[sᵢ])[:width] @
    B[sᵢ][:width]``. ``x``: ``(batch, 1, in)``; ``flat_a``, ``flat_b``: the bank viewed as
    ``(slots·in, capacity)`` and ``(slots·capacity, out)``; ``out``: contiguous ``(batch, 1, out)``."""
    capacity = flat_a.shape[1]
    h = _bag_sum(index.rows(x.shape[-1]), flat_a, x)
    if width < capacity:
        h = h[:, :width]
    out.view(out.shape[0], -1).add_(_bag_sum(index.rows(width, capacity), flat_b, h))
    return out


def lora_delta_rows(x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[i] += (x[i] @ A_rows[i]) @ B_rows[i]``: the weights already sit at the rows' positions."""
    h = torch.bmm(x, a_rows)
    if out is None:
        return torch.bmm(h, b_rows)
    return out.baddbmm_(h, b_rows)


@dataclass(frozen=True)
class RankBand:
    """Rank columns ``[low, high)`` of a decode step on row buffers, multiplied for ``rows`` only (the rows
    whose adapter's rank reaches ``high``; the others hold zeros there)."""

    low: int
    high: int
    rows: torch.Tensor  # int64 row positions, ascending
    positions: tuple[int, ...]  # the same, as ints


def rank_bands(row_ranks: list[int], device: torch.device) -> tuple[RankBand, ...]:
    """The bands of a batch whose rows have ranks ``row_ranks`` (0: no adapter): the first covers every row
    up to the smallest rank, each further one the next step up, for the rows that reach it. Empty when the
    batch has one rank (one product covers it)."""
    steps = sorted({r for r in row_ranks if r > 0})
    if len(steps) < 2:
        return ()
    every = tuple(range(len(row_ranks)))
    bands = [RankBand(0, steps[0], torch.arange(len(row_ranks), device=device), every)]
    for low, high in itertools.pairwise(steps):
        rows = tuple(i for i, r in enumerate(row_ranks) if r >= high)
        bands.append(RankBand(low, high, torch.tensor(rows, dtype=torch.long, device=device), rows))
    return tuple(bands)


def lora_delta_row_bands(x: torch.Tensor, a_rows: torch.Tensor, b_rows: torch.Tensor, bands: tuple[RankBand, ...],
                         width: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`lora_delta_rows` for a batch of ``x.shape[0]`` rows of different ranks (one token each): the first
    band in place on views, each further band (up to ``width`` columns) on the rows that reach it, row by row on
    views when they are few, else gathered. A batch of one r=64 row among r=16 rows then reads 16 columns of
    the others' weights, not 64."""
    batch = x.shape[0]
    first = min(bands[0].high, width)
    out = lora_delta_rows(x, a_rows[:batch, :, :first], b_rows[:batch, :first], out)
    for band in bands[1:]:
        high = min(band.high, width)
        if band.low >= high:
            break
        if len(band.positions) <= _ROWS_ONE_BY_ONE:  # a few wide rows: two products each, on views
            for i in band.positions:
                out[i].addmm_(x[i] @ a_rows[i, :, band.low:high], b_rows[i, band.low:high])
            continue
        rows = band.rows
        a = a_rows[:, :, band.low:high].index_select(0, rows)
        b = b_rows[:, band.low:high].index_select(0, rows)
        out.index_add_(0, rows, torch.bmm(torch.bmm(x.index_select(0, rows), a), b))
    return out


_ROWS_ONE_BY_ONE = 4  # a band of this many rows or fewer runs row by row (2 ops a row, against 6 gathering)
