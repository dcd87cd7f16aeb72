"""``SlottedModel``: one resident base model, adapters in fixed slots, a slot id per batch row.

```python
sm = SlottedModel(model, num_slots=64, max_rank=64)
prepared = sm.prepare(config, tensors)      # any thread: checks and lays out the adapter (host memory);
                                            # wrapping new target modules waits for sm.structure_lock
sm.load(3, prepared)                        # copy into slot 3 (no module surgery on the hot path)
with sm.route([3, 0, 3]):                   # row 0 and 2 use slot 3, row 1 the base model
    logits = model(input_ids=ids).logits
sm.clear(3)
```

Slot 0 is the base model. Targeted layers are wrapped once, when an adapter first targets them;
the wrapper allocates its buffers for every slot on the first load and only copies afterwards, so
loading an adapter costs a read and a copy, and a batch mixing any adapters costs one routed
forward (:mod:`adapters_core.serving.kernels`). Only inference: forwards run without gradients.
While other threads may prepare adapters, the thread that runs forwards, loads and clears holds
``structure_lock`` around them.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from adapters_core.config import AdapterConfig
from adapters_core.errors import ConfigError, TargetModulesNotFoundError, UnsupportedModuleError
from adapters_core.methods.lora import base_layers
from adapters_core.methods.lora.config import LoraConfig
from adapters_core.modules_to_save import saved_by, unmatched
from adapters_core.serving.cpu_bgmv import Bgmv, load_bgmv
from adapters_core.serving.gpu_bgmv import GpuBgmv, KernelUnavailable, load_gpu_bgmv, load_gpu_bgmv_or_raise
from adapters_core.serving.layers import RoutingState, SlotBias, SlotLoraLayer, SlotModuleSwap, SlotRouting
from adapters_core.serving.prepare import PreparedAdapter, prepare_adapter
from adapters_core.targeting import candidate_modules, find_targets

logger = logging.getLogger(__name__)

_WRAPPERS = (SlotLoraLayer, SlotBias, SlotModuleSwap)


def saved_module_names(model: nn.Module, wanted: Sequence[str]) -> list[str]:
    """The modules of ``model`` that ``modules_to_save`` entries ``wanted`` name (HF PEFT's suffix rule), each a
    single layer the slots can swap a copy of. A module holding modules of its own (a decoder block, ``mlp``) is
    refused (:class:`ConfigError` on ``modules_to_save``): its submodules are other adapters' LoRA targets, and it
    is called with the whole batch's masks and caches, which a copy serving some rows of a batch cannot take."""
    found = [n for n, _ in candidate_modules(model, _WRAPPERS) if n and saved_by(n, wanted)]
    missing = unmatched(found, wanted)
    if missing:
        raise TargetModulesNotFoundError(f"modules_to_save {missing} matched no module of the base model")
    nested = [n for n in found if next(_unwrapped(model.get_submodule(n)).children(), None) is not None]
    if nested:
        raise ConfigError(
            f"modules_to_save names {nested[0]!r}, a module of other modules: this server serves copies of single "
            "layers (lm_head, embed_tokens, a norm); save those instead", field="modules_to_save")
    for name in found:
        extra = _inputs_beyond_one(_unwrapped(model.get_submodule(name)))
        if extra:
            raise ConfigError(
                f"modules_to_save names {name!r}, whose forward also takes {', '.join(extra)}: this server serves "
                "copies of layers called with one tensor (lm_head, embed_tokens, a norm), whose output it can take "
                "row by row for the rows of a batch that use the copy", field="modules_to_save")
    return found


def _inputs_beyond_one(module: nn.Module) -> list[str]:
    """The parameters of ``module.forward`` after its first (a rotary embedding's ``position_ids``, a learned
    position table's ``past_key_values_length``): what a copy serving some rows of a batch could not slice."""
    params = list(inspect.signature(module.forward).parameters.values())
    return [p.name for p in params[1:]] + [p.name for p in params[:1] if p.kind is p.VAR_POSITIONAL]


def _unwrapped(module: nn.Module) -> nn.Module:
    while isinstance(module, _WRAPPERS):
        module = module.base_layer
    return module


class SlottedModel:
    """A base model whose adapters live in ``num_slots`` fixed slots (ids 1..num_slots; 0 = base)."""

    def __init__(self, model: nn.Module, num_slots: int, *, max_rank: int = 64, dtype: torch.dtype | None = None,
                 weight_dtype: torch.dtype | None = None, row_capacity: int = 0, cpu_kernels: bool = True,
                 gpu_kernels: bool | None = None) -> None:
        """``dtype``: the LoRA products' (default: the model's); ``weight_dtype``: how the slots store LoRA A and
        B (default ``dtype``; ``torch.float16`` under float32 products halves the slots' memory and what a
        decode step reads, at float16's precision of the weights). ``row_capacity``: rows of per-row weight
        buffers for decode steps (see :meth:`sync_rows`), used only where the compiled CPU kernel is not
        (``cpu_kernels``, float32 on x86-64), since the kernel reads the slot bank by slot id;
        ``self.row_capacity`` is what was allocated (0 with the kernel). ``gpu_kernels``: decode steps run the
        fused Triton kernel of :mod:`~adapters_core.serving.gpu_bgmv` (None: on CUDA devices where Triton is
        installed; True: required, and on a CPU model run by Triton's interpreter, which is how tests run it;
        False: torch's operators)."""
        if num_slots < 1:
            raise ConfigError("num_slots must be at least 1", field="num_slots")
        self.model = model
        self.num_slots = num_slots
        self.max_rank = max_rank
        self._synced: list[int] = []  # slot whose weights row buffer i holds (-1: unknown)
        params = [p for p in model.parameters() if p.is_floating_point()]
        self.dtype = dtype or (params[0].dtype if params else torch.float32)
        self.device = params[0].device if params else torch.device("cpu")
        self.weight_dtype = weight_dtype or self.dtype
        if self.weight_dtype != self.dtype and (self.dtype, self.weight_dtype) != (torch.float32, torch.float16):
            raise ConfigError(
                f"adapter weights can be stored in float16 under float32 products, not in {self.weight_dtype} under "
                f"{self.dtype}", field="weight_dtype",
            )
        # float32 on a CPU: rows on different adapters run the compiled kernel, which reads the slot bank by
        # slot id, where it can be built; without it, row buffers (when asked for) let decode steps use bmm
        # in place
        self.cpu_kernel: Bgmv | None = (load_bgmv() if cpu_kernels and self.device.type == "cpu"
                                        and self.dtype == torch.float32 else None)
        self.row_capacity = row_capacity if self.cpu_kernel is None else 0
        self.gpu_kernel: GpuBgmv | None = self._gpu_kernel(gpu_kernels, params[0].dtype if params else self.dtype)
        self.routing = RoutingState()
        # module structure changes (wrapping, on any thread) vs. walks of it (forwards, loads, clears, row syncs):
        # whoever walks holds it (the serving engine, for each step), so wrapping waits for the step to end
        self.structure_lock = threading.RLock()
        self._lora_layers: dict[str, SlotLoraLayer] = {}
        self._swaps: dict[str, SlotModuleSwap] = {}
        self._biases: dict[str, SlotBias] = {}
        self._slot_lora: dict[int, set[str]] = {}  # slot -> its LoRA layers (what row syncs copy)
        self._slot_parts: dict[int, set[tuple[str, str]]] = {}  # slot -> (wrapper table, module name) it wrote
        self._slot_ranks: dict[int, int] = {}  # slot -> largest LoRA rank of its adapter
        self._originals: dict[str, nn.Module] = {}
        self._targets: dict[str, list[str]] = {}
        self._saved: dict[tuple[str, ...], list[str]] = {}  # modules_to_save -> the modules it wrapped

    def _gpu_kernel(self, wanted: bool | None, model_dtype: torch.dtype) -> GpuBgmv | None:
        if wanted is False or (wanted is None and self.device.type != "cuda"):
            return None
        if self.dtype != model_dtype:  # the layers take the kernel only for products in the activations' dtype
            why = (f"the fused GPU LoRA kernel serves slots whose products are in the model's dtype ({model_dtype}), "
                   f"not {self.dtype}")
            if wanted:
                raise ConfigError(why, field="gpu_kernels")
            logger.info("%s: LoRA products use torch", why)
            return None
        if wanted is None:
            loaded = load_gpu_bgmv()
            if loaded is not None and loaded.interpret:  # (TRITON_INTERPRET=1 left set on a GPU host)
                logger.warning("the fused GPU LoRA kernel would run in Triton's interpreter (TRITON_INTERPRET=1), "
                               "which takes no CUDA tensors: LoRA products use torch")
                return None
            return loaded
        try:
            kernel = load_gpu_bgmv_or_raise()
        except KernelUnavailable as exc:
            raise ConfigError(f"the GPU LoRA kernel cannot be used: {exc}", field="gpu_kernels") from exc
        if kernel.interpret != (self.device.type == "cpu"):
            where = "Triton's interpreter (TRITON_INTERPRET=1)" if kernel.interpret else "a GPU"
            raise ConfigError(f"the GPU LoRA kernel runs on {where}, but the model is on {self.device}",
                              field="gpu_kernels")
        return kernel

    def use_gpu_kernel(self, kernel: GpuBgmv | None) -> None:
        """Run decode steps through ``kernel`` from now on (None: torch's operators); benchmarks time both."""
        self.gpu_kernel = kernel
        for layer in self._lora_layers.values():
            layer.step_kernel = kernel

    def warm_up_gpu_kernel(self) -> int:
        """Compile the fused GPU kernel's variants for every linear layer an adapter could put LoRA on, up to
        ``max_rank`` (:meth:`GpuBgmv.warm_up`): without it, the first steps on each new shape or rank block
        would stop for Triton's compiler. Returns the launches made (0 without the kernel);
        :class:`KernelUnavailable` if the kernel cannot launch here."""
        kernel = self.gpu_kernel
        if kernel is None:
            return 0
        shapes: dict[torch.device, dict[tuple[int, int], None]] = {}
        for module in self.model.modules():  # (into slot wrappers too: their base layers)
            info = base_layers.describe(module)
            if info is not None and info.kind == "linear":
                device = _device_of(module, self.device)
                shapes.setdefault(device, {})[(info.in_features, info.out_features)] = None
        return sum(kernel.warm_up(found, self.max_rank, dtype=self.dtype, weight_dtype=self.weight_dtype,
                                  device=device) for device, found in shapes.items())

    # ------------------------------------------------------------------ structure
    def lora_targets(self, config: LoraConfig) -> list[str]:
        """Names of the modules ``config`` puts LoRA on (wrapping them if needed); remembered per targeting
        spec, since the adapters of one service mostly share a few."""
        key = json.dumps([config.target_modules, config.exclude_modules, config.layers_to_transform,
                          config.layers_pattern, config.modules_to_save], sort_keys=True, default=str)
        known = self._targets.get(key)
        if known is not None:
            return list(known)
        with self.structure_lock:
            targets = self._targets.get(key)
            if targets is None:
                targets, _ = find_targets(self.model, config, is_linear_like=base_layers.is_linear_like,
                                          wrapper_types=_WRAPPERS)
                for name in targets:
                    self._wrap_lora(name)
                self._targets[key] = targets
        return list(targets)

    def saved_module_targets(self, config: LoraConfig) -> list[str]:
        """Names of the modules ``config`` keeps full copies of (``modules_to_save``), wrapped for swapping."""
        wanted = tuple(config.modules_to_save or ())
        if not wanted:
            return []
        known = self._saved.get(wanted)
        if known is not None:
            return list(known)
        with self.structure_lock:
            found = saved_module_names(self.model, wanted)  # (a module under LoRA too: its copy swaps in around it)
            for name in found:
                self._wrap_swap(name)
            self._saved[wanted] = found
        return list(found)

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _set_module(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, child, module)

    def base_module(self, name: str) -> nn.Module:
        """The base model's own module ``name`` (under any slot wrapper)."""
        original = self._originals.get(name)
        if original is not None:
            return original
        module = self._module(name)
        while isinstance(module, _WRAPPERS):
            module = module.base_layer
        return module

    def layer_info(self, name: str) -> base_layers.BaseLayerInfo:
        info = base_layers.describe(self.base_module(name))
        if info is None:
            module = self.base_module(name)
            raise UnsupportedModuleError(
                f"target module {name} is a {type(module).__name__}; LoRA supports nn.Linear, transformers Conv1D, "
                "nn.Embedding and bitsandbytes Linear4bit/Linear8bitLt"
            )
        return info

    def _insert(self, name: str, make: Callable[[nn.Module], nn.Module], *, innermost: bool) -> nn.Module:
        """Wrap module ``name`` with ``make(inner)``: around the base module itself (``innermost``), or
        around everything but a ``modules_to_save`` swap, which always stays outermost."""
        self._originals.setdefault(name, self.base_module(name))
        holder: nn.Module | None = None
        current = self._module(name)
        while isinstance(current, _WRAPPERS) and (innermost or isinstance(current, SlotModuleSwap)):
            holder, current = current, current.base_layer
        wrapper = make(current)
        if holder is None:
            self._set_module(name, wrapper)
        else:
            holder.base_layer = wrapper
        return wrapper

    def _wrap_lora(self, name: str) -> SlotLoraLayer:
        layer = self._lora_layers.get(name)
        if layer is None:
            info = self.layer_info(name)
            device = _device_of(self.base_module(name), self.device)
            made = self._insert(
                name, lambda inner: SlotLoraLayer(inner, info, self.routing, self.num_slots + 1, self.dtype, device,
                                                  self.row_capacity, self.cpu_kernel, self.weight_dtype,
                                                  self.gpu_kernel),
                innermost=True,
            )
            assert isinstance(made, SlotLoraLayer)
            layer = self._lora_layers[name] = made
        return layer

    def _wrap_swap(self, name: str) -> SlotModuleSwap:
        swap = self._swaps.get(name)
        if swap is None:
            made = self._insert(name, lambda inner: SlotModuleSwap(inner, self.routing), innermost=False)
            assert isinstance(made, SlotModuleSwap)
            swap = self._swaps[name] = made
        return swap

    def bias_layer(self, name: str, features: int) -> bool:
        """Make module ``name`` able to add a per-slot bias; False for modules whose bias is not simply
        added to the output (only linear layers and layer norms qualify)."""
        module = self.base_module(name)
        if not (base_layers.is_linear_like(module) or isinstance(module, nn.LayerNorm)):
            return False
        if name in self._biases:
            return True
        with self.structure_lock:
            if name not in self._biases:
                device = _device_of(module, self.device)
                made = self._insert(
                    name, lambda inner: SlotBias(inner, self.routing, self.num_slots + 1, features, self.dtype, device),
                    innermost=False,
                )
                assert isinstance(made, SlotBias)
                self._biases[name] = made
        return True

    def base_tensor(self, name: str, attribute: str) -> torch.Tensor | None:
        """``weight``/``bias`` of the base model's own module ``name``; ``None`` if there is none."""
        try:
            tensor = getattr(self.base_module(name), attribute, None)
        except AttributeError:
            return None
        return tensor if isinstance(tensor, torch.Tensor) else None

    # ------------------------------------------------------------------ adapters
    def prepare(self, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> PreparedAdapter:
        """Check an adapter against this model and lay it out for the slots (see :mod:`.prepare`)."""
        return prepare_adapter(self, config, tensors)

    def load(self, slot: int, prepared: PreparedAdapter) -> None:
        """Copy ``prepared`` into ``slot``, replacing what the slot held. Call between forwards."""
        self._check_slot(slot)
        # by wrapper, not by name: a module can hold LoRA for one adapter and a bias or a full copy for another
        wanted = ({("lora", n) for n in prepared.layers} | {("swap", n) for n in prepared.swaps}
                  | {("bias", n) for n in prepared.biases})
        for part in self._slot_parts.get(slot, set()) - wanted:
            self._clear_part(part, slot)
        # before any write: a load that fails part-way leaves no part written that clear(slot) would not empty
        self._slot_parts[slot] = wanted
        self._slot_lora[slot] = set(prepared.layers)
        self._slot_ranks.pop(slot, None)
        capacities = [layer.rank_capacity for layer in self._lora_layers.values()]
        try:
            for name, weights in prepared.layers.items():
                self._lora_layers[name].write(slot, weights)
        finally:  # (a write that fails after another grew a layer: the other rows re-sync all the same)
            if capacities != [layer.rank_capacity for layer in self._lora_layers.values()]:
                self._synced = []  # a layer grew (or appeared with) new row buffers: every row re-syncs
        self._forget_rows(slot)
        for name, state in prepared.swaps.items():
            self._swaps[name].write(slot, state)
        for name, delta in prepared.biases.items():
            self._biases[name].write(slot, delta)
        self._slot_ranks[slot] = prepared.rank

    def clear(self, slot: int) -> None:
        """Empty ``slot``: its rows get the base model. Call between forwards."""
        self._check_slot(slot)
        for part in self._slot_parts.pop(slot, set()):
            self._clear_part(part, slot)
        self._slot_lora.pop(slot, None)
        self._slot_ranks.pop(slot, None)
        self._forget_rows(slot)

    def _forget_rows(self, slot: int) -> None:
        self._synced = [-1 if s == slot else s for s in self._synced]

    def sync_rows(self, slots: Sequence[int]) -> None:
        """Make the row buffers hold, at position ``i``, the weights of slot ``slots[i]`` (rows whose slot
        did not change cost nothing). Call between forwards; a later :meth:`route` with the same slots
        then decodes from the row buffers. A no-op without ``row_capacity``."""
        if not self.row_capacity or len(slots) > self.row_capacity:
            return
        synced = self._synced + [-1] * (len(slots) - len(self._synced))
        changes: dict[str, tuple[list[int], list[int]]] = {}  # layer name -> (rows, their new slots)
        for i, slot in enumerate(slots):
            before = synced[i]
            if before == slot:
                continue
            names = (self._lora_layers.keys() if before < 0 else
                     self._slot_lora.get(slot, set()) | self._slot_lora.get(before, set()))
            for name in names:
                rows, new_slots = changes.setdefault(name, ([], []))
                rows.append(i)
                new_slots.append(slot)
            synced[i] = slot
        indices: dict[tuple[int, ...], torch.Tensor] = {}  # layers mostly share the same lists

        def index(values: list[int]) -> torch.Tensor:
            key = tuple(values)
            if key not in indices:
                indices[key] = torch.tensor(values, dtype=torch.long, device=self.device)
            return indices[key]

        for name, (rows, new_slots) in changes.items():
            layer = self._lora_layers.get(name)
            if layer is not None:
                consecutive = rows[-1] - rows[0] == len(rows) - 1  # rows ascend without repeats
                layer.sync_rows(index(rows), index(new_slots), rows[0] if consecutive else None)
        self._synced = synced

    def _clear_part(self, part: tuple[str, str], slot: int) -> None:
        kind, name = part
        table: dict[str, SlotLoraLayer] | dict[str, SlotModuleSwap] | dict[str, SlotBias] = (
            self._lora_layers if kind == "lora" else self._swaps if kind == "swap" else self._biases)
        table[name].clear(slot)

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot <= self.num_slots:
            raise ConfigError(f"slot must be in 1..{self.num_slots}, got {slot}", field="slot")

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def route(self, slots: Sequence[int]) -> Iterator[None]:
        """Inside the block, row ``i`` of every forward uses slot ``slots[i]`` (0 = base model)."""
        previous = self.routing.current
        ids = [int(s) for s in slots]
        if any(s < 0 or s > self.num_slots for s in ids):
            raise ConfigError(f"slot ids must be in 0..{self.num_slots}", field="slots")
        synced = bool(self.row_capacity) and self._synced[: len(ids)] == ids
        self.routing.current = (None if not any(ids) else
                                SlotRouting.of(ids, self.device, rows_synced=synced, ranks=self._slot_ranks))
        try:
            yield
        finally:
            self.routing.current = previous


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    for p in module.parameters():
        return p.device if p.device.type != "meta" else default
    return default
