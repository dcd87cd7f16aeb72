"""``ServingHost``: the resident base model of the API process, with its adapter slots, bank and engine.

Built once at start from the settings (the same base model the workers train on), it turns
registry versions into leased adapters (reading their files from the artifact store on a host
miss, checking them against the base model) and prompts into token ids, and owns the generation
engine thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapters_core.config import CONFIG_NAME, config_from_dict
from adapters_core.errors import (
    AdapterError,
    AdapterFormatError,
    ConfigError,
    RankTooLargeError,
    TargetModulesNotFoundError,
    UnknownPeftTypeError,
    UnsupportedModuleError,
)
from adapters_core.peft_format import (
    WEIGHTS_NAME,
    base_rewriting_init,
    check_floating,
    load_weights,
    read_into_buffer,
)
from adapters_core.serving import PreparedAdapter, SlottedModel, cpu_bgmv
from adapters_core.serving.gpu_bgmv import KernelUnavailable
from app.base_model import BaseModelSource, resolve_base_model, resolve_device
from app.serving.bank import AdapterBank, AdapterLease, BankEvents
from app.serving.engine import EngineLimits, EngineMetrics, GenerationEngine
from app.serving.errors import (
    AdapterNotServable,
    IncompatibleBaseModel,
    RankTooLarge,
    RequestTooLarge,
    ServingError,
)
from app.serving.text import check_text
from app.settings import Settings
from app.storage import ArtifactNotFound, LocalArtifactStore

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ServedVersion:
    """What serving needs of a registry version."""

    id: str
    ref: str  # name@N
    config: dict[str, Any]
    files: dict[str, Any]
    base_model: str | None


class ServedVersions:
    """The versions this process has served, by id (a registry version's fields never change once it
    exists, so only the ref's resolution to an id needs the database). Least recently used dropped
    beyond ``capacity``; thread-safe."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._by_id: OrderedDict[str, ServedVersion] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, version_id: str) -> ServedVersion | None:
        with self._lock:
            found = self._by_id.get(version_id)
            if found is not None:
                self._by_id.move_to_end(version_id)
            return found

    def put(self, version: ServedVersion) -> None:
        with self._lock:
            self._by_id[version.id] = version
            self._by_id.move_to_end(version.id)
            while len(self._by_id) > self.capacity:
                self._by_id.popitem(last=False)


@dataclass(frozen=True)
class AdapterFiles:
    """A version's files as read from the store (no torch work done on them yet)."""

    config: dict[str, Any]
    weights: bytearray  # the safetensors file; the tensors read from it are views of this buffer


class ServingHost:
    """Model, tokenizer, slots, bank and engine of one API process."""

    def __init__(self, source: BaseModelSource, model: torch.nn.Module, tokenizer: Any, settings: Settings,
                 metrics: Any = None) -> None:
        self.source = source
        self.model = model
        self.tokenizer = tokenizer
        # on CPUs the compiled kernel reads each row's adapter weights from the slot bank; where it cannot run,
        # per-row adapter buffers (a gather per decode step costs about twice what reading them in place
        # does); GPUs gather fast and have less memory to spare
        on_cpu = next(model.parameters()).device.type == "cpu"
        cpu_bgmv.set_cache_dir(settings.kernel_cache_dir)
        model_dtype = next(model.parameters()).dtype
        if settings.adapter_dtype == "float16" and model_dtype != torch.float32:
            raise ConfigError(
                f"ADAPTERFORGE_ADAPTER_DTYPE=float16 halves the adapter slots of a float32 base model; this one is "
                f"{model_dtype}, whose slots are 16-bit already with auto", field="ADAPTERFORGE_ADAPTER_DTYPE",
            )
        try:
            self.slotted = SlottedModel(model, settings.adapter_slots, max_rank=settings.max_lora_rank,
                                        dtype=torch.float32 if settings.adapter_dtype == "float32" else None,
                                        weight_dtype=torch.float16 if settings.adapter_dtype == "float16" else None,
                                        row_capacity=settings.max_batch_size if on_cpu else 0,
                                        cpu_kernels=settings.cpu_kernels == "auto",
                                        gpu_kernels={"auto": None, "on": True, "off": False}[settings.gpu_kernels])
        except ConfigError as exc:
            if exc.field != "gpu_kernels":
                raise
            raise ConfigError(f"ADAPTERFORGE_GPU_KERNELS=on: {exc}", field="ADAPTERFORGE_GPU_KERNELS") from exc
        logger.info("serving: %d adapter slots, LoRA weights in %s, products in %s", settings.adapter_slots,
                    self.slotted.weight_dtype, self.slotted.dtype)
        if self.slotted.cpu_kernel is not None:
            logger.info("rows on different adapters run the compiled CPU kernel %s", self.slotted.cpu_kernel.path)
        if self.slotted.gpu_kernel is not None:
            self._warm_up_gpu_kernel(required=settings.gpu_kernels == "on")
        events: BankEvents | None = metrics if isinstance(metrics, BankEvents) else None
        self.bank = AdapterBank(self.slotted, host_capacity_bytes=settings.adapter_host_cache_bytes, events=events)
        self.pinned: dict[str, str | None] = {}
        """Each ref of ADAPTERFORGE_PINNED_ADAPTERS and the version it pinned at start (``None``: nothing)."""
        config = getattr(model, "config", None)
        context = getattr(config, "max_position_embeddings", None)
        self.limits = EngineLimits(
            max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
            max_queue_depth=settings.max_queue_depth, max_context=int(context) if context else None,
        )
        engine_metrics: EngineMetrics | None = metrics if isinstance(metrics, EngineMetrics) else None
        self.engine = GenerationEngine(model, tokenizer, self.slotted, self.bank, self.limits,
                                       eos_ids=eos_token_ids(model, tokenizer), metrics=engine_metrics)
        self.versions = ServedVersions()

    def _warm_up_gpu_kernel(self, *, required: bool) -> None:
        """Compile the fused GPU kernel's variants now, before requests can stall on Triton's compiler; where
        it cannot launch, refuse to start if it is ``required``, else log it and serve on torch's operators."""
        started = time.perf_counter()
        try:
            launches = self.slotted.warm_up_gpu_kernel()
        except KernelUnavailable as exc:
            if required:
                raise ConfigError(f"ADAPTERFORGE_GPU_KERNELS=on, but the fused GPU kernel cannot launch here: {exc}",
                                  field="ADAPTERFORGE_GPU_KERNELS") from exc
            logger.warning("the fused GPU kernel cannot launch here (%s); LoRA products use torch's operators", exc)
            return
        logger.info("decode steps with adapters run the fused GPU kernel (Triton): %d warm-up launches compiled "
                    "its variants in %.1f s", launches, time.perf_counter() - started)

    @property
    def lora_kernel(self) -> dict[str, str]:
        """Which code computes the LoRA products of mixed batches (``/readyz`` reports it): ``cpu`` (the
        compiled CPU kernel), ``triton`` (the fused GPU kernel, decode steps) or ``torch``; with the reason
        when a GPU kernel stopped being used."""
        gpu = self.slotted.gpu_kernel
        if gpu is not None and gpu.failure is not None:
            return {"lora_kernel": "torch", "lora_kernel_error": gpu.failure[:300]}
        return {"lora_kernel": "cpu" if self.slotted.cpu_kernel is not None else "triton" if gpu is not None
                else "torch"}

    @classmethod
    def load(cls, settings: Settings, metrics: Any = None) -> ServingHost:
        """Load the configured base model onto the configured device and start the engine, both on the
        engine's own thread (see :meth:`GenerationEngine.run` for why torch work stays on one thread)."""
        outcome: queue.Queue[ServingHost | BaseException] = queue.Queue()

        def engine_thread() -> None:
            try:
                host = cls(*_load_model(settings), settings, metrics)
            except BaseException as exc:
                outcome.put(exc)
                return
            host.engine.run(on_ready=lambda: outcome.put(host))

        threading.Thread(target=engine_thread, name="adapterforge-generation", daemon=True).start()
        result = outcome.get()
        if isinstance(result, BaseException):
            raise result
        return result

    @property
    def name(self) -> str:
        return self.source.name

    def close(self) -> None:
        self.engine.stop()

    # ------------------------------------------------------------------ adapters
    def lease(self, version: ServedVersion, store: LocalArtifactStore) -> AdapterLease:
        """Lease ``version`` for one request: a host-memory hit, or its files read from ``store`` on the
        calling thread (I/O only: running rows never wait for a disk) and then laid out for the slots,
        on the engine thread between two steps on CPUs (see :meth:`GenerationEngine.run`), on the
        calling thread on GPUs. Call it from any thread but the engine's."""

        def load() -> PreparedAdapter:
            files = self.read_files(version, store)
            if self.slotted.device.type == "cpu":
                return self.engine.call(lambda: self.prepare_files(version, files)).result()
            return self.prepare_files(version, files)

        return self.bank.fetch(version.id, version.ref, load)

    def read_files(self, version: ServedVersion, store: LocalArtifactStore) -> AdapterFiles:
        """``version``'s config and weight bytes from the store, after the checks its registry row allows."""
        if version.base_model and version.base_model != self.name:
            raise IncompatibleBaseModel(
                f"adapter {version.ref} was made for base model {version.base_model!r}; this server serves {self.name!r}",
                param="adapter",
            )
        init = base_rewriting_init(version.config)
        if init is not None:
            raise AdapterNotServable(
                f"adapter {version.ref} was initialised with init_lora_weights={init!r}, which rewrites the base "
                "weights it applies to; convert it to a plain LoRA (PEFT's path_initial_model_for_weight_conversion) "
                "and upload that", param="adapter",
            )
        sha = _sha(version, WEIGHTS_NAME)
        try:
            config = _read_config(store, version)
            with store.open(sha) as f:
                weights = read_into_buffer(f)
        except (ArtifactNotFound, FileNotFoundError) as exc:
            raise ServingError(f"the stored files of {version.ref} are missing from the artifact store: {exc}") from exc
        if hashlib.sha256(weights).hexdigest() != sha:  # (about a millisecond per MB, off the engine thread)
            raise ServingError(f"the stored weights of {version.ref} do not match the sha256 recorded when they were "
                               "stored: the artifact store is damaged (upload the adapter again)")
        return AdapterFiles(config, weights)

    def prepare_files(self, version: ServedVersion, files: AdapterFiles) -> PreparedAdapter:
        """Check ``files`` against the base model and lay them out for the slots (torch work); typed errors
        (``RankTooLarge``, ``IncompatibleBaseModel``, ``AdapterNotServable``) otherwise."""
        try:
            tensors = load_weights(files.weights, f"the weights of {version.ref}")
            check_floating(tensors, f"the weights of {version.ref}")  # uploads are checked; older rows may not be
        except AdapterFormatError as exc:  # the bytes stored (their sha256 checked): a file no upload check saw
            raise AdapterNotServable(f"adapter {version.ref} cannot be served: {exc}", param="adapter") from exc
        try:
            return self.slotted.prepare(config_from_dict(files.config), tensors)
        except RankTooLargeError as exc:
            raise RankTooLarge(
                f"adapter {version.ref}: {exc}; raise ADAPTERFORGE_MAX_LORA_RANK to serve it", param="adapter"
            ) from exc
        except UnknownPeftTypeError as exc:
            raise AdapterNotServable(f"adapter {version.ref}: {exc}", param="adapter") from exc
        except (TargetModulesNotFoundError, UnsupportedModuleError, AdapterFormatError) as exc:
            raise IncompatibleBaseModel(
                f"adapter {version.ref} does not fit the base model {self.name!r}: {exc}", param="adapter"
            ) from exc
        except (ConfigError, AdapterError) as exc:
            raise AdapterNotServable(f"adapter {version.ref} cannot be served: {exc}", param="adapter") from exc

    def evict(self, version_ids: Sequence[str]) -> None:
        """Forget versions deleted from the registry (their slots free once their requests finish)."""
        for version_id in version_ids:
            if self.bank.evict(version_id):
                logger.info("serving: evicted adapter version %s", version_id)

    # ------------------------------------------------------------------ prompts
    def encode_prompt(self, prompt: str, param: str = "prompt") -> list[int]:
        check_text(prompt, param)
        ids: list[int] = self.tokenizer(prompt)["input_ids"]
        return ids

    def encode_chat(self, messages: list[dict[str, Any]], param: str = "messages") -> list[int]:
        ids = self._chat_template(messages, param, tokenize=True)
        return [int(i) for i in ids]

    def render_chat(self, messages: list[dict[str, Any]], param: str = "messages") -> str:
        """The text the chat template makes of ``messages`` (assistant turn opened)."""
        text: str = self._chat_template(messages, param, tokenize=False)
        return text

    def _chat_template(self, messages: list[dict[str, Any]], param: str, *, tokenize: bool) -> Any:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestTooLarge(f"the base model {self.name!r} has no chat template: send `prompt` instead", param=param)
        for i, message in enumerate(messages):
            for key in ("content", "name"):
                if isinstance(message.get(key), str):
                    check_text(message[key], f"{param}[{i}].{key}")
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize,
                                                      return_dict=False)
        except Exception as exc:  # a template that raises on these messages (e.g. roles it does not allow)
            raise RequestTooLarge(f"the chat template could not render these messages: {exc}", param=param) from exc

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.tokenizer.decode(list(ids), skip_special_tokens=False)
        return text


def _load_model(settings: Settings) -> tuple[BaseModelSource, torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_base_model(settings)
    device = resolve_device(settings.device)
    dtype: Any = torch.float32 if device.type == "cpu" else "auto"
    logger.info("serving: loading base model %s from %s onto %s", source.name, source.path, device)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return source, model, AutoTokenizer.from_pretrained(source.path)


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id: the generation config's (several, e.g. a chat turn's end) and the tokenizer's."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list | tuple):
            ids.extend(int(v) for v in value)
    return list(dict.fromkeys(ids))


def _sha(version: ServedVersion, filename: str) -> str:
    entry = version.files.get(filename)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise AdapterNotServable(f"adapter {version.ref} has no {filename} in the registry", param="adapter")
    return str(entry["sha256"])


def _read_config(store: LocalArtifactStore, version: ServedVersion) -> dict[str, Any]:
    with store.open(_sha(version, CONFIG_NAME)) as f:
        data = json.loads(f.read())
    if not isinstance(data, dict):
        raise AdapterNotServable(f"adapter {version.ref}: {CONFIG_NAME} is not a JSON object", param="adapter")
    return data
