"""Slot layers: a base layer plus fixed per-slot adapter buffers, routed per row.

:class:`SlotLoraLayer` wraps a Linear / Conv1D / bitsandbytes linear or an ``nn.Embedding``. Its
buffers are allocated once, on the first adapter that targets the layer, for every slot of the
model (slot 0 = the base model, always zero)::

    A (slots, in, r)    B (slots, r, out) pre-scaled    lora_bias (slots, out)    gain (slots, out)
    bias_delta (slots, out)  (an adapter's trained base bias minus the server's)

A and B are kept in ``weight_dtype`` (by default the layer's compute ``dtype``; float16 under a
float32 model halves the bank's memory and what a decode step reads, and every product still
runs in float32: the CPU kernel converts as it loads, torch's paths convert what they gather).

and computes, for row ``i`` with slot ``sᵢ``::

    y[i] = base(x[i]) + bias_delta[sᵢ] + δ[i]                               (LoRA rows)
    y[i] = base(x[i]) + bias_delta[sᵢ] + (g[sᵢ] − 1)·W x[i] + g[sᵢ]·δ[i]     (DoRA rows)
    δ[i] = (x[i] @ A[sᵢ]) @ B[sᵢ] + lora_bias[sᵢ],   g = m / ‖W + s·B·A‖ (computed when loaded)

Ranks are zero-padded to the largest rank loaded on the layer (the buffers grow when a larger one
arrives), which keeps every product exact; a forward multiplies only the first ``SlotRouting.rank``
columns (the largest rank among the slots it routes), so one high-rank adapter in the bank does not
make every other row pay its rank. In float32 on x86-64 CPUs, rows on different adapters run the
compiled kernel of :mod:`adapters_core.serving.cpu_bgmv`, which reads each row's weights straight from
the slot bank by slot id (decode steps and prefills alike: no gathered copies, nothing written when a
row joins), and only its own slot's rank columns (``slot_ranks``): an r=8 row next to an r=64 row
reads an r=8 adapter's weights, and a row whose adapter leaves this layer alone reads nothing.
Without it, ``row_capacity`` gives the layer *row buffers* ``A_rows (rows, in, r)`` and ``B_rows
(rows, r, out)``: copies of the slot weights of each row of the running batch, written when a row
joins, so that a decode step multiplies in place with ``bmm`` on views (on CPUs, where decode is
bound by reading adapter weights, about half the cost of gathering from the bank every step), in bands
of rank columns when the rows' ranks differ (``SlotRouting.bands``: each row multiplies about its own
rank, not the batch's largest); other forwards gather and use ``bmm``. On CUDA devices a decode step (rows
on different adapters, or on one) is one launch per layer of the fused Triton kernel of
:mod:`adapters_core.serving.gpu_bgmv` (``step_kernel``), reading the bank by slot id.
:class:`SlotModuleSwap` serves ``modules_to_save``: rows whose adapter has its own copy of the module
go through that copy, grouped by slot. :class:`SlotBias` adds trained biases on modules an adapter
does not put LoRA on. Wrappers nest as ``SlotModuleSwap(SlotBias(SlotLoraLayer(base)))``, each
present only where some adapter needs it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters_core.errors import AdapterStateError
from adapters_core.methods.lora.base_layers import BaseLayerInfo
from adapters_core.serving.cpu_bgmv import BankCall, Bgmv
from adapters_core.serving.gpu_bgmv import GpuBgmv, KernelUnavailable
from adapters_core.serving.kernels import (
    RankBand,
    RowIndex,
    lora_delta,
    lora_delta_bank_step,
    lora_delta_row_bands,
    lora_delta_rows,
    lora_expand,
    rank_bands,
)


@dataclass(frozen=True)
class SlotRouting:
    """The slot of every row of the current forward, shared by all slot layers of a model."""

    slots: torch.Tensor
    distinct: frozenset[int]
    uniform: int | None
    index: RowIndex
    rows_synced: bool = False  # the row buffers hold row i's slot weights at position i (see SlotLoraLayer)
    decode_rows: int = 0  # rows_synced with more than one slot: the batch size, else 0 (the decode hot path)
    rank: int | None = None  # the largest LoRA rank of the routed slots (None: unknown, use every column)
    highest: int = 0  # the largest routed slot id
    # decode steps on row buffers whose rows have different ranks: every row multiplies the first
    # ``bands[0].high`` rank columns in place, and each further band (low, high, rows) only the rows whose
    # rank reaches ``high`` (see lora_delta_row_bands); empty: one product of the batch's largest rank
    bands: tuple[RankBand, ...] = ()

    @classmethod
    def of(cls, slots: list[int], device: torch.device, *, rows_synced: bool = False,
           ranks: Mapping[int, int] | None = None) -> SlotRouting:
        """``ranks``: each loaded slot's largest LoRA rank (None: unknown, products use every column)."""
        tensor = torch.tensor(slots, dtype=torch.long, device=device)
        distinct = frozenset(slots)
        uniform = next(iter(distinct)) if len(distinct) == 1 else None
        decode_rows = len(slots) if rows_synced and uniform is None else 0
        rank = None if ranks is None else max(ranks.get(s, 0) for s in distinct)
        bands = rank_bands([ranks.get(s, 0) for s in slots], device) if decode_rows and ranks is not None else ()
        return cls(tensor, distinct, uniform, RowIndex(tensor), rows_synced, decode_rows, rank, max(distinct, default=0),
                   bands)

    @property
    def batch_size(self) -> int:
        return int(self.slots.shape[0])


@dataclass(frozen=True)
class _RowViews:
    """What a decode step of ``batch`` rows at rank ``width`` multiplies (see ``SlotLoraLayer._rows_for``)."""

    batch: int
    width: int
    a: torch.Tensor  # (batch, in, width) view of the row buffers
    b: torch.Tensor  # (batch, width, out)


class RoutingState:
    """Mutable holder of the current :class:`SlotRouting` (``None``: every row is the base model)."""

    def __init__(self) -> None:
        self.current: SlotRouting | None = None


@dataclass
class SlotWeights:
    """One adapter's tensors for one layer, in the bank's layout, ready to copy into a slot."""

    a: torch.Tensor | None = None  # (in, r)
    b: torch.Tensor | None = None  # (r, out), scaled
    lora_bias: torch.Tensor | None = None  # (out,), scaled
    gain: torch.Tensor | None = None  # (out,): DoRA's m / ‖W + s·B·A‖
    bias_delta: torch.Tensor | None = None  # (out,)

    @property
    def rank(self) -> int:
        return 0 if self.a is None else int(self.a.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.b, self.lora_bias, self.gain, self.bias_delta) if t is not None]


class _Wrapper(nn.Module):
    """A slot wrapper around ``base_layer`` that still shows the base layer's ``weight`` (code that
    inspects ``module.weight``, such as tied-embedding checks, keeps working)."""

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        w = self.base_layer.weight
        assert isinstance(w, torch.Tensor)
        return w


class SlotLoraLayer(_Wrapper):
    """``base_layer`` plus per-slot LoRA buffers (see the module docstring)."""

    def __init__(self, base_layer: nn.Module, info: BaseLayerInfo, routing: RoutingState, num_slots: int,
                 dtype: torch.dtype, device: torch.device, row_capacity: int = 0, kernel: Bgmv | None = None,
                 weight_dtype: torch.dtype | None = None, step_kernel: GpuBgmv | None = None) -> None:
        """``dtype``: the products' (and the small per-slot vectors'); ``weight_dtype``: A's and B's storage;
        ``kernel``: the compiled CPU kernel; ``step_kernel``: the fused GPU kernel for decode steps."""
        super().__init__()
        self.base_layer = base_layer
        self.info = info
        self._routing = routing
        self.num_slots = num_slots
        self.row_capacity = row_capacity if info.kind == "linear" else 0
        self.dtype, self.device = dtype, device
        self.weight_dtype = weight_dtype or dtype
        self.a: torch.Tensor | None = None
        self.b: torch.Tensor | None = None
        self.rows_a: torch.Tensor | None = None
        self.rows_b: torch.Tensor | None = None
        self._row_views: _RowViews | None = None
        self._bgmv = kernel  # the compiled CPU kernel, reading the slot bank (None: torch)
        self._bank_calls: dict[int, BankCall | None] = {}  # by rank width, over the current slot bank
        self.step_kernel = step_kernel  # the fused GPU kernel, one launch per decode step (None: torch)
        self._flat_bank: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lora_bias: torch.Tensor | None = None
        self.gain: torch.Tensor | None = None
        self.bias_delta: torch.Tensor | None = None
        # each slot's LoRA rank on this layer (0: none), read by the kernel at every call
        self.slot_ranks = torch.zeros(num_slots, dtype=torch.int64)
        self._slot_ranks_view = self.slot_ranks.numpy()  # element writes without a tensor op per slot load
        self.lora_slots: set[int] = set()
        self.lora_bias_slots: set[int] = set()
        self.gain_slots: set[int] = set()
        self.bias_slots: set[int] = set()
        self.used_slots: frozenset[int] = frozenset()
        self._extra_slots: frozenset[int] = frozenset()  # slots with DoRA, lora_bias or a bias delta here
        bias = getattr(base_layer, "bias", None)
        self._base_bias = bias.detach() if isinstance(bias, torch.Tensor) else None

    @property
    def rank_capacity(self) -> int:
        return 0 if self.a is None else int(self.a.shape[2])

    # ------------------------------------------------------------------ slot writes
    def _vector(self, fill: float) -> torch.Tensor:
        return torch.full((self.num_slots, self.info.out_features), fill, dtype=self.dtype, device=self.device)

    def _ensure_rank(self, rank: int) -> None:
        """Allocate (or grow) ``A``/``B`` to hold rank ``rank`` in every slot."""
        if rank <= self.rank_capacity:
            return
        a = torch.zeros((self.num_slots, self.info.in_features, rank), dtype=self.weight_dtype, device=self.device)
        b = torch.zeros((self.num_slots, rank, self.info.out_features), dtype=self.weight_dtype, device=self.device)
        if self.a is not None and self.b is not None:
            old = self.rank_capacity
            a[:, :, :old] = self.a
            b[:, :old, :] = self.b
        self.a, self.b = a, b
        self._bank_calls.clear()
        # the bank viewed flat, for single-token steps reading it by slot (only where its dtype is the products')
        self._flat_bank = ((a.view(-1, rank), b.view(-1, self.info.out_features)) if self.weight_dtype == self.dtype
                           and self.info.kind == "linear" else None)
        if self.row_capacity:  # the owner re-syncs every row after a layer changes shape
            shape_a, shape_b = (self.row_capacity, *a.shape[1:]), (self.row_capacity, *b.shape[1:])
            self.rows_a = torch.zeros(shape_a, dtype=self.dtype, device=self.device)
            self.rows_b = torch.zeros(shape_b, dtype=self.dtype, device=self.device)
            self._row_views = None

    def write(self, slot: int, weights: SlotWeights) -> None:
        """Copy ``weights`` into ``slot`` (whatever the slot held on this layer before is replaced)."""
        if weights.a is not None and weights.b is not None:
            rank = weights.rank
            self._ensure_rank(rank)
            self.clear(slot, keep_lora=rank == self.rank_capacity, refresh=False)
            assert self.a is not None and self.b is not None
            self.a[slot, :, :rank].copy_(weights.a, non_blocking=True)
            self.b[slot, :rank, :].copy_(weights.b, non_blocking=True)
            self._slot_ranks_view[slot] = rank
            self.lora_slots.add(slot)
        else:
            self.clear(slot, refresh=False)
        if weights.lora_bias is not None:
            if self.lora_bias is None:
                self.lora_bias = self._vector(0.0)
            self.lora_bias[slot].copy_(weights.lora_bias, non_blocking=True)
            self.lora_bias_slots.add(slot)
        if weights.gain is not None:
            if self.gain is None:
                self.gain = self._vector(1.0)
            self.gain[slot].copy_(weights.gain, non_blocking=True)
            self.gain_slots.add(slot)
        if weights.bias_delta is not None:
            if self.bias_delta is None:
                self.bias_delta = self._vector(0.0)
            self.bias_delta[slot].copy_(weights.bias_delta, non_blocking=True)
            self.bias_slots.add(slot)
        self._refresh_used()

    def clear(self, slot: int, *, keep_lora: bool = False, refresh: bool = True) -> None:
        """Zero ``slot`` on this layer (its rows then get the base layer's output); ``keep_lora`` skips
        zeroing A/B that the caller overwrites in full; ``refresh=False`` leaves the used-slot sets to a
        caller that writes the slot next."""
        self._slot_ranks_view[slot] = 0
        if slot in self.lora_slots and self.a is not None and self.b is not None and not keep_lora:
            self.a[slot].zero_()
            self.b[slot].zero_()
        if slot in self.lora_bias_slots and self.lora_bias is not None:
            self.lora_bias[slot].zero_()
        if slot in self.gain_slots and self.gain is not None:
            self.gain[slot].fill_(1.0)
        if slot in self.bias_slots and self.bias_delta is not None:
            self.bias_delta[slot].zero_()
        for used in (self.lora_slots, self.lora_bias_slots, self.gain_slots, self.bias_slots):
            used.discard(slot)
        if refresh:
            self._refresh_used()

    def _refresh_used(self) -> None:
        extra = self.lora_bias_slots | self.gain_slots | self.bias_slots
        # plain values: set past nn.Module.__setattr__, whose checks would be most of a slot load's cost
        object.__setattr__(self, "used_slots", frozenset(self.lora_slots | extra))
        object.__setattr__(self, "_extra_slots", frozenset(extra))

    def sync_rows(self, rows: torch.Tensor, slots: torch.Tensor, first: int | None = None) -> None:
        """Row buffers ``rows[k]`` := slot ``slots[k]``'s A and B, one gather per matrix (a slot with no LoRA
        on this layer holds zeros in the bank, so its rows get zeros). ``first``: the rows are
        ``first, first + 1, ...`` (a batch joining), gathered straight into place."""
        if self.rows_a is None or self.rows_b is None or self.a is None or self.b is None:
            return
        if self.rows_a.dtype != self.a.dtype:  # a float16 bank: the row buffers hold the products' dtype
            for bank, buffer in ((self.a, self.rows_a), (self.b, self.rows_b)):
                gathered = bank.index_select(0, slots).to(buffer.dtype)
                if first is not None:
                    buffer[first:first + len(rows)].copy_(gathered)
                else:
                    buffer.index_copy_(0, rows, gathered)
            return
        if first is not None:
            end = first + len(rows)
            torch.index_select(self.a, 0, slots, out=self.rows_a[first:end])
            torch.index_select(self.b, 0, slots, out=self.rows_b[first:end])
            return
        self.rows_a.index_copy_(0, rows, self.a.index_select(0, slots))
        self.rows_b.index_copy_(0, rows, self.b.index_select(0, slots))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self._routing.current
        if routing is None or routing.distinct.isdisjoint(self.used_slots):
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        out: torch.Tensor
        if plain := (type(base) is nn.Linear and not args and not kwargs):  # called directly: one frame less
            out = F.linear(x, base.weight, base.bias)
        else:
            out = base(x, *args, **kwargs)
        if (x.dim() == 3 and x.dtype == self.dtype and routing.distinct.isdisjoint(self._extra_slots)
                and not torch.is_grad_enabled()):
            # the hot paths: plain LoRA (no DoRA, lora_bias or bias deltas) on the bank by slot id
            width = self._width(routing)
            if (self.step_kernel is not None and x.shape[0] == routing.batch_size
                    and (x.shape[1] == 1 or routing.uniform is None) and self.step_kernel.accepts(x, out)):
                # on a GPU: a decode step (rows on one adapter or on many) in one launch, a prefill of rows on
                # different adapters in two (rows all on one adapter prefill through two dense products below)
                assert self.a is not None and self.b is not None
                try:
                    return self.step_kernel.step(x, self.a, self.b, routing.slots, width, out)
                except KernelUnavailable:  # it could not launch (logged; it accepts nothing more): torch
                    pass
            if routing.uniform is not None:  # one adapter for every row: two dense products, below
                return self._add_adapters(x, out, routing)
            if self._bgmv is not None and x.shape[0] == routing.batch_size:
                # the compiled kernel, reading each row's weights from the bank by slot (a plain Linear's
                # output is a fresh (batch, tokens, out) tensor of x's dtype and device: only x's layout to check)
                call = self._bank_call(width)
                if call is not None and (x.stride(2) == 1 if plain else call.accepts(x, out)):
                    return call(x, out, routing.slots, routing.highest)
            batch = routing.decode_rows
            if batch and self.rows_a is not None and x.shape[0] == batch and x.shape[1] == 1:
                # a decode step without the kernel: weights already at the rows' positions in the row buffers
                return self._delta_on_rows(x, routing, batch, width, out)
            if (x.shape[1] == 1 and x.shape[0] == routing.batch_size and self._flat_bank is not None
                    and out.dtype == x.dtype and out.is_contiguous()):
                # a decode step without the kernel or row buffers (GPUs): embedding_bag over the bank
                return lora_delta_bank_step(x, *self._flat_bank, routing.index, width, out)
        return self._add_adapters(x, out, routing)

    def _bank_call(self, width: int) -> BankCall | None:
        """The kernel's call over the current slot bank at rank ``width`` (bound once per width; cleared when
        the bank grows); each row multiplies at most its own slot's rank of those columns."""
        try:
            return self._bank_calls[width]
        except KeyError:
            assert self._bgmv is not None and self.a is not None and self.b is not None
            call = self._bank_calls[width] = self._bgmv.prepare_bank(self.a, self.b, width, self.slot_ranks)
            return call

    def _width(self, routing: SlotRouting) -> int:
        """Rank columns the routed rows need: the largest rank among their slots, not the capacity
        (an adapter of a higher rank loaded into another slot costs these rows nothing; the columns
        beyond a slot's own rank hold zeros)."""
        capacity = self.rank_capacity
        rank = routing.rank
        return capacity if rank is None or rank >= capacity else max(rank, 1)

    def _delta_on_rows(self, x: torch.Tensor, routing: SlotRouting, batch: int, width: int,
                       out: torch.Tensor | None) -> torch.Tensor:
        """A decode step's products on the row buffers (added to ``out``, else returned): one product of
        ``width`` rank columns, or bands of them when the rows' ranks differ (each row about its own rank)."""
        assert self.rows_a is not None and self.rows_b is not None
        if routing.bands:
            return lora_delta_row_bands(x, self.rows_a, self.rows_b, routing.bands, width, out)
        views = self._rows_for(batch, width)
        return lora_delta_rows(x, views.a, views.b, out)

    def _rows_for(self, batch: int, width: int) -> _RowViews:
        """``(batch, in, width)`` and ``(batch, width, out)`` views of the first ``batch`` row buffers' first
        ``width`` rank components, kept while both hold (a decode step's forward asks once per layer, every
        step). Narrower than the capacity, A's view is strided; keeping A transposed would make it
        contiguous but slows the common case, every rank equal (docs/benchmarks.md, "Mixed ranks")."""
        views = self._row_views
        if views is None or views.batch != batch or views.width != width:
            assert self.rows_a is not None and self.rows_b is not None
            views = self._row_views = _RowViews(batch, width, self.rows_a[:batch, :, :width],
                                                self.rows_b[:batch, :width])
        return views

    def _add_adapters(self, x: torch.Tensor, result: torch.Tensor, routing: SlotRouting) -> torch.Tensor:
        batch = routing.batch_size
        if x.shape[0] != batch:
            raise AdapterStateError(f"the forward has {x.shape[0]} rows but {batch} slot ids were routed")
        out3 = result.reshape(batch, -1, result.shape[-1])
        if torch.is_grad_enabled() or not result.is_contiguous() or out3.dtype != self.dtype:
            out3 = out3.to(self.dtype).clone()  # in-place updates below must not touch a tensor autograd needs
        slots, uniform, distinct = routing.slots, routing.uniform, routing.distinct
        dora = self.gain is not None and not distinct.isdisjoint(self.gain_slots)
        plain = None
        if dora:
            plain = out3 - self._base_bias if self._base_bias is not None else out3.clone()  # W·x
        if self.bias_delta is not None and not distinct.isdisjoint(self.bias_slots):
            out3.add_(_per_row(self.bias_delta, slots, uniform))
        has_lora = self.a is not None and not distinct.isdisjoint(self.lora_slots)
        has_lora_bias = self.lora_bias is not None and not distinct.isdisjoint(self.lora_bias_slots)
        if not dora and not has_lora_bias:
            if has_lora:
                self._lora(x, slots, uniform, routing.index, out=out3)
        else:
            delta = self._lora(x, slots, uniform, routing.index, out=None) if has_lora else torch.zeros_like(out3)
            if has_lora_bias:
                assert self.lora_bias is not None
                delta = delta + _per_row(self.lora_bias, slots, uniform)
            if dora:
                assert self.gain is not None and plain is not None
                gain = _per_row(self.gain, slots, uniform)
                out3.add_((gain - 1) * plain + gain * delta)
            else:
                out3.add_(delta)
        out = out3.view(result.shape)
        return out if out.dtype == result.dtype else out.to(result.dtype)

    def _lora(self, x: torch.Tensor, slots: torch.Tensor, uniform: int | None, index: RowIndex,
              out: torch.Tensor | None) -> torch.Tensor:
        assert self.a is not None and self.b is not None
        batch = slots.shape[0]
        if self.info.kind == "embedding":
            ids = x.reshape(batch, -1)
            if uniform is not None:
                h = F.embedding(ids, self.a[uniform])
            else:
                vocab = self.info.in_features
                h = F.embedding(ids + (slots * vocab).unsqueeze(1), self.a.view(-1, self.a.shape[-1]))
            return lora_expand(h.to(self.dtype), self.b, slots, uniform, index, out)
        x3 = x.reshape(batch, -1, x.shape[-1])
        if x3.dtype != self.dtype:
            x3 = x3.to(self.dtype)
        routing = self._routing.current
        width = self.rank_capacity if routing is None else self._width(routing)
        if routing is not None and self._bgmv is not None and (uniform is None or x3.shape[1] > 1):
            # the kernel reads each row's weights from the bank by slot (no gathered copies) and, in a
            # prefill, keeps them in cache while the row's tokens go through (rows all on one adapter in a
            # decode step are one matrix product of torch's instead)
            call = self._bank_call(width)
            if call is not None:
                target = out if out is not None else x3.new_zeros((batch, x3.shape[1], self.info.out_features))
                if call.accepts(x3, target):
                    return call(x3, target, slots, routing.highest)
        if routing is not None and routing.decode_rows == batch and x3.shape[1] == 1 and self.rows_a is not None:
            return self._delta_on_rows(x3, routing, batch, width, out)
        return lora_delta(x3, self.a, self.b, slots, uniform, index, out, width=width)


def _per_row(table: torch.Tensor, slots: torch.Tensor, uniform: int | None) -> torch.Tensor:
    """``table[sᵢ]`` broadcast over row ``i``'s tokens: ``(batch or 1, 1, out)``."""
    if uniform is not None:
        return table[uniform].view(1, 1, -1)
    return table.index_select(0, slots).unsqueeze(1)


class SlotBias(_Wrapper):
    """A per-slot addition to a module's output bias: ``y[i] = base(x[i]) + delta[sᵢ]``.

    Serves trained biases (``bias="all"``/``"lora_only"``) on modules an adapter does not put LoRA on:
    linear layers and layer norms, whose bias is added last.
    """

    def __init__(self, base_layer: nn.Module, routing: RoutingState, num_slots: int, features: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._routing = routing
        self.delta = torch.zeros((num_slots, features), dtype=dtype, device=device)
        self.used_slots: frozenset[int] = frozenset()

    def write(self, slot: int, delta: torch.Tensor) -> None:
        self.delta[slot].copy_(delta, non_blocking=True)
        self.used_slots = self.used_slots | {slot}

    def clear(self, slot: int) -> None:
        self.delta[slot].zero_()
        self.used_slots = self.used_slots - {slot}

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        routing = self._routing.current
        if routing is None or routing.distinct.isdisjoint(self.used_slots):
            return result
        rows = _per_row(self.delta, routing.slots, routing.uniform)
        shape = (rows.shape[0],) + (1,) * (result.dim() - 2) + (rows.shape[-1],)
        return result + rows.view(shape).to(result.dtype)


class SlotModuleSwap(_Wrapper):
    """``modules_to_save`` at serving time: rows whose slot has its own copy of the module use it."""

    def __init__(self, base_layer: nn.Module, routing: RoutingState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._routing = routing
        self.copies = nn.ModuleDict()

    @property
    def used_slots(self) -> frozenset[int]:
        return frozenset(int(k) for k in self.copies)

    def original(self) -> nn.Module:
        """The base model's own module (unwrapping slot layers nested inside)."""
        inner = self.base_layer
        while isinstance(inner, SlotLoraLayer | SlotBias):
            inner = inner.base_layer
        return inner

    def write(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        """Give ``slot`` its own copy of the module, holding ``state``."""
        clone = copy.deepcopy(self.original())
        clone.load_state_dict(state)
        clone.requires_grad_(False)
        self.copies[str(slot)] = clone

    def clear(self, slot: int) -> None:
        if str(slot) in self.copies:
            del self.copies[str(slot)]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self._routing.current
        if routing is None or not self.copies or routing.distinct.isdisjoint(self.used_slots):
            return self.base_layer(x, *args, **kwargs)
        if routing.uniform is not None:
            return self.copies[str(routing.uniform)](x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs).clone()
        for slot in routing.distinct & self.used_slots:
            rows = (routing.slots == slot).nonzero().squeeze(1)
            result[rows] = self.copies[str(slot)](x[rows], *args, **kwargs).to(result.dtype)
        return result
