"""The server's base model: which one, where its files are, and what the API needs of it.

``ADAPTERFORGE_BASE_MODEL`` names an HF model id or a local directory; unset, a tiny seeded demo
model is built into ``DATA_DIR/demo-model`` on first start (and the log says so). The API keeps the
tokenizer (dataset token counts) and a weightless ``meta``-device copy of the architecture, on
which uploaded adapters are test-loaded: every key, shape and target module is checked against the
real architecture without holding the weights. Workers load the weights themselves.
"""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapters_core.config import AdapterConfig
from app.settings import Settings

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "adapterforge-demo-tiny-llama"
_VALIDATION_SLOT = "__upload_validation__"


@dataclass(frozen=True)
class BaseModelSource:
    """``name`` is what the registry records; ``path`` what ``from_pretrained`` is given."""

    name: str
    path: str


class BaseModelNotFound(ValueError):
    """``ADAPTERFORGE_BASE_MODEL`` is a local path with nothing there."""


def _is_path(value: str) -> bool:
    """Whether ``value`` can only be a filesystem path: an HF id is ``name`` or ``org/name``."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or "\\" in value


def resolve_base_model(settings: Settings) -> BaseModelSource:
    """The configured base model, building the demo model first when none is configured;
    :class:`BaseModelNotFound` for a local path that does not exist (rather than asking the Hub for it)."""
    if settings.base_model:
        local = Path(settings.base_model).expanduser()
        if local.exists():
            return BaseModelSource(settings.base_model, str(local))
        if _is_path(settings.base_model):
            raise BaseModelNotFound(f"ADAPTERFORGE_BASE_MODEL is {settings.base_model!r}: no such directory "
                                    "(set it to a local model directory or an HF model id such as org/name)")
        return BaseModelSource(settings.base_model, settings.base_model)
    from adapters_core.tiny_models import ensure_tiny_model

    if not (settings.demo_model_dir / "adapterforge_tiny.json").exists():
        logger.info(
            "ADAPTERFORGE_BASE_MODEL is not set: building the tiny demo model in %s (set it to an HF id or a "
            "local model directory to serve a real model)", settings.demo_model_dir,
        )
    built = ensure_tiny_model(settings.demo_model_dir)
    return BaseModelSource(DEMO_MODEL_NAME, str(built))


def resolve_device(setting: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


class BaseModelHost:
    """Tokenizer and weightless architecture of the base model, for the API."""

    def __init__(self, source: BaseModelSource, tokenizer: Any, skeleton: torch.nn.Module) -> None:
        self.source = source
        self.tokenizer = tokenizer
        self._skeleton = skeleton  # never wrapped: each check wraps a copy of its own
        self._lock = threading.Lock()

    def _fresh(self) -> Any:
        """An ``AdapterModel`` on a copy of the skeleton: what one adapter's check wraps (modules_to_save
        copies, LoRA layers) must not change how the next adapter's check sees the architecture."""
        from adapters_core import AdapterModel

        return AdapterModel(copy.deepcopy(self._skeleton))

    @classmethod
    def load(cls, settings: Settings) -> BaseModelHost:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        source = resolve_base_model(settings)
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        config = AutoConfig.from_pretrained(source.path)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        logger.info("base model %s (%s): %s", source.name, source.path, type(skeleton).__name__)
        return cls(source, tokenizer, skeleton)

    @property
    def name(self) -> str:
        return self.source.name

    def check_adapter(self, directory: str | Path) -> AdapterConfig:
        """Test-load the PEFT adapter in ``directory`` onto the architecture; its config if it fits.

        Raises the engine's typed errors: unknown method or bad config field (``ConfigError``),
        targets missing from this model, wrong keys or shapes (``AdapterMismatchError``), pickle
        weights, NaN/Inf.
        """
        from adapters_core.config import load_config

        config = load_config(directory)
        self._check_saved_modules(config)
        with self._lock:
            self._fresh().load_adapter(directory, _VALIDATION_SLOT)
        return config

    def check_config(self, config: AdapterConfig) -> None:
        """Test-inject ``config`` as a new adapter on the architecture, then remove it again.

        Raises the engine's typed errors: targets missing from this model
        (``TargetModulesNotFoundError``), module types the method cannot wrap
        (``UnsupportedModuleError``), bad or unsupported fields (``ConfigError``). Initialisations that
        read the base weights (PiSSA, OLoRA, DoRA magnitudes) cannot run on weightless ``meta``
        tensors: after checking that the requested init can create weights at all, the probe uses
        the default init without DoRA; the worker computes the real values.
        """
        import dataclasses

        check_init = getattr(config, "check_can_initialise", None)
        if check_init is not None:
            check_init()
        weightless: dict[str, Any] = {"init_lora_weights": True, "use_dora": False}
        probe = dataclasses.replace(config, **{k: v for k, v in weightless.items() if hasattr(config, k)})
        self._check_saved_modules(config)  # a trained adapter the server could not serve is refused before it trains
        with self._lock:
            adapters = self._fresh()
            adapters.add_adapter(_VALIDATION_SLOT, probe, dtype=torch.bfloat16)
            self._check_ranks(adapters)
            self._check_patterns(config, adapters)

    def _check_saved_modules(self, config: AdapterConfig) -> None:
        """``ConfigError`` on ``modules_to_save`` unless its entries name single layers of the architecture, which
        the server can serve copies of (``adapters_core.serving.slotted.saved_module_names``)."""
        from adapters_core.errors import ConfigError, TargetModulesNotFoundError
        from adapters_core.serving.slotted import saved_module_names

        wanted = getattr(config, "modules_to_save", None)
        if not wanted:
            return
        try:
            with self._lock:
                saved_module_names(self._skeleton, wanted)
        except TargetModulesNotFoundError as exc:
            raise ConfigError(str(exc), field="modules_to_save") from exc

    @staticmethod
    def _check_patterns(config: AdapterConfig, adapters: Any) -> None:
        """A ``rank_pattern`` / ``alpha_pattern`` key must match a module the adapter targets (a typo would
        otherwise be ignored, and every layer trained at ``r`` / ``lora_alpha``)."""
        from adapters_core.errors import ConfigError
        from adapters_core.methods.lora.config import pattern_key

        suffix = f".lora_A.{_VALIDATION_SLOT}"
        targeted = [n.removesuffix(suffix) for n, _ in adapters.named_parameters() if n.endswith(suffix)]
        for field_name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(config, field_name, None) or {}:
                if not any(pattern_key([key], module) for module in targeted):
                    raise ConfigError(f"{field_name} key {key!r} matches no module the adapter targets", field=field_name)

    @staticmethod
    def _check_ranks(adapters: Any) -> None:
        """A rank above a layer's smallest dimension adds no capacity, only memory: refuse it (a typo
        such as ``r=40960`` would otherwise make a worker allocate until it is killed)."""
        suffix = f".lora_A.{_VALIDATION_SLOT}"
        shapes = dict((n, tuple(p.shape)) for n, p in adapters.named_parameters() if "lora_" in n)
        for name, (rank, fan_in) in ((n, s) for n, s in shapes.items() if n.endswith(suffix)):
            module = name.removesuffix(suffix)
            fan_out = shapes[f"{module}.lora_B.{_VALIDATION_SLOT}"][0]
            if rank > min(fan_in, fan_out):
                from adapters_core.errors import ConfigError

                short = module.split("model.", 1)[-1]
                raise ConfigError(
                    f"r={rank} exceeds the smallest dimension ({min(fan_in, fan_out)}) of {short} "
                    f"({fan_in} -> {fan_out}); a LoRA rank cannot usefully exceed it", field="r",
                )
