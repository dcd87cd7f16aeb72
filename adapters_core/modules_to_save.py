"""``ModulesToSaveWrapper``: a fully trained copy of a module (e.g. ``lm_head``) per adapter.

Layout mirrors HF PEFT: ``original_module`` plus ``modules_to_save[<adapter>]``; in the PEFT file the
copy's tensors are saved under the module's own name (``base_model.model.lm_head.weight``).
Rows of a mixed batch each go through their adapter's copy (or the original for ``__base__`` and
adapters without a copy).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from adapters_core.state import AdapterState


def saved_by(name: str, wanted: Sequence[str]) -> bool:
    """Whether the ``modules_to_save`` entries ``wanted`` name the module ``name``: HF PEFT's rule, a plain suffix
    of the name, not only whole path components (``norm`` also names ``input_layernorm``)."""
    return any(name.endswith(w) for w in wanted)


def unmatched(found: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The entries of ``wanted`` that name none of the modules ``found``."""
    return [w for w in wanted if not any(f.endswith(w) for f in found)]


class ModulesToSaveWrapper(nn.Module):
    """Routes to the active adapter's copy of the wrapped module."""

    def __init__(self, module: nn.Module, state: AdapterState) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self._state = state

    @property
    def weight(self) -> torch.Tensor:
        w = self.original_module.weight
        assert isinstance(w, torch.Tensor)
        return w

    def add(self, name: str) -> None:
        """Give adapter ``name`` its own trainable copy of the original module."""
        clone = copy.deepcopy(self.original_module)
        for p in clone.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = clone

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]

    def parameters_of(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters()) if name in self.modules_to_save else []

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.modules_to_save[name].state_dict().items()}

    def load_tensors(self, name: str, tensors: dict[str, torch.Tensor], module_name: str) -> None:
        from adapters_core.errors import AdapterMismatchError

        target = self.modules_to_save[name]
        own = target.state_dict()
        for key, value in tensors.items():
            if key not in own:
                raise AdapterMismatchError(f"unexpected key {module_name}.{key} for modules_to_save")
            if tuple(own[key].shape) != tuple(value.shape):
                raise AdapterMismatchError(
                    f"shape mismatch for {module_name}.{key}: file has {tuple(value.shape)}, "
                    f"this base model needs {tuple(own[key].shape)}"
                )
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise AdapterMismatchError(f"missing keys for {module_name}: {', '.join(missing)}")
        target.load_state_dict(tensors)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self._state
        if state.disabled:
            return self.original_module(x, *args, **kwargs)
        rows = state.rows
        if rows is None:
            for name in state.active:
                if name in self.modules_to_save:
                    return self.modules_to_save[name](x, *args, **kwargs)
            return self.original_module(x, *args, **kwargs)
        result = self.original_module(x, *args, **kwargs)
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(rows.names):
            if n in self.modules_to_save:
                groups.setdefault(n, []).append(i)
        if not groups:
            return result
        result = result.clone()
        for name, idx_list in groups.items():
            idx = torch.tensor(idx_list, device=x.device)
            result[idx] = self.modules_to_save[name](x[idx], *args, **kwargs)
        return result
