"""Service settings: one class, environment prefix ``ADAPTERFORGE_``.

With nothing set, everything lives under ``DATA_DIR`` (default ``~/.adapterforge``): SQLite
database, Celery filesystem broker, artifact store, and the tiny demo base model built on first
start. Production sets ``DATABASE_URL`` (``postgresql+psycopg://...``) and ``BROKER_URL``
(``redis://...``).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_DB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2")
_BROKER_SCHEMES = ("redis", "rediss", "filesystem", "amqp", "memory")
ENV_PREFIX = "ADAPTERFORGE_"
# variables of this prefix that are not settings: set by `adapterforge up` for its worker; read by tests, benchmarks
NOT_SETTINGS = frozenset({"ADAPTERFORGE_SUPERVISOR_PID", "ADAPTERFORGE_TEST_POSTGRES", "ADAPTERFORGE_BENCH_REDIS"})


class Settings(BaseSettings):
    """Every knob of the service; see each field's description."""

    # (hide_input_in_errors: a refused URL or key would otherwise be printed whole, password included)
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", hide_input_in_errors=True)

    data_dir: Path = Field(
        default_factory=lambda: Path.home() / ".adapterforge",
        description="Root of the embedded defaults: database, broker queue, artifact store, demo model.",
    )
    base_model: str | None = Field(
        default=None,
        description="HF model id or local path of the resident base model; unset = the locally built demo model.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset = SQLite file in DATA_DIR."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker URL; unset = Celery's filesystem broker in DATA_DIR."
    )
    device: str = Field(default="auto", description="torch device for the base model: auto, cpu, cuda, cuda:N.")
    host: str = Field(default="127.0.0.1", description="Address `adapterforge up` binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `adapterforge up` binds.")
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted bearer tokens; empty = no authentication (local use)."
    )
    max_upload_bytes: int = Field(default=2 * 1024**3, gt=0, description="Largest dataset/adapter upload.")
    max_request_bytes: int = Field(
        default=32 * 1024**2, gt=0, description="Largest request body of every other route (JSON: prompts, job specs); "
        "413 past it, before the body is read whole. Raise it with max_batch_tokens for batches of long prompts.",
    )
    serving_enabled: bool = Field(
        default=True, description="Load the base model in the API process and serve /generate and /v1; false for "
        "API replicas that only manage datasets, jobs and the registry.",
    )
    max_batch_tokens: int = Field(
        default=8192, gt=0, description="Token budget of the running batch, which bounds its key/value cache: the "
        "rows times the longest reservation (prompt + max_new_tokens) among them stay within it."
    )
    max_batch_size: int = Field(default=64, gt=0, description="Most requests decoded together in one step.")
    max_queue_depth: int = Field(default=256, gt=0, description="Generations (prompts x n) waiting before 429; "
                                 "one request that makes more answers 422.")
    adapter_slots: int = Field(default=64, gt=0, description="Adapters resident on the device at once.")
    max_lora_rank: int = Field(default=64, gt=0, description="Largest LoRA rank the serving slots accept.")
    adapter_dtype: Literal["auto", "float32", "float16"] = Field(
        default="auto", description="Precision of the serving slots' adapter weights and LoRA products. auto: the "
        "base model's dtype; float32: as HF PEFT keeps them on a bfloat16/float16 base (adapter weights and LoRA "
        "products in float32, each layer's output rounded to the model's dtype), at twice the slot memory; "
        "float16 (float32 base models, e.g. on CPUs): LoRA A and B stored in float16, products still in float32: "
        "half the slot and host-cache memory and half the adapter bytes a decode step reads, at float16's rounding "
        "of the weights (log-probabilities within about 1e-3 of HF PEFT's float32 ones, not 1e-4).",
    )
    cpu_kernels: Literal["auto", "off"] = Field(
        default="auto", description="auto: decode steps and prefills with adapters on a CPU (float32, x86-64 "
        "with AVX2, FMA and F16C) run the compiled LoRA kernel, built on first start with the host's C++ compiler, "
        "which reads each row's adapter weights from the slots; off (or no compiler): torch's bmm, with per-row "
        "copies of the running rows' adapter weights.",
    )
    gpu_kernels: Literal["auto", "on", "off"] = Field(
        default="auto", description="auto: decode steps with adapters on a CUDA device run the fused LoRA "
        "kernel (Triton, shipped with CUDA builds of torch), one launch per layer, and prefills of rows on "
        "different adapters two; off (or no Triton): torch's operators (six or more per layer when rows use "
        "different adapters); on: the kernel is required, and the "
        "server refuses to start where it cannot run (no CUDA device, no Triton, a Triton that cannot compile it "
        "for this GPU, or float32 adapter products on a 16-bit model); every variant is compiled at start.",
    )
    kernel_cache_dir: Path | None = Field(
        default=None, description="Where the compiled CPU kernel is kept; unset = $XDG_CACHE_HOME/adapterforge/kernels "
        "(~/.cache/adapterforge/kernels).",
    )
    adapter_host_cache_bytes: int = Field(
        default=4 * 1024**3, gt=0, description="Host memory for adapters read from the store and laid out for the "
        "slots, whether or not they are in a slot too (least recently used first out; adapters in use or pinned "
        "stay). Page-locked where CUDA is present, counted as the pinned allocator holds it (each block rounded up "
        "to a power of two)."
    )
    pinned_adapters: list[str] = Field(
        default_factory=list, description="Adapter refs (`name`, `name@3`, `name@prod`) loaded at start and never "
        "evicted (the version each names at start; one that names nothing then is logged and skipped). Fewer than "
        "adapter_slots: at least one slot stays for the other adapters.",
    )
    job_lease_seconds: float = Field(
        default=60.0, gt=0, description="How long a worker's claim on a job lasts without a heartbeat (it renews every third)."
    )
    job_max_attempts: int = Field(default=3, ge=1, description="Tries of one job (worker deaths included) before it fails.")
    requeue_after_seconds: float = Field(
        default=300.0, gt=0, description="A job still queued this long after its last enqueue is enqueued again."
    )
    reconcile_interval_seconds: float = Field(
        default=15.0, ge=0, description="How often the API looks for lost or orphaned jobs; 0 disables the reconciler."
    )
    visibility_timeout_seconds: int = Field(
        default=3600, gt=0, description="Redis broker: an unacknowledged message is redelivered after this long."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme == "postgres":  # a common spelling SQLAlchemy 2 refuses
            return "postgresql+psycopg://" + value.split("://", 1)[1]
        if scheme not in _DB_SCHEMES:
            raise ValueError(f"unsupported database URL scheme {scheme!r}; use sqlite:// or postgresql+psycopg://")
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_api_keys(cls, value: list[str]) -> list[str]:
        for i, key in enumerate(value):
            if not key.strip():  # e.g. '["${API_KEY}"]' with the variable unset: it would let a bare `Bearer` in
                raise ValueError(f"api key {i} is empty")
            if key != key.strip():
                raise ValueError(f"api key {i} starts or ends with whitespace")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value  # `debug` is DEBUG, as in logging

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in _BROKER_SCHEMES:
            raise ValueError(f"unsupported broker URL scheme {scheme!r}; use redis:// (or filesystem://)")
        return value

    @model_validator(mode="after")
    def _expand(self) -> Settings:
        self.data_dir = self.data_dir.expanduser()
        pinned = len(set(self.pinned_adapters))
        if pinned >= self.adapter_slots:
            raise ValueError(f"pinned_adapters names {pinned} adapters for {self.adapter_slots} adapter slots: pin "
                             "fewer than adapter_slots, so that a slot stays for every other adapter")
        return self

    @model_validator(mode="after")
    def _refuse_unknown_variables(self) -> Settings:
        """A misspelt variable (``ADAPTERFORGE_API_KEY``) would otherwise be ignored without a word: refused."""
        fields = {name.upper() for name in type(self).model_fields}
        for variable in sorted(os.environ):
            if not variable.upper().startswith(ENV_PREFIX) or variable.upper() in NOT_SETTINGS:
                continue
            name = variable[len(ENV_PREFIX):].upper()
            if name not in fields:
                close = difflib.get_close_matches(name, sorted(fields), n=1)
                hint = f" (did you mean {ENV_PREFIX}{close[0]}?)" if close else ""
                raise ValueError(f"the environment variable {variable} is not a setting{hint}")
        return self

    @property
    def resolved_database_url(self) -> str:
        """The database URL, defaulting to SQLite in ``data_dir``."""
        return self.database_url or f"sqlite:///{self.data_dir / 'adapterforge.db'}"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.broker_url is None or self.broker_url.startswith("filesystem")

    @property
    def broker_dir(self) -> Path:
        """Queue folder of the embedded filesystem broker."""
        return self.data_dir / "broker"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def demo_model_dir(self) -> Path:
        return self.data_dir / "demo-model"
