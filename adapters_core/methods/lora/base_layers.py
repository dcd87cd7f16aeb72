"""Which base layers LoRA can wrap, chosen by a list of dispatch functions (not an isinstance ladder).

Every supported layer is described in ``nn.Linear`` terms: LoRA's ``A`` is ``(r, in_features)``
and ``B`` is ``(out_features, r)``; ``fan_in_fan_out`` says the stored weight is ``(in, out)``
(GPT-2's ``Conv1D``, and ``nn.Embedding`` whose ``(vocab, dim)`` table is ``(in, out)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import nn

from adapters_core import quant


@dataclass(frozen=True)
class BaseLayerInfo:
    """What LoRA needs to know about a base layer."""

    kind: Literal["linear", "embedding"]
    in_features: int
    out_features: int
    fan_in_fan_out: bool
    quantized: bool


def _embedding(module: nn.Module) -> BaseLayerInfo | None:
    if isinstance(module, nn.Embedding):
        return BaseLayerInfo("embedding", module.num_embeddings, module.embedding_dim, True, False)
    return None


def _conv1d(module: nn.Module) -> BaseLayerInfo | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return None
    if isinstance(module, Conv1D):
        n_in, n_out = module.weight.shape
        return BaseLayerInfo("linear", int(n_in), int(n_out), True, False)
    return None


def _bitsandbytes(module: nn.Module) -> BaseLayerInfo | None:
    if quant.is_quantized(module):
        linear = cast(nn.Linear, module)  # bitsandbytes layers subclass nn.Linear
        return BaseLayerInfo("linear", linear.in_features, linear.out_features, False, True)
    return None


def _linear(module: nn.Module) -> BaseLayerInfo | None:
    if isinstance(module, nn.Linear):
        return BaseLayerInfo("linear", module.in_features, module.out_features, False, False)
    return None


DISPATCHERS: list[Callable[[nn.Module], BaseLayerInfo | None]] = [_embedding, _conv1d, _bitsandbytes, _linear]


def describe(module: nn.Module) -> BaseLayerInfo | None:
    """Describe ``module`` for LoRA, or ``None`` when no dispatcher supports its type."""
    for dispatch in DISPATCHERS:
        info = dispatch(module)
        if info is not None:
            return info
    return None


def is_linear_like(module: nn.Module) -> bool:
    """True for the layers ``target_modules="all-linear"`` selects (Linear, Conv1D, bnb linear)."""
    info = describe(module)
    return info is not None and info.kind == "linear"


def linear_weight(module: nn.Module, info: BaseLayerInfo) -> torch.Tensor:
    """The base weight in ``(out, in)`` layout, dequantized, detached (a view when possible)."""
    weight = quant.dequantized_weight(module)
    return weight.t() if info.fan_in_fan_out else weight


def write_linear_weight(module: nn.Module, info: BaseLayerInfo, weight: torch.Tensor) -> None:
    """Store an ``(out, in)`` weight back into ``module`` in its own layout (re-quantizing if needed)."""
    quant.write_weight(module, weight.t() if info.fan_in_fan_out else weight)
