"""Turn an HF PEFT adapter (config + tensors) into :class:`PreparedAdapter`: per-layer tensors in
the slot banks' layout, checked against the base model, ready to be copied into any slot.

Everything an adapter file can hold for LoRA is accounted for, or refused with a typed error:
``lora_A``/``lora_B`` (Linear, Conv1D, bitsandbytes, Embedding), ``lora_B.bias`` (``lora_bias``),
DoRA magnitudes (folded into a per-row gain using the server's base weights), trained base biases
(``bias="all"``/``"lora_only"``, kept as a per-slot difference), ``modules_to_save`` copies, and the
embedding tables PEFT saves beside embedding adapters (accepted when equal to the base model's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from adapters_core.errors import (
    AdapterMismatchError,
    NonFiniteWeightsError,
    RankTooLargeError,
    UnknownPeftTypeError,
)
from adapters_core.methods.lora import base_layers
from adapters_core.methods.lora.config import LoraConfig
from adapters_core.model import embedding_table_keys, is_saved_base_tensor
from adapters_core.peft_format import KEY_PREFIX
from adapters_core.serving.layers import SlotWeights

if TYPE_CHECKING:
    from adapters_core.config import AdapterConfig
    from adapters_core.serving.slotted import SlottedModel


@dataclass
class PreparedAdapter:
    """An adapter in host memory, in the slot layout: what a slot load copies from."""

    config: LoraConfig
    layers: dict[str, SlotWeights]
    swaps: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # bias deltas on modules without LoRA

    @property
    def rank(self) -> int:
        """The largest LoRA rank over the adapter's layers."""
        return max((w.rank for w in self.layers.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Host bytes held (what the host-memory tier accounts), pinned tensors as torch's pinned-memory
        allocator holds them: each rounded up to a power of two (see :func:`held_bytes`)."""
        tensors = [t for w in self.layers.values() for t in w.tensors()]
        tensors += [t for s in self.swaps.values() for t in s.values()] + list(self.biases.values())
        return sum(held_bytes(t.numel() * t.element_size(), pinned=_is_pinned(t)) for t in tensors)


def held_bytes(nbytes: int, *, pinned: bool) -> int:
    """The host memory a tensor of ``nbytes`` holds: torch's caching pinned-memory allocator rounds every
    block up to a power of two (its default: no ``pinned_max_round_threshold``), so a pinned 2816 x 16
    bfloat16 weight (88 KiB) holds 128 KiB."""
    if not pinned or nbytes <= 1:
        return nbytes
    return 1 << (nbytes - 1).bit_length()


def _is_pinned(tensor: torch.Tensor) -> bool:
    return bool(tensor.is_pinned())


def lora_config(config: AdapterConfig) -> LoraConfig:
    """The config as LoRA, or :class:`UnknownPeftTypeError` (the only method slot banks serve yet)."""
    if not isinstance(config, LoraConfig):
        raise UnknownPeftTypeError(
            f"peft_type {config.peft_type!r} cannot be served yet: only LoRA adapters can", field="peft_type"
        )
    return config


def prepare_adapter(model: SlottedModel, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> PreparedAdapter:
    """Check ``tensors`` (PEFT keys) against ``model`` and lay them out for its slot banks.

    Raises :class:`AdapterMismatchError` for unexpected, missing or mis-shaped keys (an adapter for
    another base model), :class:`RankTooLargeError` past the model's ``max_rank``, and the
    targeting errors of the engine (:class:`TargetModulesNotFoundError`, ...).
    """
    lora = lora_config(config)
    remaining = {k.removeprefix(KEY_PREFIX): v for k, v in tensors.items()}
    targets = model.lora_targets(lora)
    layers: dict[str, SlotWeights] = {}
    for name in targets:
        layers[name] = _lora_weights(model, lora, name, remaining)
    prepared = PreparedAdapter(lora, layers)
    for name in model.saved_module_targets(lora):
        prepared.swaps[name] = _swap_state(model, name, remaining)
    tables = embedding_table_keys(model.model)  # whole tables PEFT's save_embedding_layers writes
    for key in sorted(remaining):
        if key.endswith(".bias") and lora.bias != "none":
            if not _inside_swap(key, remaining[key], prepared):
                _bias_delta(model, key, remaining[key], prepared)
        elif is_saved_base_tensor(key, tables):
            _check_base_tensor(model, key, remaining[key])
        else:
            raise AdapterMismatchError(f"unexpected key {KEY_PREFIX}{key} in the adapter file for this base model")
    return prepared


def _take(remaining: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    tensor = remaining.pop(key, None)
    if tensor is None:
        raise AdapterMismatchError(f"missing key {KEY_PREFIX}{key} in the adapter file")
    if tuple(tensor.shape) != shape:
        raise AdapterMismatchError(
            f"shape mismatch for {KEY_PREFIX}{key}: file has {tuple(tensor.shape)}, this base model needs {shape} "
            "(was the adapter trained on a different base model?)"
        )
    return tensor


def _lora_weights(model: SlottedModel, config: LoraConfig, name: str, remaining: dict[str, torch.Tensor]) -> SlotWeights:
    base = model.base_module(name)
    info = model.layer_info(name)
    rank = config.rank_for(name)
    if rank > model.max_rank:
        raise RankTooLargeError(
            f"{name} has LoRA rank {rank}, above this server's maximum of {model.max_rank}", rank=rank, limit=model.max_rank
        )
    alpha = config.alpha_for(name)
    scaling = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    dtype = model.dtype
    if info.kind == "embedding":
        a = _take(remaining, f"{name}.lora_embedding_A", (rank, info.in_features))
        b = _take(remaining, f"{name}.lora_embedding_B", (info.out_features, rank))
        embed_scale = getattr(base, "embed_scale", None)
        if embed_scale is not None:
            scaling *= float(embed_scale)
    else:
        a = _take(remaining, f"{name}.lora_A.weight", (rank, info.in_features))
        b = _take(remaining, f"{name}.lora_B.weight", (info.out_features, rank))
    weights = SlotWeights(a=_slot_weight(a, None, model.weight_dtype, f"{name} lora_A", pin=_pins(model)),
                          b=_slot_weight(b, scaling, model.weight_dtype, f"{name} lora_B (scaled)",
                                                       pin=_pins(model)))
    if config.lora_bias:
        bias = _take(remaining, f"{name}.lora_B.bias", (info.out_features,)).to(torch.float32)
        weights.lora_bias = _host(bias * scaling, dtype, pin=_pins(model))
    if config.use_dora:
        magnitude = _take(remaining, f"{name}.lora_magnitude_vector", (info.out_features,)).to(torch.float32)
        w = base_layers.linear_weight(base, info).to(torch.float32)
        delta = (b.to(w.device, torch.float32) @ a.to(w.device, torch.float32)) * scaling
        norm = torch.linalg.norm(w + delta, dim=1).cpu()
        weights.gain = _host(magnitude / norm, dtype, pin=_pins(model))
    return weights


def _swap_state(model: SlottedModel, name: str, remaining: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    original = model.base_module(name)
    state = {}
    for key, live in original.state_dict().items():
        state[key] = _host(_take(remaining, f"{name}.{key}", tuple(live.shape)), live.dtype, pin=_pins(model))
    return state


def _inside_swap(key: str, value: torch.Tensor, prepared: PreparedAdapter) -> bool:
    """Whether ``key`` is a bias PEFT's ``bias="all"`` saves from inside a ``modules_to_save`` wrapper: the
    copy's own (``X.modules_to_save.bias``, the same value as ``X.bias``) or the original module's under it
    (``X.original_module.bias``, which rows on this adapter never use)."""
    for name, state in prepared.swaps.items():
        if key.startswith(f"{name}.original_module."):
            return True
        inner = key.removeprefix(f"{name}.modules_to_save.")
        if inner != key:
            if inner not in state:
                raise AdapterMismatchError(f"unexpected key {KEY_PREFIX}{key}: {name} has no {inner}")
            if not torch.equal(value.to(state[inner].dtype), state[inner]):
                raise AdapterMismatchError(
                    f"{KEY_PREFIX}{key} differs from {KEY_PREFIX}{name}.{inner}: the file holds two values for the "
                    f"saved copy of {name}"
                )
            return True
    return False


def _bias_delta(model: SlottedModel, key: str, value: torch.Tensor, prepared: PreparedAdapter) -> None:
    """A trained base bias (``bias="all"``/``"lora_only"``): kept as its difference from the server's."""
    module = key.removesuffix(".bias").removesuffix(".base_layer")
    live = model.base_tensor(module, "bias")
    if live is None:
        raise AdapterMismatchError(f"unexpected key {KEY_PREFIX}{key}: the base model has no such bias")
    if tuple(live.shape) != tuple(value.shape):
        raise AdapterMismatchError(
            f"shape mismatch for {KEY_PREFIX}{key}: file has {tuple(value.shape)}, this base model needs {tuple(live.shape)}"
        )
    delta = value.to(torch.float32) - live.detach().to(torch.float32).cpu()
    if not bool(delta.any()):
        return
    if module in prepared.layers:
        prepared.layers[module].bias_delta = _host(delta, model.dtype, pin=_pins(model))
    elif model.bias_layer(module, int(delta.numel())):
        prepared.biases[module] = _host(delta, model.dtype, pin=_pins(model))
    else:
        raise AdapterMismatchError(
            f"{KEY_PREFIX}{key} changes the bias of {module}, a {type(model.base_module(module)).__name__}: serving "
            "applies trained biases per request only to linear layers and layer norms"
        )


def _check_base_tensor(model: SlottedModel, key: str, value: torch.Tensor) -> None:
    """PEFT saves base tensors beside some adapters (whole embedding tables, an output head's bias, a LoRA layer's
    base weight); serving needs them to be the base's own: equal, or equal once the base's is rounded to the
    file's dtype (an adapter file cast to bfloat16, or trained on a bfloat16 copy of a float32 base)."""
    attribute = key.rsplit(".", 1)[1]
    module = key.removesuffix(f".{attribute}").removesuffix(".base_layer")
    live = model.base_tensor(module, attribute)
    what = "embedding table" if attribute == "weight" else attribute
    if live is None or tuple(live.shape) != tuple(value.shape):
        shape = None if live is None else tuple(live.shape)
        raise AdapterMismatchError(
            f"{KEY_PREFIX}{key} has shape {tuple(value.shape)} but this base model's is {shape} "
            "(was the adapter trained on a different base model or with a resized vocabulary?)"
        )
    value = value.to(live.device)
    base = live.detach()
    same = torch.equal(value.to(base.dtype), base) or (
        value.dtype != base.dtype and torch.equal(value, base.to(value.dtype)))
    if not same:
        raise AdapterMismatchError(
            f"{KEY_PREFIX}{key} differs from this base model's {module} {what}"
            + (": the adapter was trained with a modified vocabulary, which serving cannot apply per request"
               if attribute == "weight" else ": serving cannot apply a changed base tensor per request")
        )


def _pins(model: SlottedModel) -> bool:
    """Whether host copies for ``model``'s slots are page-locked: where its slots are on a CUDA device (so that
    slot loads copy asynchronously); a model served on the CPU of a machine with a GPU pins nothing."""
    return model.device.type == "cuda"


def _slot_weight(tensor: torch.Tensor, scaling: float | None, dtype: torch.dtype, what: str, *,
                 pin: bool) -> torch.Tensor:
    """``tensor.T`` (times ``scaling``) for a slot: a new contiguous host tensor in ``dtype``, pinned where
    ``pin``, written in one pass (a cold load's host time is mostly these copies). The product is computed in
    float32 (or in ``dtype``'s float32 arithmetic when the file already holds ``dtype``: the same values) and
    rounded once. In float16, refuses values past its range (they would be Inf)."""
    source = tensor if tensor.dtype in (torch.float32, dtype) else tensor.to(torch.float32)
    out = torch.empty(tuple(reversed(tensor.shape)), dtype=dtype, pin_memory=pin)
    if scaling is None:
        out.copy_(source.t())
    else:
        torch.mul(source.t(), scaling, out=out)
    if dtype == torch.float16 and out.numel():
        low, high = torch.aminmax(out)  # (a tenth of what isfinite().all() costs on float16)
        if math.isfinite(float(low)) and math.isfinite(float(high)):
            return out
        largest = float(tensor.abs().max()) * (1.0 if scaling is None else abs(scaling))
        raise NonFiniteWeightsError(
            f"{what} holds values up to {largest:.4g}, past {dtype} (largest {torch.finfo(dtype).max:.6g}), the "
            "precision of this model's adapter slots"
        )
    return out


def _host(tensor: torch.Tensor, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """A contiguous host copy in ``dtype`` (pinned where ``pin``, so slot loads copy asynchronously),
    always its own memory: the file's tensors can be views of its whole buffer, which the host tier must
    not keep alive (nor miscount). One copy, straight into the (pinned) result."""
    out = torch.empty(tuple(tensor.shape), dtype=dtype, pin_memory=pin)
    out.copy_(tensor.detach())
    return out
