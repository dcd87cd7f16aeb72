"""Which modules of a base model an adapter config targets.

Rules, as HF PEFT applies them (so a user's existing config selects the same modules):

* ``target_modules`` list: a module matches when its full name equals an entry or ends with
  ``"." + entry``; a string is a regex that must match the full name (``re.fullmatch``);
  ``"all-linear"`` selects every Linear / Conv1D / bitsandbytes linear layer except the output
  embedding (``lm_head``); ``None`` uses the architecture's default (:data:`DEFAULT_TARGETS`).
* ``exclude_modules``: the same list/regex rules, applied first.
* ``layers_to_transform`` (+ ``layers_pattern``): keep list matches whose layer index (the number
  after ``<pattern>.`` in the name, or after the first ``<name>.<number>.`` when no pattern) is selected.
* modules named in ``modules_to_save`` are never LoRA targets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from adapters_core.errors import ConfigError, TargetModulesNotFoundError

ALL_LINEAR = "all-linear"

# Default targets per ``config.model_type`` (the attention projections LoRA papers adapt).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
}


def _matches(spec: str | list[str], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith("." + entry) for entry in spec)


def _layer_index(name: str, patterns: list[str] | None) -> int | None:
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        m = None
        for pattern in patterns:
            m = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if m is not None:
                break
    return int(m.group("idx")) if m else None


def is_modules_to_save_name(name: str, modules_to_save: Iterable[str] | None) -> bool:
    """True when ``name`` is (inside) a module listed in ``modules_to_save``."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save or ())


def resolve_target_spec(config: Any, model: nn.Module) -> str | list[str]:
    """``config.target_modules`` with the architecture default filled in."""
    target = config.target_modules
    if target is not None:
        return target
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise ConfigError(
        f"target_modules not given and no default is known for model_type {model_type!r}; "
        "pass target_modules (a list of module names, a regex, or 'all-linear')",
        field="target_modules",
    )


def candidate_modules(model: nn.Module, skip: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """Named modules that may be targeted: every module, without descending into adapter wrappers."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        out.append((prefix, module))
        if skip and isinstance(module, skip):
            return
        for child_name, child in module._modules.items():
            if child is not None:
                walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    walk("", model)
    return out


def find_targets(
    model: nn.Module,
    config: Any,
    *,
    is_linear_like: Any,
    wrapper_types: tuple[type, ...] = (),
) -> tuple[list[str], str | list[str]]:
    """Names of the modules ``config`` targets, and the target spec to record in the saved config.

    ``"all-linear"`` is recorded as the resolved list of module names, as HF PEFT does.
    Raises :class:`TargetModulesNotFoundError` when nothing matches, listing what was looked for.
    """
    spec = resolve_target_spec(config, model)
    modules = candidate_modules(model, wrapper_types)
    get_output = getattr(model, "get_output_embeddings", None)
    output_embedding = get_output() if callable(get_output) else None
    if isinstance(spec, str) and spec.lower() == ALL_LINEAR:
        def unwrap(module: nn.Module | None) -> nn.Module | None:
            inner = getattr(module, "base_layer", None) if wrapper_types and isinstance(module, wrapper_types) else None
            return unwrap(inner) if isinstance(inner, nn.Module) else module

        output = unwrap(output_embedding)
        spec = sorted(
            name
            for name, module in modules
            if name and is_linear_like(unwrap(module)) and unwrap(module) is not output
        )
        if not spec:
            raise TargetModulesNotFoundError("target_modules='all-linear' found no linear layer in the model")
    exclude = config.exclude_modules
    layers = config.layers_to_transform
    if isinstance(layers, int):
        layers = [layers]
    patterns = config.layers_pattern
    if isinstance(patterns, str):
        patterns = [patterns] if patterns else None  # (PEFT: an empty pattern is no pattern)
    found: list[str] = []
    excluded = 0
    for name, _module in modules:
        if not name:
            continue
        if exclude and _matches(exclude, name):
            excluded += 1
            continue
        if is_modules_to_save_name(name, getattr(config, "modules_to_save", None)):
            continue
        if not _matches(spec, name):
            continue
        if layers and not isinstance(spec, str) and name not in spec:  # (PEFT: a full name skips the filter)
            idx = _layer_index(name, patterns)
            if idx is None or idx not in layers:
                continue
        found.append(name)
    if not found:
        sample = ", ".join(n for n, _ in modules[1:13])
        detail = f"; {excluded} module(s) were excluded by exclude_modules" if excluded else ""
        if layers:
            detail += f"; layers_to_transform={layers} layers_pattern={patterns}"
        raise TargetModulesNotFoundError(
            f"target_modules {spec!r} matched no module of the base model{detail}. Module names look like: {sample}, ..."
        )
    return found, spec
