"""``LoraConfig``: HF PEFT's LoRA config, same field names, defaults and meaning.

Fields that change what a LoRA forward computes but that this engine does not implement (aLoRA,
BD-LoRA, Arrow, VeLoRA, MonteCLoRA, KaSA, QALoRA, layer replication, target parameters, trainable
tokens, Megatron) raise :class:`ConfigError` naming the field instead of being silently ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adapters_core.config import AdapterConfig, register_config
from adapters_core.errors import ConfigError

# init_lora_weights values this engine can create weights for (loading weights works with any value).
SUPPORTED_INITS = ("True", "False", "gaussian", "pissa", "pissa_niter_<n>", "olora")
_KNOWN_INITS = {"gaussian", "pissa", "olora", "eva", "corda", "loftq", "orthogonal", "lora_ga", "mica"}

_UNSUPPORTED_WHEN_SET: dict[str, str] = {
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "target_parameters": "targeting nn.Parameters",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron parallel layers",
}


@register_config
@dataclass
class LoraConfig(AdapterConfig):
    """Low-rank adaptation: ``y = W x + b + s · B(A(dropout(x)))`` with ``s = lora_alpha / r``
    (``lora_alpha / sqrt(r)`` with ``use_rslora``). Hu et al., 2021, https://arxiv.org/abs/2106.09685.
    """

    PEFT_TYPE = "LORA"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict[str, Any] = field(default_factory=dict)
    eva_config: dict[str, Any] | None = None
    corda_config: dict[str, Any] | None = None
    lora_ga_config: dict[str, Any] | None = None
    use_dora: bool = False
    velora_config: dict[str, Any] | None = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict[str, Any] | None = None
    layer_replication: list[tuple[int, int]] | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    use_bdlora: dict[str, Any] | None = None
    arrow_config: dict[str, Any] | None = None
    kasa_config: dict[str, Any] | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        for name in ("rank_pattern", "alpha_pattern", "loftq_config"):  # PEFT types these Optional: null is {}
            if getattr(self, name) is None:
                setattr(self, name, {})
        super().__post_init__()
        if isinstance(self.target_modules, set | tuple):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, set | tuple):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, set | tuple):
            self.modules_to_save = list(self.modules_to_save)
        self.rank_pattern = dict(self.rank_pattern)
        self.alpha_pattern = dict(self.alpha_pattern)
        self.loftq_config = dict(self.loftq_config)
        self._validate()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}", field="r")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, int | float):
            raise ConfigError(f"lora_alpha must be a number, got {self.lora_alpha!r}", field="lora_alpha")
        if not isinstance(self.lora_dropout, int | float) or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}", field="lora_dropout")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}", field="bias")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"rank_pattern[{key!r}] must be a positive integer", field="rank_pattern")
        for key, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, int | float):
                raise ConfigError(f"alpha_pattern[{key!r}] must be a number", field="alpha_pattern")
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field_name):
                try:
                    re.compile(key)
                except re.error as exc:
                    raise ConfigError(f"{field_name} key {key!r} is not a valid regular expression: {exc}",
                                      field=field_name) from exc
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ConfigError(
                "layers_to_transform cannot be used when target_modules is a regex string", field="layers_to_transform"
            )
        if isinstance(self.target_modules, str) and self.layers_pattern:
            raise ConfigError(
                "layers_pattern cannot be used when target_modules is a regex string", field="layers_pattern"
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError("layers_pattern only works together with layers_to_transform", field="layers_pattern")
        for name in (self.target_modules, self.exclude_modules):
            if isinstance(name, str):
                try:
                    re.compile(name)
                except re.error as exc:
                    raise ConfigError(f"invalid regular expression {name!r}: {exc}", field="target_modules") from exc
        self._validate_init()
        if self.lora_bias and self.use_dora:  # (PEFT refuses both combinations too)
            raise ConfigError("lora_bias=True is not supported with use_dora", field="lora_bias")
        if self.lora_bias and not isinstance(self.init_lora_weights, bool):
            raise ConfigError(f"lora_bias=True is not supported with init_lora_weights={self.init_lora_weights!r}",
                              field="lora_bias")
        for name, what in _UNSUPPORTED_WHEN_SET.items():
            value = getattr(self, name)
            if value not in (None, False, [], {}):
                raise ConfigError(f"{name} ({what}) is not supported by this engine", field=name)
        if self.use_qalora:
            raise ConfigError("use_qalora (quantization-aware LoRA) is not supported by this engine", field="use_qalora")
        if self.ensure_weight_tying:
            raise ConfigError("ensure_weight_tying is not supported by this engine", field="ensure_weight_tying")

    def _validate_init(self) -> None:
        init = self.init_lora_weights
        if isinstance(init, bool):
            return
        if not isinstance(init, str):
            raise ConfigError(f"init_lora_weights must be a bool or a string, got {init!r}", field="init_lora_weights")
        if init.lower() in _KNOWN_INITS or re.fullmatch(r"pissa_niter_\d+", init) or init.startswith("corda"):
            return
        raise ConfigError(f"unknown init_lora_weights {init!r}", field="init_lora_weights")

    def check_can_initialise(self) -> None:
        """Raise unless fresh weights can be created for ``init_lora_weights`` (loading needs no init)."""
        init = self.init_lora_weights
        if isinstance(init, bool) or init in ("gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", init):
            return
        raise ConfigError(
            f"init_lora_weights={init!r} is not supported for new adapters; use one of {', '.join(SUPPORTED_INITS)}",
            field="init_lora_weights",
        )

    def rank_for(self, module_name: str) -> int:
        """Rank of the module named ``module_name`` after ``rank_pattern``."""
        key = pattern_key(self.rank_pattern, module_name)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """Alpha of the module named ``module_name`` after ``alpha_pattern``."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha


def pattern_key(patterns: dict[str, Any] | list[str], module_name: str) -> str | None:
    """First pattern key that equals ``module_name`` or matches a dotted suffix of it (regex allowed)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None
