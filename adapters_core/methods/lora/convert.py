"""LoRA trained from an initialisation that rewrote the base weights (PiSSA, OLoRA), as a plain LoRA.

Such an initialisation sets ``A₀``, ``B₀`` from the base weight ``W`` and replaces ``W`` with
``W - s·B₀A₀``; training then moves ``A``, ``B`` on that rewritten base. Its files only fit the rewritten
base, which nobody else has. The same function of ``x`` on the *original* ``W`` is the LoRA of rank
``2r`` whose ``A`` stacks ``A`` over ``A₀`` and whose ``B`` puts ``B`` beside ``-B₀``, at the same
scaling ``s``::

    (W - s·B₀A₀) x + s·B A x  =  W x + s·[B, -B₀] [A; A₀] x

so ``r`` and every ``rank_pattern`` value double, and ``lora_alpha`` and every ``alpha_pattern`` value
double too (times ``√2`` with ``use_rslora``, whose scaling is ``alpha / √r``), which keeps ``s``. This
is the conversion HF PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` makes;
``initial`` is the adapter as its initialisation left it (saved before training, as PEFT asks too).
Biases (``lora_bias``) and ``modules_to_save`` are not part of the rewrite and stay as trained. DoRA
normalises by the weight's norm, which the rewrite changes: it has no such conversion (``ConfigError``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from adapters_core.config import config_from_dict
from adapters_core.errors import AdapterFormatError, ConfigError
from adapters_core.methods.lora.config import LoraConfig

_REWRITING = ("pissa", "olora")


def rewrites_base(config: object) -> bool:
    """Whether ``config`` is a LoRA config whose initialisation rewrites the base weights."""
    init = getattr(config, "init_lora_weights", True)
    return isinstance(config, LoraConfig) and isinstance(init, str) and init.lower().startswith(_REWRITING)


def to_plain_lora(config: LoraConfig, trained: dict[str, torch.Tensor],
                  initial: dict[str, torch.Tensor]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The plain LoRA (config and tensors under PEFT's keys) equal, on the original base, to ``trained``
    on the base its initialisation rewrote; ``initial`` holds the same keys as its initialisation left them."""
    if config.use_dora:
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} with use_dora has no conversion to a "
                          "LoRA of the original base weights", field="init_lora_weights")
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in trained.items():
        down = key.endswith((".lora_A.weight", ".lora_embedding_A"))
        up = key.endswith((".lora_B.weight", ".lora_embedding_B"))
        if not (down or up):
            tensors[key] = tensor
            continue
        start = initial.get(key)
        if start is None or start.shape != tensor.shape:
            raise AdapterFormatError(f"the initial adapter has no tensor {key} of shape {tuple(tensor.shape)}")
        start = start.to(tensor.dtype)
        tensors[key] = torch.cat([tensor, start], dim=0) if down else torch.cat([tensor, -start], dim=1)
    def alpha(value: float) -> float:  # (an int alpha stays an int where it can)
        return math.sqrt(2.0) * value if config.use_rslora else 2 * value

    data = config.to_dict()
    data.update(
        r=2 * config.r,
        lora_alpha=alpha(config.lora_alpha),
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: alpha(v) for k, v in config.alpha_pattern.items()},
        init_lora_weights=True,
    )
    converted = config_from_dict(data)
    assert isinstance(converted, LoraConfig)
    return converted, tensors


def convert_saved(directory: str | Path, initial_directory: str | Path) -> None:
    """Rewrite the PEFT adapter in ``directory`` as its plain LoRA (:func:`to_plain_lora`), given the
    adapter its initialisation left, saved in ``initial_directory``. A no-op for other adapters."""
    from adapters_core.peft_format import read_adapter, write_adapter

    config, trained = read_adapter(directory)
    if not isinstance(config, LoraConfig) or not rewrites_base(config):
        return
    _, initial = read_adapter(initial_directory)
    converted, tensors = to_plain_lora(config, trained, initial)
    write_adapter(directory, converted, tensors, readme=False)
