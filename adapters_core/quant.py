"""bitsandbytes 4-bit / 8-bit base layers (QLoRA).

The engine never imports bitsandbytes unless a quantized layer is actually present. Everything a
method needs from a base layer goes through three functions, whatever the layer's backend:

* :func:`is_quantized` — is this a bitsandbytes ``Linear4bit`` / ``Linear8bitLt``;
* :func:`dequantized_weight` — the weight as a float tensor in ``nn.Linear`` layout ``(out, in)``;
* :func:`write_weight` — replace the weight from a float tensor, re-quantizing when the layer is
  quantized (used by merge / unmerge / PiSSA / OLoRA init).

plus :func:`install_backward_guard`, which a model with trainable adapters calls once (see below).

What the layers hold (bitsandbytes 0.4x–0.50):

* ``Linear4bit``: ``weight`` is a ``Params4bit`` of packed 4-bit codes (two per byte, row-major,
  high nibble first) and ``weight.quant_state`` holds one ``absmax`` per ``blocksize`` values
  (itself 8-bit quantized when ``nested``, i.e. double quantization). ``dequantize_4bit`` reads
  that layout.
* **CPU repacking.** On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode with an input
  that needs no gradient rewrites the weight *in place* into a tiled layout for its bf16 GEMV
  kernel (``functional._convert_weight_packed_for_cpu``): codes become ``(out, in/2)`` bytes in
  32-row tiles with the low nibble first, ``absmax`` becomes a bf16 ``(in/blocksize, out)``
  matrix, nested statistics are expanded, and ``quant_state.packing_format_for_cpu`` is set.
  ``dequantize_4bit`` on that layout returns garbage (and bitsandbytes' own inverse leaves
  non-nested ``absmax`` transposed), so :func:`dequantized_weight` decodes it itself, and the
  kernel it feeds has no autograd formula: see :func:`install_backward_guard`.
* ``Linear8bitLt``: ``weight`` is an ``Int8Params`` of int8 rows ``CB``; the row scales ``SCB``
  (absmax per output row) sit on the weight until the first forward moves them to
  ``module.state``. ``W = CB · SCB / 127``. With ``has_fp16_weights=True`` the weight is a plain
  float tensor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_TILE_N = 32  # rows per tile in bitsandbytes' CPU packing (``block_n`` of _convert_weight_packed_for_cpu)


def _bnb() -> Any:
    """The bitsandbytes module (imported only once a quantized layer is actually handled)."""
    import bitsandbytes

    return bitsandbytes


def _bnb_kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if not type(module).__module__.startswith("bitsandbytes"):
        return None
    if name in ("Linear4bit", "LinearNF4", "LinearFP4"):
        return "4bit"
    if name == "Linear8bitLt":
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes 4-bit and 8-bit linear layers."""
    return _bnb_kind(module) is not None


# ---------------------------------------------------------------------------------------- 4-bit
def _quant_state(module: Any) -> Any:
    qs = getattr(module.weight, "quant_state", None)
    return qs if qs is not None else getattr(module, "quant_state", None)


def _is_cpu_packed(qs: Any) -> bool:
    return bool(getattr(qs, "packing_format_for_cpu", False))


def _unpack_cpu_codes(data: torch.Tensor, qs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``_convert_weight_packed_for_cpu`` without touching the layer.

    Returns the 4-bit codes as an ``(out, in)`` uint8 tensor and ``absmax`` as a float32
    ``(out, in/blocksize)`` tensor (the bf16 values the packed kernel uses).
    """
    n, k = int(qs.shape[0]), int(qs.shape[1])
    packed = data.view(torch.uint8).reshape(-1, _TILE_N)
    # each 32-byte run holds 32 rows of one column pair: low nibbles column 2j, high nibbles 2j+1
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)
    codes = codes.reshape(n // _TILE_N, k // 2, _TILE_N, 2).transpose(1, 2).reshape(n, k)
    absmax = qs.absmax.t().to(torch.float32).reshape(n, k // qs.blocksize)
    return codes, absmax


def _dequantize_cpu_packed(module: Any, qs: Any) -> torch.Tensor:
    codes, absmax = _unpack_cpu_codes(module.weight.data, qs)
    n, k = codes.shape
    values = qs.code.to(torch.float32)[codes.long()]
    return (values.view(n, k // qs.blocksize, qs.blocksize) * absmax.unsqueeze(-1)).reshape(n, k)


def _dequantize_4bit(module: Any) -> torch.Tensor:
    weight = module.weight
    if not getattr(weight, "bnb_quantized", True):  # not quantized yet (layer never moved to a device)
        return weight.detach().to(torch.float32).clone()
    qs = _quant_state(module)
    if _is_cpu_packed(qs):
        return _dequantize_cpu_packed(module, qs)
    return _bnb().functional.dequantize_4bit(weight.data, qs).to(torch.float32)


def _restore_standard_layout(module: Any) -> None:
    """Rewrite a CPU-packed 4-bit weight back into bitsandbytes' standard layout, exactly.

    The codes are repacked row-major (high nibble first); ``absmax`` is kept as the float32 values
    of the bf16 scales the packed kernel used (not re-nested), so the effective weight is unchanged.
    """
    weight = module.weight
    qs = _quant_state(module)
    codes, absmax = _unpack_cpu_codes(weight.data, qs)
    flat = codes.reshape(-1)
    data = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8)
    data = data.reshape(getattr(qs, "original_qshape", (data.numel(), 1)))
    storage = getattr(qs, "original_storage_type", None)
    if storage is not None:
        data = data.view(storage)
    qs.absmax = absmax.reshape(-1).contiguous()
    qs.dtype = getattr(qs, "original_dtype", qs.dtype)
    qs.nested = False
    qs.state2 = None
    qs.offset = None
    qs.packing_format_for_cpu = False
    weight.data = data


def _requantize_4bit(module: Any, new_weight: torch.Tensor) -> None:
    bnb = _bnb()
    old = module.weight
    qs = _quant_state(module)
    device = old.device
    if qs is None:  # never quantized: the next move to a device quantizes it
        old.data = new_weight.detach().to(old.dtype).contiguous()
        return
    dtype = getattr(qs, "original_dtype", qs.dtype) if _is_cpu_packed(qs) else qs.dtype
    param = bnb.nn.Params4bit(
        new_weight.detach().to(device=device, dtype=dtype).contiguous(),
        requires_grad=False,
        quant_type=qs.quant_type,
        blocksize=qs.blocksize,
        compress_statistics=bool(getattr(old, "compress_statistics", False)),
        quant_storage=getattr(old, "quant_storage", torch.uint8),
        module=module,
    )
    module.weight = param.to(device)  # quantizes (and sets module.quant_state)


# ---------------------------------------------------------------------------------------- 8-bit
def _dequantize_8bit(module: Any) -> torch.Tensor:
    weight = module.weight
    if weight.dtype != torch.int8:  # has_fp16_weights=True, or not quantized yet
        return weight.detach().to(torch.float32).clone()
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = module.state.SCB  # moved there by the first forward (init_8bit_state)
    if scb is None:
        raise RuntimeError("bitsandbytes Linear8bitLt has int8 weights but no row scales (SCB)")
    return weight.data.to(torch.float32) * (scb.to(torch.float32).view(-1, 1) / 127.0)


def _requantize_8bit(module: Any, new_weight: torch.Tensor) -> None:
    bnb = _bnb()
    old = module.weight
    device = old.device
    if old.dtype != torch.int8:  # float weights (has_fp16_weights=True): write as is
        old.data = new_weight.detach().to(device=device, dtype=old.dtype).contiguous()
        return
    # Int8Params only quantizes when moved from CPU (int8_vectorwise_quant: CB, SCB per row)
    param = bnb.nn.Int8Params(
        new_weight.detach().to(device="cpu", dtype=torch.float16).contiguous(),
        requires_grad=False,
        has_fp16_weights=False,
    ).to(device)
    module.weight = param
    state = module.state
    if hasattr(state, "reset_grads"):
        state.reset_grads()
    # the next forward moves the new CB / SCB from the weight into the state
    state.CB = None
    state.SCB = None


# ---------------------------------------------------------------------------------------- API
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's effective weight as a float32 ``(out, in)`` tensor (a copy for quantized layers).

    For a quantized layer this is the weight its forward actually multiplies by, whichever layout
    bitsandbytes currently keeps it in (standard or CPU-packed 4-bit, SCB on weight or state).
    """
    kind = _bnb_kind(module)
    if kind is None:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return weight.detach()
    layer: Any = module
    return _dequantize_4bit(layer) if kind == "4bit" else _dequantize_8bit(layer)


def write_weight(module: nn.Module, new_weight: torch.Tensor) -> None:
    """Replace the layer's weight with ``new_weight`` (``(out, in)``), re-quantizing if needed.

    Quantized layers get a fresh bitsandbytes parameter quantized with the layer's own settings
    (quant type, block size, double quantization, storage dtype; 8-bit row scales), which the
    layer's next forward uses as is.
    """
    kind = _bnb_kind(module)
    if kind is None:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        weight.data = new_weight.to(weight.dtype).contiguous()
        return
    layer: Any = module
    if kind == "4bit":
        _requantize_4bit(layer, new_weight)
    else:
        _requantize_8bit(layer, new_weight)


def _unpack_before_grad(module: nn.Module, args: tuple[Any, ...]) -> None:
    if not torch.is_grad_enabled() or not args:
        return
    x = args[0]
    wants_grad = module.training or (isinstance(x, torch.Tensor) and x.requires_grad)
    if wants_grad and _is_cpu_packed(_quant_state(module)):
        _restore_standard_layout(module)


def install_backward_guard(model: nn.Module) -> int:
    """Keep gradients flowing through CPU-packed 4-bit layers; returns how many hooks were added.

    Once a ``Linear4bit`` has run an eval-mode, no-grad forward on CPU (evaluation, generation),
    bitsandbytes keeps serving it through a bf16 kernel that has no backward, even in training
    mode: a later forward whose input needs gradients (LoRA layers upstream of it) silently gets
    no gradient through the layer, and training forwards run with bf16 activations. The guard (a
    forward pre-hook on every 4-bit layer, idempotent) puts such a layer back into the standard
    layout first, exactly (same codes, the bf16 block scales as float32), whenever grad mode is on
    and the layer is training or its input needs gradients, so bitsandbytes takes its
    differentiable fp32 path. Eval-mode no-grad forwards repack it again as bitsandbytes does.
    """
    added = 0
    for module in model.modules():
        if _bnb_kind(module) != "4bit":
            continue
        if any(hook is _unpack_before_grad for hook in module._forward_pre_hooks.values()):
            continue
        module.register_forward_pre_hook(_unpack_before_grad)
        added += 1
    return added
