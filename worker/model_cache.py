"""The worker's resident base model: loaded once per worker process, handed to one job at a time.

Each job gets a fresh :class:`~adapters_core.AdapterModel` over the resident base model. When the
job ends, every adapter layer and wrapper is taken out again (``unload``), gradient checkpointing
is switched off and accelerate's process-wide state is reset, so the next job starts from the clean
base whatever the previous one did. A job whose adapter writes into the base weights themselves
(``bias`` other than ``"none"``, PiSSA/OLoRA initialisation), or whose clean-up failed, leaves the
base dirty: it is dropped and loaded again from disk for the next job.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from adapters_core.config import AdapterConfig
from adapters_core.model import AdapterModel
from app.base_model import BaseModelSource, resolve_base_model, resolve_device
from app.settings import Settings

logger = logging.getLogger(__name__)


def modifies_base(config: AdapterConfig) -> bool:
    """Whether training this adapter changes base model weights in place."""
    bias = getattr(config, "bias", "none")
    init = getattr(config, "init_lora_weights", True)
    rewrites_init = isinstance(init, str) and (init.startswith("pissa") or init == "olora")
    return bias != "none" or rewrites_init


@dataclass(frozen=True)
class LoadedModel:
    """The resident base model and its tokenizer."""

    source: BaseModelSource
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device


class ModelCache:
    """Loads the configured base model lazily, once, and lends it to one job at a time."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._source: BaseModelSource | None = None
        self._loaded: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def source(self) -> BaseModelSource:
        """Which base model this worker serves (builds the demo model when none is configured)."""
        if self._source is None:
            self._source = resolve_base_model(self._settings)
        return self._source

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    def get(self) -> LoadedModel:
        """The resident model, loading it on first use."""
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def _load(self) -> LoadedModel:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = self.source
        device = resolve_device(self._settings.device)
        # full precision on CPU; on GPU the checkpoint's own dtype (adapters train in fp32 under autocast)
        dtype: Any = torch.float32 if device.type == "cpu" else "auto"
        logger.info("loading base model %s from %s onto %s", source.name, source.path, device)
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
        model.to(device)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        return LoadedModel(source, model, tokenizer, device)

    def drop(self) -> None:
        """Forget the loaded model (the next :meth:`get` loads it again from disk)."""
        self._loaded = None
        _free_memory()

    @contextmanager
    def job_model(self, config: AdapterConfig) -> Iterator[tuple[AdapterModel, Any]]:
        """A fresh ``AdapterModel`` over the base model and the tokenizer, for one job's adapter
        ``config``; the base is restored (or dropped, if it cannot be) when the block exits."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("the base model is already lent to another job in this process")
        try:
            loaded = self.get()
            wrapped = AdapterModel(loaded.model)
            dirty = modifies_base(config)
            try:
                yield wrapped, loaded.tokenizer
            finally:
                if not self._restore(wrapped, loaded.model) or dirty:
                    logger.info("the job changed base model weights: the base model is loaded again for the next job")
                    self.drop()
        finally:
            self._lock.release()

    @staticmethod
    def _restore(wrapped: AdapterModel, base: torch.nn.Module) -> bool:
        """Take every adapter out of ``base`` and undo training-only settings; False if that failed."""
        ok = True
        try:
            wrapped.unload()
            _disable_checkpointing(base)
            base.eval()
            for p in base.parameters():
                p.requires_grad_(False)
                p.grad = None
        except Exception:
            logger.exception("could not restore the base model after the job")
            ok = False
        _reset_accelerate()
        _free_memory()
        return ok


def _disable_checkpointing(base: torch.nn.Module) -> None:
    """Switch activation (gradient) checkpointing off, by the name this transformers version uses."""
    for is_on, disable in (("is_activation_checkpointing", "activation_checkpointing_disable"),
                           ("is_gradient_checkpointing", "gradient_checkpointing_disable")):
        if hasattr(type(base), is_on):
            if getattr(base, is_on):
                getattr(base, disable)()
            return


def _reset_accelerate() -> None:
    """accelerate keeps one process-wide state and refuses a second ``Accelerator`` with another
    ``mixed_precision``; each job builds its own, so the state is cleared between jobs."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
