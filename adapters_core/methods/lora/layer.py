"""``LoraLayer``: one base layer plus any number of named LoRA / DoRA adapters.

Per adapter ``a`` the layer holds ``A_a (r, in)``, ``B_a (out, r)``, optionally ``B``'s bias and
DoRA's magnitude ``m_a (out,)``, and computes, for the adapters the shared state makes active::

    y = base(x) + s_a · B_a(A_a(dropout(x)))                         (LoRA)
    y = base(x) + (m_a/n_a − 1)·(base(x) − b) + (m_a/n_a)·s_a·B_a(A_a(x))   (DoRA, n_a = ‖W + s_a·B_a·A_a‖ per row)

A batch whose rows use different adapters goes through :mod:`.bank` (one gather + two batched
matmuls, DoRA rows included) at inference, or through per-adapter row groups when gradients flow.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from adapters_core.errors import (
    AdapterMismatchError,
    AdapterStateError,
    NonFiniteWeightsError,
    UnsupportedModuleError,
)
from adapters_core.methods.lora import base_layers
from adapters_core.methods.lora.bank import LoraBank, build_bank
from adapters_core.methods.lora.base_layers import BaseLayerInfo
from adapters_core.methods.lora.config import LoraConfig
from adapters_core.methods.lora.init import default_init, olora_init, pissa_init
from adapters_core.state import AdapterState


class LoraAdapterSpec:
    """Static facts of one adapter on one layer."""

    __slots__ = ("alpha", "lora_bias", "r", "scaling", "use_dora")

    def __init__(self, r: int, alpha: float, scaling: float, use_dora: bool, lora_bias: bool) -> None:
        self.r = r
        self.alpha = alpha
        self.scaling = scaling
        self.use_dora = use_dora
        self.lora_bias = lora_bias


class LoraLayer(nn.Module):
    """Wraps ``base_layer`` (Linear, Conv1D, bitsandbytes Linear, Embedding) with LoRA adapters."""

    def __init__(self, base_layer: nn.Module, info: BaseLayerInfo, state: AdapterState) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.info = info
        self._state = state
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_B_bias = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, LoraAdapterSpec] = {}
        self.merged_adapters: list[str] = []
        self._merge_norms: dict[str, torch.Tensor] = {}
        self._bank: LoraBank | None = None
        self._routing_cache: tuple[int, frozenset[int], tuple[nn.Parameter, ...]] | None = None
        self._dora_norm_cache: dict[str, tuple[tuple[int, ...], torch.Tensor]] = {}

    # ------------------------------------------------------------------ adapters
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (so code that inspects ``module.weight`` keeps working)."""
        w = self.base_layer.weight
        assert isinstance(w, torch.Tensor)
        return w

    def add(
        self,
        name: str,
        config: LoraConfig,
        module_name: str,
        *,
        initialise: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Create adapter ``name`` with this module's rank/alpha from ``config``.

        With ``initialise=False`` the weights are left uninitialised for a loader to fill in.
        """
        r = config.rank_for(module_name)
        alpha = config.alpha_for(module_name)
        scaling = alpha / (r**0.5) if config.use_rslora else alpha / r
        info = self.info
        device = self._device()
        if config.use_dora and info.kind == "embedding":
            raise UnsupportedModuleError(f"DoRA on embedding layers is not supported ({module_name})")
        if config.lora_bias and info.kind == "embedding":
            raise UnsupportedModuleError(f"lora_bias on embedding layers is not supported ({module_name})")
        init = config.init_lora_weights
        new_base: torch.Tensor | None = None
        if not initialise:
            a = torch.empty((r, info.in_features), dtype=dtype, device=device)
            b = torch.empty((info.out_features, r), dtype=dtype, device=device)
        elif isinstance(init, str) and init.startswith("pissa"):
            a, b, new_base = pissa_init(self.base_weight(), r, scaling, init)
        elif init == "olora":
            a, b, new_base = olora_init(self.base_weight(), r, scaling)
        else:
            a, b = default_init(
                r, info.in_features, info.out_features, embedding=info.kind == "embedding", mode=init,
                dtype=dtype, device=device,
            )
        if new_base is not None:
            base_layers.write_linear_weight(self.base_layer, info, new_base)
            self._dora_norm_cache.clear()
        self.lora_A[name] = nn.Parameter(a.to(dtype=dtype, device=device))
        self.lora_B[name] = nn.Parameter(b.to(dtype=dtype, device=device))
        if config.lora_bias:
            self.lora_B_bias[name] = nn.Parameter(torch.zeros(info.out_features, dtype=dtype, device=device))
        if config.lora_dropout > 0:
            self.lora_dropout[name] = nn.Dropout(config.lora_dropout)
        self.specs[name] = LoraAdapterSpec(r, alpha, scaling, config.use_dora, config.lora_bias)
        if config.use_dora:
            norm = self._dora_norm(name) if initialise else torch.empty(info.out_features)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype=dtype, device=device).clone())

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` from this layer (no-op if it does not target this layer)."""
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged; unmerge before deleting it")
        for store in (self.lora_A, self.lora_B, self.lora_B_bias, self.lora_magnitude_vector, self.lora_dropout):
            if name in store:
                del store[name]
        self.specs.pop(name, None)
        self._dora_norm_cache.pop(name, None)
        self._bank = None

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of adapter ``name`` on this layer."""
        stores = (self.lora_A, self.lora_B, self.lora_B_bias, self.lora_magnitude_vector)
        return [store[name] for store in stores if name in store]

    # ------------------------------------------------------------------ PEFT state dict
    def _peft_params(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s parameters keyed by HF PEFT's key suffixes (adapter name removed)."""
        emb = self.info.kind == "embedding"
        out = {
            ("lora_embedding_A" if emb else "lora_A.weight"): self.lora_A[name],
            ("lora_embedding_B" if emb else "lora_B.weight"): self.lora_B[name],
        }
        if name in self.lora_B_bias:
            out["lora_B.bias"] = self.lora_B_bias[name]
        if name in self.lora_magnitude_vector:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return out

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Tensors of adapter ``name`` under HF PEFT's key suffixes."""
        return {k: v.detach() for k, v in self._peft_params(name).items()}

    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor], module_name: str) -> None:
        """Copy PEFT-keyed ``tensors`` into adapter ``name`` (all checked first, nothing half-written)."""
        params = self._peft_params(name)
        for key, tensor in tensors.items():
            if key not in params:
                raise AdapterMismatchError(f"unexpected key {module_name}.{key} for this adapter config")
            expected = tuple(params[key].shape)
            if tuple(tensor.shape) != expected:
                raise AdapterMismatchError(
                    f"shape mismatch for {module_name}.{key}: file has {tuple(tensor.shape)}, this base model "
                    f"needs {expected} (was the adapter trained on a different base model or rank?)"
                )
        missing = sorted(set(params) - set(tensors))
        if missing:
            raise AdapterMismatchError(f"missing keys for {module_name}: {', '.join(missing)}")
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key])
        self._bank = None
        self._dora_norm_cache.pop(name, None)

    # ------------------------------------------------------------------ math helpers
    def _device(self) -> torch.device:
        """Where the adapter's weights live: with the base layer's (``meta`` for a weightless model,
        so checking a config against a large architecture allocates nothing)."""
        for p in self.base_layer.parameters():
            return p.device
        return torch.device("cpu")

    def base_weight(self) -> torch.Tensor:
        """Base weight in ``(out, in)`` layout, dequantized."""
        return base_layers.linear_weight(self.base_layer, self.info)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B · A`` in ``(out, in)`` layout (float32 math for half-precision CPU weights)."""
        a, b = self.lora_A[name], self.lora_B[name]
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
            return ((b.float() @ a.float()) * self.specs[name].scaling).to(a.dtype)
        return (b @ a) * self.specs[name].scaling

    def _dora_norm(self, name: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """Row norms ``‖W + s·B·A‖`` (detached), W the unmerged base weight."""
        w = self.base_weight() if base is None else base
        delta = self.delta_weight(name).detach()
        return torch.linalg.norm(w.to(delta.dtype) + delta, dim=1).detach()

    def _dora_norm_cached(self, name: str) -> torch.Tensor:
        """``_dora_norm`` reused while neither A, B nor the base weight changed (never under grad)."""
        a, b, w = self.lora_A[name], self.lora_B[name], self.weight
        key = (_version(a), _version(b), _version(w), id(w))
        hit = self._dora_norm_cache.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        norm = self._dora_norm(name)
        self._dora_norm_cache[name] = (key, norm)
        return norm

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        state = self._state
        if state.disabled or self.merged_adapters or not self.specs:
            return result
        rows = state.rows
        if rows is not None:
            if rows.slot_set.isdisjoint(self._routing_facts()[1]):
                return result
            if x.shape[0] != rows.batch_size:
                raise AdapterStateError(
                    f"adapter_names has {rows.batch_size} entries but the batch has {x.shape[0]} rows"
                )
            trainable = self._routing_facts()[2]
            if self.training or (torch.is_grad_enabled() and trainable):
                return self._grouped_forward(x, result, rows.names)
            return self._bank_forward(x, result, rows.slots)
        for name in state.active:
            if name in self.specs:
                result = self._add_adapter_output(name, x, result)
        return result

    def _lora_hidden(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``A(dropout(x))`` for linear layers, ``A``-row lookup for embeddings."""
        a = self.lora_A[name]
        if self.info.kind == "embedding":
            base = cast(nn.Embedding, self.base_layer)
            return F.embedding(
                x, a.t(), padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
            )
        if self.training and name in self.lora_dropout:
            x = self.lora_dropout[name](x)
        return F.linear(x.to(a.dtype), a)

    def _add_adapter_output(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result`` (the base output for these rows) plus adapter ``name``'s contribution."""
        spec = self.specs[name]
        b = self.lora_B[name]
        if spec.use_dora:
            return self._apply_dora(name, x, result)
        h = self._lora_hidden(name, x)
        if spec.lora_bias:
            out = F.linear(h, b, self.lora_B_bias[name]) * spec.scaling
            return result + out.to(result.dtype)
        scale = self._embed_scale(spec.scaling)
        if result.dtype == h.dtype:
            h2 = h.reshape(-1, h.shape[-1])
            if not torch.is_grad_enabled() and result.is_contiguous():
                # no autograd graph: accumulate into the fresh base output, saving a full copy of it
                result.view(-1, result.shape[-1]).addmm_(h2, b.t(), alpha=scale)
                return result
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), h2, b.t(), alpha=scale)
            return flat.view(result.shape)
        return result + (F.linear(h, b) * scale).to(result.dtype)

    def _embed_scale(self, scaling: float) -> float:
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if embed_scale is None:
            return scaling
        return scaling * float(embed_scale)

    def _apply_dora(self, name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        spec = self.specs[name]
        needs_grad = torch.is_grad_enabled() and self.lora_A[name].requires_grad
        norm = self._dora_norm(name) if needs_grad else self._dora_norm_cached(name)
        mag = (self.lora_magnitude_vector[name] / norm).view(1, -1)
        bias = getattr(self.base_layer, "bias", None)
        if self.training and name in self.lora_dropout:
            x = self.lora_dropout[name](x)
            base_out = F.linear(x.to(result.dtype), self.base_weight().to(result.dtype))
        else:
            base_out = result - bias if bias is not None else result
        a, b = self.lora_A[name], self.lora_B[name]
        lora_out = F.linear(F.linear(x.to(a.dtype), a), b, self.lora_B_bias[name] if spec.lora_bias else None)
        dora = (mag - 1) * base_out + mag * lora_out * spec.scaling
        return result + dora.to(result.dtype)

    def _grouped_forward(self, x: torch.Tensor, result: torch.Tensor, names: tuple[str, ...]) -> torch.Tensor:
        """Mixed batch with gradients: each adapter's rows go through its own weights."""
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            if n in self.specs:
                groups.setdefault(n, []).append(i)
        if not groups:
            return result
        out = result.clone()
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            out[idx] = self._add_adapter_output(name, x[idx], result[idx])
        return out

    def _bank_forward(self, x: torch.Tensor, result: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        bank = self._current_bank()
        return bank.apply(x, result, slots.to(x.device), embedding=self.base_layer if self.info.kind == "embedding" else None)

    def _routing_facts(self) -> tuple[int, frozenset[int], tuple[nn.Parameter, ...]]:
        """``(epoch, slot ids on this layer, parameters that may change in place)``, cached per epoch.

        Only trainable (``requires_grad``) adapter tensors can be changed by an optimizer; every other
        change (add, load, delete, merge, trainability) goes through the model and bumps the epoch.
        """
        state = self._state
        cached = self._routing_cache
        if cached is None or cached[0] != state.epoch:
            slots = frozenset(state.slots[n] for n in self.specs)
            mutable = tuple(p for n in self.specs for p in self.parameters_of(n) if p.requires_grad)
            cached = (state.epoch, slots, mutable)
            self._routing_cache = cached
        return cached

    def _current_bank(self) -> LoraBank:
        """The stacked per-slot weights, rebuilt when an adapter or a weight changed."""
        state = self._state
        signature = (
            state.epoch,
            *(_version(p) for p in self._routing_facts()[2]),
            _version(self.weight),
        )
        bank = self._bank
        if bank is None or bank.signature != signature:
            with torch.no_grad():
                norms = {n: self._dora_norm_cached(n) for n, s in self.specs.items() if s.use_dora}
                bank = build_bank(self, state.slots, norms, signature)
            self._bank = bank
        return bank

    # ------------------------------------------------------------------ merge
    def merge(self, names: list[str], safe_merge: bool = False, dry_run: bool = False) -> None:
        """Fold adapters ``names`` (those targeting this layer) into the base weight.

        ``safe_merge`` computes on a copy and raises before writing if the result holds NaN/Inf;
        ``dry_run`` only does that check.
        """
        for name in names:
            if name not in self.specs or name in self.merged_adapters:
                continue
            spec = self.specs[name]
            weight = self.base_weight()
            delta = self.delta_weight(name).detach().to(weight.dtype)
            if spec.use_dora:
                unmerged = self._unmerged_weight()
                norm = torch.linalg.norm(unmerged + delta, dim=1).detach()
                factor = (self.lora_magnitude_vector[name].detach() / norm).view(-1, 1)
                new = factor * (weight + delta)
            else:
                norm = None
                new = weight + delta
            new_bias = None
            if spec.lora_bias:
                bias = getattr(self.base_layer, "bias", None)
                if bias is None:
                    raise AdapterStateError("cannot merge lora_bias: the base layer has no bias")
                new_bias = bias.detach() + self.lora_B_bias[name].detach() * spec.scaling
            if safe_merge and (not torch.isfinite(new).all() or (new_bias is not None and not torch.isfinite(new_bias).all())):
                raise NonFiniteWeightsError(f"merging adapter {name!r} would produce NaN/Inf weights; nothing was changed")
            if dry_run:
                continue
            base_layers.write_linear_weight(self.base_layer, self.info, new)
            self._dora_norm_cache.clear()
            if new_bias is not None:
                self.base_layer.bias.data = new_bias.to(self.base_layer.bias.dtype)
            if norm is not None:
                self._merge_norms[name] = norm
            self.merged_adapters.append(name)
        if not dry_run:
            self._bank = None

    def _unmerged_weight(self) -> torch.Tensor:
        """Base weight with every merged adapter taken out (what DoRA's norm is defined on)."""
        weight = self.base_weight().clone()
        for name in reversed(self.merged_adapters):
            weight = self._unmerge_one(name, weight)
        return weight

    def _unmerge_one(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        delta = self.delta_weight(name).detach().to(weight.dtype)
        if self.specs[name].use_dora:
            factor = (self.lora_magnitude_vector[name].detach() / self._merge_norms[name]).view(-1, 1)
            return weight / factor - delta
        return weight - delta

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            base_layers.write_linear_weight(self.base_layer, self.info, self._unmerge_one(name, self.base_weight()))
            self._dora_norm_cache.clear()
            self._merge_norms.pop(name, None)
            spec = self.specs[name]
            if spec.lora_bias:
                self.base_layer.bias.data -= self.lora_B_bias[name].detach() * spec.scaling
        self._bank = None


def _version(t: torch.Tensor) -> int:
    """In-place modification counter of ``t`` (inference tensors have none and cannot change outside
    inference mode: -1)."""
    try:
        return int(t._version)
    except RuntimeError:
        return -1
