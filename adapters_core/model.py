"""``AdapterModel``: named adapters on one base model, with the API users of HF PEFT expect.

```python
am = AdapterModel(base_model)
am.add_adapter("a", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
am.load_adapter("dir/with/peft/files", "b")
am.set_adapter("a"); am(**batch)
am(**batch, adapter_names=["a", "b", "__base__"])   # one adapter per row
with am.disable_adapters(): am(**batch)
merged = am.merge_and_unload()
```

Switching the active adapter writes one attribute of the shared :class:`AdapterState` (plus the
``requires_grad`` flags of the two adapters involved); loading an adapter copies tensors into
layers that already wrap their base modules when an earlier adapter targeted the same modules.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from adapters_core import peft_format, quant
from adapters_core.config import AdapterConfig
from adapters_core.errors import (
    AdapterExistsError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    UnknownPeftTypeError,
    UnsupportedModuleError,
)
from adapters_core.methods.lora import base_layers
from adapters_core.methods.lora.config import LoraConfig
from adapters_core.methods.lora.layer import LoraLayer
from adapters_core.modules_to_save import ModulesToSaveWrapper, saved_by, unmatched
from adapters_core.state import BASE_ADAPTER, AdapterState, RowRouting
from adapters_core.targeting import candidate_modules, find_targets

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")
_MODULE_ATTRIBUTES = frozenset(dir(nn.Module()))


class AdapterModel(nn.Module):
    """A base model (any ``transformers`` ``PreTrainedModel`` or ``nn.Module``) with named adapters."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.state = AdapterState()
        self.peft_config: dict[str, AdapterConfig] = {}
        self._layers: dict[str, LoraLayer] = {}
        self._saved_modules: dict[str, ModulesToSaveWrapper] = {}
        self._targets: dict[str, list[str]] = {}
        self._params: dict[str, list[nn.Parameter]] = {}
        self._trainable: set[str] = set()
        self._base_frozen = False

    # ------------------------------------------------------------------ passthrough
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters, in the order they were added."""
        return list(self.peft_config)

    @property
    def active_adapters(self) -> list[str]:
        return list(self.state.active)

    @property
    def active_adapter(self) -> str | None:
        return self.state.active[0] if self.state.active else None

    # ------------------------------------------------------------------ adding
    def add_adapter(self, name: str, config: AdapterConfig, *, dtype: torch.dtype = torch.float32) -> None:
        """Create a new trainable adapter ``name`` from ``config`` (the first adapter becomes active)."""
        lora = self._lora_config(config)
        lora.check_can_initialise()
        self._inject(name, lora, initialise=True, dtype=dtype)
        self._trainable.add(name)
        self._activate_if_first(name)
        self._refresh_requires_grad()

    def load_adapter(
        self,
        path: str | Path,
        name: str = "default",
        *,
        is_trainable: bool = False,
        allow_pickle: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Load the HF PEFT adapter in directory ``path`` as ``name``.

        Every tensor is checked before the model changes: unknown keys, missing keys, shape
        mismatches (an adapter for another base model), NaN/Inf, pickle files (refused unless
        ``allow_pickle``) all raise typed errors and leave the model as it was.
        """
        config, tensors = peft_format.read_adapter(path, allow_pickle=allow_pickle)
        lora = self._lora_config(config)
        tensors = {k.removeprefix(peft_format.KEY_PREFIX): v for k, v in tensors.items()}
        self._inject(name, lora, initialise=False, dtype=dtype)
        try:
            self._load_tensors(name, lora, tensors)
        except Exception:
            self._remove(name)
            self._prune_empty_wrappers()
            raise
        if is_trainable:
            self._trainable.add(name)
        self._activate_if_first(name)
        self._refresh_requires_grad()

    def load_adapter_weights(self, path: str | Path, name: str) -> None:
        """Copy the weights of the PEFT adapter in ``path`` into the existing adapter ``name``
        (e.g. resuming from a checkpoint); keys and shapes must match exactly."""
        self._require(name)
        tensors = peft_format.read_adapter_weights(path)
        config = self._lora_config(self.peft_config[name])
        self._load_tensors(name, config, {k.removeprefix(peft_format.KEY_PREFIX): v for k, v in tensors.items()})
        self.state.epoch += 1

    def _lora_config(self, config: AdapterConfig) -> LoraConfig:
        if not isinstance(config, LoraConfig):
            raise UnknownPeftTypeError(
                f"peft_type {config.peft_type!r} is not implemented by this engine yet", field="peft_type"
            )
        return config

    def _check_new_name(self, name: str) -> None:
        if name in self.peft_config:
            raise AdapterExistsError(f"an adapter named {name!r} is already loaded")
        if name == BASE_ADAPTER or not _NAME_RE.fullmatch(name):
            raise ConfigError(
                f"invalid adapter name {name!r}: use letters, digits, '_' or '-' (and not {BASE_ADAPTER!r})",
                field="name",
            )
        if name in _MODULE_ATTRIBUTES:  # adapters are keys of ModuleDicts: 'training', 'forward', ... would clash
            raise ConfigError(f"invalid adapter name {name!r}: it is an attribute of torch.nn.Module", field="name")

    def _inject(self, name: str, config: LoraConfig, *, initialise: bool, dtype: torch.dtype) -> None:
        """Wrap the targeted modules (if not yet wrapped) and create adapter ``name`` on them."""
        self._check_new_name(name)
        wrappers = (LoraLayer, ModulesToSaveWrapper)
        targets, spec = find_targets(self.model, config, is_linear_like=base_layers.is_linear_like, wrapper_types=wrappers)
        modules = dict(candidate_modules(self.model, wrappers))
        infos = {}
        for target in targets:
            module = modules[target]
            base = module.base_layer if isinstance(module, LoraLayer) else module
            info = base_layers.describe(base)
            if info is None:
                raise UnsupportedModuleError(
                    f"target module {target} is a {type(base).__name__}; LoRA supports nn.Linear, "
                    "transformers Conv1D, nn.Embedding and bitsandbytes Linear4bit/Linear8bitLt"
                )
            infos[target] = info
        saved = self._find_modules_to_save(config)
        config = copy.deepcopy(config)
        config.target_modules = spec
        if any(i.fan_in_fan_out and i.kind == "linear" for i in infos.values()):
            if not config.fan_in_fan_out:
                logger.info("fan_in_fan_out set to True: targets include Conv1D layers")
            config.fan_in_fan_out = True
        elif config.fan_in_fan_out and any(i.kind == "linear" for i in infos.values()):  # (PEFT resets it too)
            logger.info("fan_in_fan_out set to False: the targets are nn.Linear layers (weights stored out x in)")
            config.fan_in_fan_out = False
        config.base_model_name_or_path = config.base_model_name_or_path or getattr(self.model, "name_or_path", None)
        if config.task_type is None and config.auto_mapping is None:
            config.auto_mapping = {
                "base_model_class": type(self.model).__name__,
                "parent_library": type(self.model).__module__,
            }
        self._freeze_base()
        self.state.assign_slot(name)
        self.peft_config[name] = config
        self._targets[name] = targets
        try:
            for target in targets:
                layer = self._wrap(target, infos[target])
                layer.add(name, config, target, initialise=initialise, dtype=dtype)
            for module_name in saved:
                self._wrap_saved(module_name).add(name)
        except Exception:
            self._remove(name)
            self._prune_empty_wrappers()
            raise
        self._params[name] = self._collect_params(name)

    def _find_modules_to_save(self, config: LoraConfig) -> list[str]:
        wanted = config.modules_to_save or []
        if not wanted:
            return []
        found = []
        for module_name, module in candidate_modules(self.model, (LoraLayer, ModulesToSaveWrapper)):
            if isinstance(module, LoraLayer):
                continue
            if module_name and saved_by(module_name, wanted):
                found.append(module_name)
        missing = unmatched(found, wanted)
        if missing:
            raise ConfigError(f"modules_to_save {missing} matched no module of the base model", field="modules_to_save")
        return found

    def _set_submodule(self, module_name: str, new: nn.Module) -> None:
        parent_name, _, child = module_name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def _wrap(self, module_name: str, info: base_layers.BaseLayerInfo) -> LoraLayer:
        existing = self._layers.get(module_name)
        if existing is not None:
            return existing
        base = self.model.get_submodule(module_name)
        layer = LoraLayer(base, info, self.state)
        layer.train(base.training)  # a model in eval mode stays in eval mode (no LoRA dropout)
        self._set_submodule(module_name, layer)
        self._layers[module_name] = layer
        return layer

    def _prune_empty_wrappers(self) -> None:
        """Put back the plain base modules of wrappers that hold no adapter (after a failed add/load)."""
        for module_name, layer in list(self._layers.items()):
            if not layer.specs and not layer.merged_adapters:
                self._set_submodule(module_name, layer.base_layer)
                del self._layers[module_name]
        for module_name, wrapper in list(self._saved_modules.items()):
            if not len(wrapper.modules_to_save):
                self._set_submodule(module_name, wrapper.original_module)
                del self._saved_modules[module_name]

    def _wrap_saved(self, module_name: str) -> ModulesToSaveWrapper:
        existing = self._saved_modules.get(module_name)
        if existing is not None:
            return existing
        original = self.model.get_submodule(module_name)
        wrapper = ModulesToSaveWrapper(original, self.state)
        wrapper.train(original.training)
        self._set_submodule(module_name, wrapper)
        self._saved_modules[module_name] = wrapper
        return wrapper

    def _collect_params(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for layer in self._layers.values():
            params.extend(layer.parameters_of(name))
        for wrapper in self._saved_modules.values():
            params.extend(wrapper.parameters_of(name))
        return params

    def _freeze_base(self) -> None:
        if self._base_frozen:
            return
        for p in self.model.parameters():
            p.requires_grad_(False)
        # bitsandbytes' CPU-repacked 4-bit kernel has no backward: restore the layout before grad forwards
        quant.install_backward_guard(self.model)
        self._base_frozen = True

    def _load_tensors(self, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        remaining = dict(tensors)
        for target in self._targets[name]:
            prefix = target + "."
            own = {k[len(prefix):]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix)}
            extra = {k: v for k, v in own.items() if k.startswith("base_layer.")}
            for k in extra:
                own.pop(k)
            self._layers[target].load_tensors(name, own, target)
            remaining.update({prefix + k: v for k, v in extra.items()})
        for module_name, wrapper in self._saved_modules.items():
            if name not in wrapper.modules_to_save:
                continue
            prefix = module_name + "."
            own = {k[len(prefix):]: remaining.pop(k) for k in list(remaining) if k.startswith(prefix)}
            for key in list(own):  # PEFT's file with bias="all" also holds the original's bias and the copy's again
                if key.startswith("original_module."):
                    remaining[prefix + key.removeprefix("original_module.")] = own.pop(key)  # (a base tensor)
                elif key.startswith("modules_to_save.") and key.removeprefix("modules_to_save.") in own:
                    own.pop(key)
            wrapper.load_tensors(name, own, module_name)
        self._load_base_tensors(config, remaining)

    def _load_base_tensors(self, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        """Biases (``bias`` != "none") and full embedding tables saved with the adapter.

        HF PEFT writes these into the base model when loading; so do we, after checking shapes.
        They are shared by every adapter on the model.
        """
        if not tensors:
            return
        live = dict(self.model.named_parameters(remove_duplicate=False))  # (a tied lm_head has its own name)
        live_by_peft_name = {_peft_base_name(k): v for k, v in live.items()}
        tables = embedding_table_keys(self.model)  # PEFT's save_embedding_layers (after a vocabulary resize)
        plan = []
        for key, value in tensors.items():
            param = live_by_peft_name.get(key)
            allowed = (key.endswith(".bias") and config.bias != "none") or is_saved_base_tensor(key, tables)
            if param is None or not allowed:
                raise AdapterMismatchError(f"unexpected key {peft_format.KEY_PREFIX}{key} in adapter file")
            if tuple(param.shape) != tuple(value.shape):
                raise AdapterMismatchError(
                    f"shape mismatch for {key}: file has {tuple(value.shape)}, this base model needs {tuple(param.shape)}"
                )
            plan.append((param, value))
        with torch.no_grad():
            for param, value in plan:
                if param.is_meta:  # a weightless model (the API's upload check): the shapes are what it checks
                    continue
                if not torch.equal(param, value.to(param.dtype)):
                    param.copy_(value)
        logger.info("loaded %d base tensors (biases/embeddings) saved with the adapter", len(plan))

    def _activate_if_first(self, name: str) -> None:
        if not self.state.active:
            self.state.active = (name,)

    # ------------------------------------------------------------------ switching
    def set_adapter(self, names: str | list[str]) -> None:
        """Make ``names`` the active adapter(s): O(1) in the number of layers. Two of them with their own copy
        of one ``modules_to_save`` module cannot be active together (``AdapterStateError``, as PEFT refuses)."""
        wanted = (names,) if isinstance(names, str) else tuple(names)
        for n in wanted:
            self._require(n)
        for module_name, wrapper in self._saved_modules.items():
            owners = [n for n in wanted if n in wrapper.modules_to_save]
            if len(owners) > 1:
                raise AdapterStateError(f"adapters {', '.join(map(repr, owners))} each have their own copy of "
                                        f"{module_name} (modules_to_save): only one of them can be active")
        self.state.active = wanted
        self._refresh_requires_grad()

    def _refresh_requires_grad(self) -> None:
        active = set(self.state.active)
        changed = False
        for name, params in self._params.items():
            flag = name in active and name in self._trainable
            if params and params[0].requires_grad != flag:
                changed = True
                for p in params:
                    p.requires_grad_(flag)
        if changed:  # layers cache which adapter tensors can change in place
            self.state.epoch += 1
        self._refresh_bias_trainability()

    def _refresh_bias_trainability(self) -> None:
        """Base biases are trainable while an active trainable adapter has ``bias`` "all"/"lora_only"."""
        if all(getattr(c, "bias", "none") == "none" for c in self.peft_config.values()):
            return
        modes = {
            getattr(self.peft_config[n], "bias", "none")
            for n in self.state.active
            if n in self._trainable and n in self.peft_config
        }
        for pname, p in self.model.named_parameters():
            if not pname.endswith(".bias") or ".lora_" in pname or ".modules_to_save." in pname:
                continue
            p.requires_grad_("all" in modes or ("lora_only" in modes and ".base_layer." in pname))

    def _require(self, name: str) -> None:
        if name not in self.peft_config:
            raise AdapterNotFoundError(f"no adapter named {name!r}; loaded: {self.adapters or 'none'}")

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside the block (merged adapters are taken out meanwhile)."""
        merged = self.merged_adapters
        if merged:
            self.unmerge_adapter()
        previous = self.state.disabled
        self.state.disabled = True
        try:
            yield
        finally:
            self.state.disabled = previous
            if merged:
                self.merge_adapter(merged)

    # ------------------------------------------------------------------ deleting
    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` and free its slot; if it was active, the next one becomes active."""
        self._require(name)
        if name in self.merged_adapters:
            raise AdapterStateError(f"adapter {name!r} is merged; call unmerge_adapter() first")
        self._remove(name)
        remaining = [n for n in self.state.active if n != name]
        if not remaining and self.peft_config:
            remaining = [next(iter(self.peft_config))]
        self.state.active = tuple(remaining)
        self._refresh_requires_grad()

    def _remove(self, name: str) -> None:
        for layer in self._layers.values():
            layer.delete(name)
        for wrapper in self._saved_modules.values():
            wrapper.delete(name)
        self.peft_config.pop(name, None)
        self._targets.pop(name, None)
        self._params.pop(name, None)
        self._trainable.discard(name)
        self.state.release_slot(name)
        self.state.active = tuple(n for n in self.state.active if n != name)

    # ------------------------------------------------------------------ saving
    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under HF PEFT's keys (``base_model.model.<path>.<suffix>``)."""
        self._require(name)
        config = self.peft_config[name]
        out: dict[str, torch.Tensor] = {}
        prefix = peft_format.KEY_PREFIX
        for target in self._targets[name]:
            for suffix, tensor in self._layers[target].adapter_state_dict(name).items():
                out[f"{prefix}{target}.{suffix}"] = tensor
        for module_name, wrapper in self._saved_modules.items():
            if name in wrapper.modules_to_save:
                for suffix, tensor in wrapper.adapter_state_dict(name).items():
                    out[f"{prefix}{module_name}.{suffix}"] = tensor
        assert isinstance(config, LoraConfig)
        out.update(self._base_tensors_to_save(name, config))
        return out

    def _base_tensors_to_save(self, name: str, config: LoraConfig) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        prefix = peft_format.KEY_PREFIX
        copied = {m for m, wrapper in self._saved_modules.items() if name in wrapper.modules_to_save}
        for pname, p in self.model.named_parameters():
            peft_name = _peft_base_name(pname)
            if ".original_module." in pname and pname.split(".original_module.")[0] in copied:
                peft_name = pname  # PEFT's key: the plain name is this adapter's own copy's
            if ".lora_" in pname or ".modules_to_save." in pname:
                continue
            if config.bias == "all" and pname.endswith(".bias"):
                out[prefix + peft_name] = p.detach()
            elif config.bias == "lora_only" and pname.endswith(".bias"):
                module = pname[: -len(".base_layer.bias")] if pname.endswith(".base_layer.bias") else None
                if module in self._targets[name]:
                    out[prefix + peft_name] = p.detach()
        # HF PEFT saves the input/output embedding tables when `embed_tokens` or `lm_head` is a target
        if _embedding_is_targeted(config, self._targets[name]):
            for getter in ("get_input_embeddings", "get_output_embeddings"):
                fn = getattr(self.model, getter, None)
                module = fn() if callable(fn) else None
                for target in self._targets[name]:
                    if self._layers[target] is module:
                        out[f"{prefix}{target}.base_layer.weight"] = self._layers[target].weight.detach()
        return out

    def save_adapter(self, directory: str | Path, name: str) -> Path:
        """Write adapter ``name`` to ``directory`` in HF PEFT format (loadable by ``peft``)."""
        self._require(name)
        return peft_format.write_adapter(directory, self.peft_config[name], self.adapter_state_dict(name))

    def save_pretrained(self, directory: str | Path, selected_adapters: list[str] | None = None) -> None:
        """HF PEFT's multi-adapter layout: ``default`` in ``directory``, others in ``directory/<name>``."""
        for name in selected_adapters or self.adapters:
            self._require(name)
            root = name == "default"
            target = Path(directory) if root else Path(directory) / name
            config = self.peft_config[name]
            peft_format.write_adapter(target, config, self.adapter_state_dict(name), readme=root)

    # ------------------------------------------------------------------ merging
    @property
    def merged_adapters(self) -> list[str]:
        seen: list[str] = []
        for layer in self._layers.values():
            for n in layer.merged_adapters:
                if n not in seen:
                    seen.append(n)
        return seen

    def merge_adapter(self, adapter_names: list[str] | None = None, *, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weights.

        With ``safe_merge`` every layer's merged weight is computed on a copy and checked for NaN/Inf
        first; on failure nothing has been written.
        """
        names = list(adapter_names) if adapter_names is not None else list(self.state.active)
        for n in names:
            self._require(n)
        if safe_merge:
            for layer in self._layers.values():
                layer.merge(names, safe_merge=True, dry_run=True)
        self._untie_merge_targets(names)
        for layer in self._layers.values():
            layer.merge(names, safe_merge=False)
        self.state.epoch += 1

    def _untie_merge_targets(self, names: list[str]) -> None:
        """Give layers about to be merged their own weight when it is tied to another module.

        Merging into ``wte`` of a model whose ``lm_head`` shares the tensor would change the output
        head too; after untying, merged outputs equal unmerged ones (at the cost of one more table).
        """
        owners: dict[int, int] = {}
        for _, p in self.model.named_parameters(remove_duplicate=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
        for module_name, layer in self._layers.items():
            weight = layer.weight
            if owners.get(id(weight), 0) > 1 and any(n in layer.specs for n in names):
                logger.warning("untying %s.weight from the module(s) sharing it before merging", module_name)
                layer.base_layer.register_parameter("weight", nn.Parameter(weight.detach().clone(), requires_grad=False))
                config = getattr(self.model, "config", None)
                if config is not None and getattr(config, "tie_word_embeddings", False):
                    config.tie_word_embeddings = False

    def unmerge_adapter(self) -> None:
        """Take all merged adapters back out of the base weights."""
        for layer in self._layers.values():
            layer.unmerge()
        self.state.epoch += 1

    def merge_and_unload(self, *, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge adapters into the base weights and return the plain base model (no adapter layers)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(keep_saved_copy=True)

    def unload(self) -> nn.Module:
        """Return the base model without adapters (merged ones are taken out first)."""
        if self.merged_adapters:
            self.unmerge_adapter()
        return self._unload(keep_saved_copy=False)

    def _unload(self, *, keep_saved_copy: bool) -> nn.Module:
        for module_name, layer in list(self._layers.items()):
            self._set_submodule(module_name, layer.base_layer)
        for module_name, wrapper in list(self._saved_modules.items()):
            # the copy the forward used: the first active adapter that has one
            owner = next((n for n in self.state.active if n in wrapper.modules_to_save), None)
            if keep_saved_copy and owner is not None:
                self._set_submodule(module_name, wrapper.modules_to_save[owner])
            else:
                self._set_submodule(module_name, wrapper.original_module)
        self._layers.clear()
        self._saved_modules.clear()
        for name in list(self.peft_config):
            self.peft_config.pop(name)
            self.state.release_slot(name)
        self._targets.clear()
        self._params.clear()
        self._trainable.clear()
        self.state.active = ()
        return self.model

    # ------------------------------------------------------------------ running
    def _routing(self, adapter_names: list[str]) -> RowRouting:
        slots = []
        merged = set(self.merged_adapters)
        for n in adapter_names:
            if n == BASE_ADAPTER:
                slots.append(0)
                continue
            self._require(n)
            if n in merged:
                raise AdapterStateError("adapter_names cannot be used while adapters are merged; unmerge first")
            slots.append(self.state.slots[n])
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return RowRouting(torch.tensor(slots, dtype=torch.long, device=device), frozenset(slots), tuple(adapter_names))

    @contextlib.contextmanager
    def route_rows(self, adapter_names: list[str] | None) -> Iterator[None]:
        """Inside the block, row ``i`` of every batch uses adapter ``adapter_names[i]``."""
        if adapter_names is None:
            yield
            return
        previous = self.state.rows
        self.state.rows = self._routing(list(adapter_names))
        try:
            yield
        finally:
            self.state.rows = previous

    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if adapter_names is not None:
            _check_batch_size(adapter_names, args, kwargs)
        with self.route_rows(adapter_names):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with optional per-row adapters (rows are repeated for beams/samples)."""
        if adapter_names is not None:
            repeat = max(int(kwargs.get("num_beams", 1) or 1), 1) * max(int(kwargs.get("num_return_sequences", 1) or 1), 1)
            _check_batch_size(adapter_names, args, kwargs)
            adapter_names = [n for n in adapter_names for _ in range(repeat)]
        with self.route_rows(adapter_names):
            return cast(Any, self.model).generate(*args, **kwargs)

    # ------------------------------------------------------------------ introspection
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts."""
        total = sum(_numel(p) for p in self.parameters())
        return sum(_numel(p) for p in self.trainable_parameters()), total


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def _embedding_is_targeted(config: LoraConfig, targets: list[str]) -> bool:
    """HF PEFT's rule for saving embedding tables with an adapter (names, not module types)."""
    spec = config.target_modules
    if isinstance(spec, str):
        return any(re.search(rf"(^|\.){e}$", t) for t in targets for e in EMBEDDING_LAYER_NAMES)
    return spec is not None and any(e in spec for e in EMBEDDING_LAYER_NAMES)


def _check_batch_size(adapter_names: list[str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """``adapter_names`` must name one adapter per row of the batch."""
    candidates = [*args[:1], kwargs.get("input_ids"), kwargs.get("inputs_embeds")]
    batch = next((c for c in candidates if isinstance(c, torch.Tensor)), None)
    if batch is not None and batch.dim() > 0 and batch.shape[0] != len(adapter_names):
        raise AdapterStateError(
            f"adapter_names has {len(adapter_names)} entries but the batch has {batch.shape[0]} rows"
        )


def _numel(p: torch.Tensor) -> int:
    """Number of values in ``p``; bitsandbytes packs two 4-bit values per stored byte."""
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def embedding_table_keys(model: nn.Module) -> set[str]:
    """The PEFT keys (without ``base_model.model.``) of the input and output embedding tables: what PEFT's
    ``save_embedding_layers`` writes beside an adapter, and writes back into the base model on loading."""
    keys: set[str] = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if module is None:
            continue
        for name, candidate in model.named_modules(remove_duplicate=False):
            if candidate is module:
                keys.add(_peft_base_name(f"{name}.weight"))
    return keys


def is_saved_base_tensor(key: str, tables: set[str]) -> bool:
    """Whether PEFT key ``key`` is a base model tensor PEFT writes beside an adapter as it is: the base weight or
    bias of a layer under LoRA, an embedding table (``tables``: :func:`embedding_table_keys`), or the bias of one
    (an output head with a bias, as Phi's), under ``save_embedding_layers``."""
    if key.endswith((".base_layer.weight", ".base_layer.bias")) or key in tables:
        return True
    return key.endswith(".bias") and key.removesuffix(".bias") + ".weight" in tables


def _peft_base_name(live_name: str) -> str:
    """Live parameter name → its key in a PEFT file (``modules_to_save`` originals keep their path)."""
    return live_name.replace(".original_module.", ".")
