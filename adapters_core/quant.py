"""bitsandbytes 4-bit / 8-bit base layers (QLoRA).

The engine never imports bitsandbytes unless a quantized layer is actually present. Everything a
method needs from a base layer goes through three functions, whatever the layer's backend:

* :func:`is_quantized` — is this a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``;
* :func:`dequantized_weight` — the weight as a float tensor in ``nn.Linear`` layout ``(out, in)``;
* :func:`write_weight` — replace the weight from a float tensor, re-quantizing when the layer is
  quantized (used by merge / unmerge / PiSSA / OLoRA init).
"""

from __future__ import annotations

import torch
from torch import nn


def _bnb_kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4") and type(module).__module__.startswith("bitsandbytes"):
        return "4bit"
    if name == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes"):
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes 4-bit and 8-bit linear layers."""
    return _bnb_kind(module) is not None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float32 ``(out, in)`` tensor (a copy for quantized layers)."""
    kind = _bnb_kind(module)
    if kind is None:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return weight.detach()
    import bitsandbytes as bnb

    weight = module.weight
    if kind == "4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    # 8-bit: int8 rows with one absmax scale per row (SCB)
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return weight.data.to(torch.float32) * (scb.to(torch.float32).view(-1, 1) / 127.0)


def write_weight(module: nn.Module, new_weight: torch.Tensor) -> None:
    """Replace the layer's weight with ``new_weight`` (``(out, in)``), re-quantizing if needed."""
    kind = _bnb_kind(module)
    if kind is None:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        weight.data = new_weight.to(weight.dtype).contiguous()
        return
    import bitsandbytes as bnb

    old = module.weight
    device = old.device
    if kind == "4bit":
        qs = old.quant_state
        module.weight = bnb.nn.Params4bit(
            new_weight.to(torch.float32).cpu(),
            requires_grad=False,
            quant_type=qs.quant_type,
            blocksize=qs.blocksize,
            compress_statistics=getattr(old, "compress_statistics", True),
            quant_storage=getattr(old, "quant_storage", torch.uint8),
            module=module,
        ).to(device)
    else:
        module.weight = bnb.nn.Int8Params(
            new_weight.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False
        ).to(device)
        module.state.reset_grads() if hasattr(module.state, "reset_grads") else None
        module.state.SCB = None
        module.state.CB = None
