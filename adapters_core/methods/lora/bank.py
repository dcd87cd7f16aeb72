"""Slot-stacked LoRA weights of one layer, for batches whose rows use different adapters.

Semantics, per row ``i`` with slot ``sᵢ`` (slot 0 = base model, all zeros)::

    h[i]  = x[i] @ A[sᵢ]ᵀ                      (embeddings: rows of A[sᵢ] looked up by token id)
    δ[i]  = h[i] @ (scale[sᵢ]·B[sᵢ])ᵀ + scale[sᵢ]·bias[sᵢ]
    y[i] += δ[i]                                 for LoRA rows
    y[i] += (g[sᵢ] − 1)·(y[i] − b) + g[sᵢ]·δ[i]  for DoRA rows, g = m / ‖W + s·B·A‖ (1 for LoRA)

Ranks are zero-padded to the layer's largest rank, which leaves every product exact. The whole
batch costs one gather and two batched matmuls, whatever the number of distinct adapters
(S-LoRA / Punica's idea, in plain torch); a fused kernel can replace :meth:`LoraBank.apply`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from adapters_core.methods.lora.layer import LoraLayer


@dataclass
class LoraBank:
    """Stacked weights: ``A (slots, r_max, in)``, ``B (slots, out, r_max)`` pre-scaled, and extras."""

    signature: tuple[int, ...]
    a: torch.Tensor
    b_scaled: torch.Tensor
    bias_scaled: torch.Tensor | None
    dora_gain: torch.Tensor | None
    a_flat: torch.Tensor | None = None  # embeddings: (slots * vocab, r_max) lookup table
    base_bias: torch.Tensor | None = None  # the base layer's bias, which DoRA's gain must not scale

    def apply(
        self, x: torch.Tensor, result: torch.Tensor, slots: torch.Tensor, embedding: nn.Module | None = None
    ) -> torch.Tensor:
        """``result`` plus each row's adapter contribution (see the module docstring)."""
        b = self.b_scaled.index_select(0, slots)  # (batch, out, r)
        if embedding is not None:
            assert self.a_flat is not None
            vocab = self.a.shape[2]
            flat_ids = x + (slots * vocab).view(-1, *([1] * (x.dim() - 1)))
            h = F.embedding(flat_ids, self.a_flat)
        else:
            a = self.a.index_select(0, slots)  # (batch, r, in)
            x3 = x.to(a.dtype)
            h = torch.bmm(x3.reshape(x3.shape[0], -1, x3.shape[-1]), a.transpose(1, 2))
        h = h.reshape(h.shape[0], -1, h.shape[-1])
        out_shape = result.shape
        res3 = result.reshape(result.shape[0], -1, result.shape[-1])
        if self.dora_gain is None and self.bias_scaled is None and res3.dtype == h.dtype:
            if not torch.is_grad_enabled() and result.is_contiguous():
                res3.baddbmm_(h, b.transpose(1, 2))  # no autograd graph: accumulate in place
                return result
            return torch.baddbmm(res3, h, b.transpose(1, 2)).view(out_shape)
        delta = torch.bmm(h, b.transpose(1, 2))
        if self.bias_scaled is not None:
            delta = delta + self.bias_scaled.index_select(0, slots).unsqueeze(1)
        if self.dora_gain is None:
            return (res3 + delta.to(res3.dtype)).view(out_shape)
        gain = self.dora_gain.index_select(0, slots).unsqueeze(1)  # (batch, 1, out)
        return (res3 + ((gain - 1) * self._without_bias(res3) + gain * delta).to(res3.dtype)).view(out_shape)

    def _without_bias(self, res3: torch.Tensor) -> torch.Tensor:
        return res3 - self.base_bias if self.base_bias is not None else res3


def build_bank(
    layer: LoraLayer, slots: dict[str, int], dora_norms: dict[str, torch.Tensor], signature: tuple[int, ...]
) -> LoraBank:
    """Stack ``layer``'s adapters by global slot id (slots of adapters not on this layer stay zero)."""
    info = layer.info
    names = list(layer.specs)
    n_slots = max(slots.values(), default=0) + 1
    r_max = max(layer.specs[n].r for n in names)
    ref = layer.lora_A[names[0]]
    dtype, device = ref.dtype, ref.device
    a = torch.zeros((n_slots, r_max, info.in_features), dtype=dtype, device=device)
    b = torch.zeros((n_slots, info.out_features, r_max), dtype=dtype, device=device)
    any_bias = any(layer.specs[n].lora_bias for n in names)
    any_dora = any(layer.specs[n].use_dora for n in names)
    bias = torch.zeros((n_slots, info.out_features), dtype=dtype, device=device) if any_bias else None
    gain = torch.ones((n_slots, info.out_features), dtype=dtype, device=device) if any_dora else None
    for name in names:
        spec = layer.specs[name]
        slot = slots[name]
        scale = spec.scaling
        if info.kind == "embedding":
            embed_scale = getattr(layer.base_layer, "embed_scale", None)
            if embed_scale is not None:
                scale = scale * float(embed_scale)
        a[slot, : spec.r] = layer.lora_A[name].detach()
        b[slot, :, : spec.r] = layer.lora_B[name].detach() * scale
        if bias is not None and spec.lora_bias:
            bias[slot] = layer.lora_B_bias[name].detach() * scale
        if gain is not None and spec.use_dora:
            gain[slot] = layer.lora_magnitude_vector[name].detach() / dora_norms[name]
    bank = LoraBank(signature=signature, a=a, b_scaled=b, bias_scaled=bias, dora_gain=gain)
    if info.kind == "embedding":
        bank.a_flat = a.transpose(1, 2).reshape(n_slots * info.in_features, r_max).contiguous()
    if gain is not None:
        base_bias = getattr(layer.base_layer, "bias", None)
        bank.base_bias = base_bias.detach() if base_bias is not None else None
    return bank
