"""Request bodies of ``POST /jobs`` and their validation into the spec a worker runs.

Everything a job needs is checked here, before anything is stored, and every failure is a 422 whose
``param`` names the field (``adapter.config.r``, ``hyperparameters.learning_rate``, ``dataset_id``,
``merge.sources[1].adapter``). The spec stored on the job row is normalised, so a worker never
re-validates and a job means the same thing however long it waits:

train::

    {"type": "train",
     "adapter": {"name": str, "method": "lora", "config": {every field of the config class, peft_type set}},
     "dataset_id": str, "validation_dataset_id": str | None,
     "hyperparameters": {every field of adapters_core Hyperparameters}}

merge (sources resolved to version ids at submit time, so the lineage is fixed then)::

    {"type": "merge",
     "adapter": {"name": str, "method": "lora"},
     "merge": {"sources": [{"adapter": "a@prod", "version_id": "av_...", "name": "a", "version": 3,
                            "weight": 0.7}, ...],
               "combination_type": str, "density": float | None, "majority_sign_method": str | None,
               "svd_rank": int | None, "svd_clamp": float | None, "svd_full_matrices": bool | None,
               "svd_driver": str | None}}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from adapters_core.config import AdapterConfig, config_class, known_peft_types
from adapters_core.config_types import holds_non_finite
from adapters_core.errors import (
    AdapterError,
    ConfigError,
    TargetModulesNotFoundError,
    UnknownPeftTypeError,
    UnsupportedModuleError,
)
from adapters_core.methods.lora.convert import rewrites_base
from adapters_core.training.hyperparameters import Hyperparameters
from app.api.errors import ApiError
from app.base_model import BaseModelHost
from app.registry.adapters import RegistryError, check_new_name, resolve_ref
from app.registry.datasets import DatasetNotFound, dataset_for_job
from app.registry.models import Adapter, AdapterVersion

CombinationType = Literal[
    "linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
    "magnitude_prune", "magnitude_prune_svd",
]
COMBINATION_TYPES: tuple[str, ...] = typing.get_args(CombinationType)
# As in HF PEFT's add_weighted_adapter: which merges prune (density), elect signs, factorise by SVD,
# and which need every source at the same rank.
_USES_DENSITY = {"ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd"}
_USES_SIGN = {"ties", "ties_svd", "dare_ties", "dare_ties_svd"}
_USES_SVD = {name for name in COMBINATION_TYPES if name.endswith("svd")}
_SAME_RANK = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}

_HYPERPARAMETER_DOCS = {
    "epochs": "Passes over the training data (ignored when max_steps is set).",
    "max_steps": "Optimizer steps to run; overrides epochs when set.",
    "learning_rate": "Peak learning rate (> 0).",
    "lr_scheduler": "Learning-rate schedule: linear, cosine, cosine_with_restarts, polynomial, constant, "
                    "constant_with_warmup, inverse_sqrt.",
    "warmup_ratio": "Fraction of the steps spent warming the learning rate up, in [0, 1).",
    "weight_decay": "AdamW weight decay (>= 0).",
    "batch_size": "Examples (or packed sequences) per device per micro-batch.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "max_grad_norm": "Gradient clipping norm; null disables clipping.",
    "max_seq_len": "Longest sequence in tokens; longer examples are truncated.",
    "packing": "Pack several examples into each sequence instead of padding.",
    "train_on_inputs": "Also compute the loss on prompts and user turns, not only on completions.",
    "gradient_checkpointing": "Trade compute for memory by recomputing activations.",
    "mixed_precision": "auto, no, bf16 or fp16 (auto: bf16 where supported, else fp16 on GPU, fp32 on CPU).",
    "eval_steps": "Evaluate on the validation dataset every this many steps; null = once per epoch. Needs "
                  "`validation_dataset_id`.",
    "early_stopping_patience": "Stop after this many evaluations without improvement (needs eval_steps).",
    "save_steps": "Checkpoint every this many steps; null = once per epoch.",
    "seed": "Random seed (>= 0).",
}

_STRICT = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------------------------------ request models


def _hyperparameters_schema() -> dict[str, Any]:
    """OpenAPI view of the hyperparameters object, generated from the engine's dataclass."""
    hints = typing.get_type_hints(Hyperparameters)
    props: dict[str, Any] = {}
    for f in dataclasses.fields(Hyperparameters):
        schema = TypeAdapter(hints[f.name]).json_schema()
        schema.update(default=f.default, description=_HYPERPARAMETER_DOCS.get(f.name, f.name.replace("_", " ")))
        props[f.name] = schema
    return {"properties": props, "additionalProperties": False}


class TrainAdapterIn(BaseModel):
    """The adapter a train job creates (a new version of ``name``)."""

    model_config = _STRICT

    name: str = Field(description="Adapter name; the trained adapter becomes its next version.",
                      examples=["support-bot"])
    method: str = Field(default="lora", description="PEFT method (today: lora).")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="The method's config in HF PEFT field names (e.g. r, lora_alpha, target_modules, "
                    "lora_dropout, use_rslora, use_dora, rank_pattern). Unknown fields are refused; "
                    "target_modules must exist on the server's base model (unset: the architecture's defaults).",
        examples=[{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}],
    )


class TrainJobIn(BaseModel):
    """Fine-tune a new adapter version on an uploaded dataset."""

    model_config = _STRICT

    type: Literal["train"] = Field(description="Job type.")
    adapter: TrainAdapterIn = Field(description="Name, method and config of the adapter to train.")
    dataset_id: str = Field(description="Training data: the id of an uploaded dataset.")
    validation_dataset_id: str | None = Field(
        default=None, description="Optional evaluation data: the id of another uploaded dataset.")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict,
        description="Training hyperparameters; omitted ones take their defaults (shown on the job).",
        json_schema_extra=_hyperparameters_schema(),
    )


class MergeSourceIn(BaseModel):
    """One adapter version going into a merge."""

    model_config = _STRICT

    adapter: str = Field(description="Reference: name (latest version), name@3 (a version) or name@alias.",
                         examples=["support-bot@2"])
    weight: float = Field(default=1.0, allow_inf_nan=False, description="Weight of this source (finite; may be negative).")


class MergeParamsIn(BaseModel):
    """How the sources are combined (HF PEFT ``add_weighted_adapter`` semantics and names)."""

    model_config = _STRICT

    sources: list[MergeSourceIn] = Field(min_length=1, description="Adapters to combine, all of the same method.")
    combination_type: CombinationType = Field(
        description="linear and cat need nothing more; ties*, dare_* and magnitude_prune* need density; "
                    "*_svd variants re-factorise the combined delta to svd_rank. linear, ties, dare_linear, "
                    "dare_ties and magnitude_prune need sources of equal rank; all but linear need >= 2 sources.")
    density: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False,
                                  description="Fraction of values kept when pruning, in (0, 1]; only for pruning merges.")
    majority_sign_method: Literal["total", "frequency"] | None = Field(
        default=None, description="Sign election of ties / dare_ties (and _svd): total (default) or frequency.")
    svd_rank: int | None = Field(default=None, ge=1, description="Rank of the result of *_svd merges (default: largest source rank).")
    svd_clamp: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False,
                                    description="*_svd merges: quantile at which to clamp the factors (default: no clamp).")
    svd_full_matrices: bool | None = Field(default=None, description="*_svd merges: full (default) or reduced SVD.")
    svd_driver: Literal["gesvd", "gesvdj", "gesvda"] | None = Field(
        default=None, description="*_svd merges on CUDA: the cuSOLVER driver (default: torch's choice).")


class MergeAdapterIn(BaseModel):
    """The adapter a merge job creates."""

    model_config = _STRICT

    name: str = Field(description="Adapter name; the merged adapter becomes its next version.")


class MergeJobIn(BaseModel):
    """Combine existing adapter versions into a new one."""

    model_config = _STRICT

    type: Literal["merge"] = Field(description="Job type.")
    adapter: MergeAdapterIn = Field(description="Name of the adapter to create.")
    merge: MergeParamsIn = Field(description="Sources and combination.")


JobIn = Annotated[TrainJobIn | MergeJobIn, Field(discriminator="type")]
JOB_TYPES = ("train", "merge")


# ------------------------------------------------------------------------------------------ validation


@dataclass(frozen=True)
class JobPlan:
    """A validated job, ready for :func:`app.registry.jobs.create_job`."""

    type: str
    adapter_name: str
    spec: dict[str, Any]
    dataset_id: str | None = None
    validation_dataset_id: str | None = None


def plan_job(session: Session, host: BaseModelHost, body: TrainJobIn | MergeJobIn) -> JobPlan:
    """Validate ``body`` against the registry and the base model; :class:`ApiError` (422) if it does not fit."""
    if isinstance(body, TrainJobIn):
        return _plan_train(session, host, body)
    return _plan_merge(session, body)


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(422, message, param=param)


def _check_adapter_name(name: str) -> None:
    try:
        check_new_name(name)
    except RegistryError as exc:
        raise _invalid(str(exc), "adapter.name") from exc


def _check_method_fits(session: Session, name: str, method: str) -> None:
    """409 when ``name`` already holds live versions of another method (an adapter keeps one method)."""
    adapter = session.execute(
        select(Adapter).where(Adapter.name == name, Adapter.deleted_at.is_(None))
    ).scalar_one_or_none()
    if adapter is None or adapter.method == method:
        return
    live = session.execute(select(AdapterVersion.id).where(
        AdapterVersion.adapter_id == adapter.id, AdapterVersion.deleted_at.is_(None)).limit(1)).first()
    if live is not None:
        raise ApiError(409, f"adapter {name!r} holds {adapter.method} versions; a {method} job needs another name "
                       f"(or delete {name!r} first)", param="adapter.name")


def _plan_train(session: Session, host: BaseModelHost, body: TrainJobIn) -> JobPlan:
    _check_adapter_name(body.adapter.name)
    method = body.adapter.method.lower()
    cls = _config_class(method)
    _check_method_fits(session, body.adapter.name, method)
    _check_fields(cls, body.adapter.config, "adapter.config", f"{method} config")
    try:
        config = cls(**{"peft_type": cls.PEFT_TYPE, **body.adapter.config})
    except ConfigError as exc:
        raise _invalid(str(exc), _field_param("adapter.config", exc.field)) from exc
    except (TypeError, ValueError) as exc:
        raise _invalid(f"invalid {method} config: {exc}", "adapter.config") from exc
    if rewrites_base(config) and getattr(config, "use_dora", False):  # registered as plain LoRA: see runner
        raise _invalid(f"init_lora_weights={config.init_lora_weights!r} rewrites the base weights, and a DoRA "  # type: ignore[attr-defined]
                       "adapter trained so has no conversion to the real base model: drop use_dora or the init",
                       "adapter.config.init_lora_weights")
    try:
        host.check_config(config)
    except (TargetModulesNotFoundError, UnsupportedModuleError) as exc:
        raise _invalid(str(exc), "adapter.config.target_modules") from exc
    except ConfigError as exc:
        raise _invalid(str(exc), _field_param("adapter.config", exc.field)) from exc
    except AdapterError as exc:
        raise _invalid(str(exc), "adapter.config") from exc

    _check_fields(Hyperparameters, body.hyperparameters, "hyperparameters", "hyperparameter")
    try:
        hyperparameters = Hyperparameters.from_dict(body.hyperparameters)
    except ConfigError as exc:
        raise _invalid(str(exc), _field_param("hyperparameters", exc.field)) from exc

    if body.validation_dataset_id is None:  # evaluation settings would be ignored without a set to evaluate on
        for name in ("eval_steps", "early_stopping_patience"):
            if body.hyperparameters.get(name) is not None:
                raise _invalid(f"{name} needs validation_dataset_id: there is nothing to evaluate on",
                               f"hyperparameters.{name}")
    for param, dataset_id in (("dataset_id", body.dataset_id), ("validation_dataset_id", body.validation_dataset_id)):
        if dataset_id is None:
            continue
        try:
            dataset_for_job(session, dataset_id)  # (share-locked: a concurrent delete waits, then sees the job)
        except DatasetNotFound as exc:
            raise _invalid(f"{exc}: upload it with POST /datasets first", param) from exc

    spec = {
        "type": "train",
        "adapter": {"name": body.adapter.name, "method": method, "config": config.to_dict()},
        "dataset_id": body.dataset_id,
        "validation_dataset_id": body.validation_dataset_id,
        "hyperparameters": hyperparameters.to_dict(),
    }
    return JobPlan("train", body.adapter.name, spec, body.dataset_id, body.validation_dataset_id)


def _plan_merge(session: Session, body: MergeJobIn) -> JobPlan:
    _check_adapter_name(body.adapter.name)
    merge = body.merge
    kind = merge.combination_type
    if kind != "linear" and len(merge.sources) < 2:
        raise _invalid(f"combination_type {kind} needs at least 2 sources; one adapter can only be merged "
                       "linearly (which rescales it by its weight)", "merge.sources")
    if kind in _USES_DENSITY and merge.density is None:
        raise _invalid(f"combination_type {kind} needs density, the fraction of values kept, in (0, 1]", "merge.density")
    unused = [name for name, used in (
        ("density", kind in _USES_DENSITY),
        ("majority_sign_method", kind in _USES_SIGN),
        ("svd_rank", kind in _USES_SVD),
        ("svd_clamp", kind in _USES_SVD),
        ("svd_full_matrices", kind in _USES_SVD),
        ("svd_driver", kind in _USES_SVD),
    ) if not used and getattr(merge, name) is not None]
    if unused:
        raise _invalid(f"{unused[0]} does not apply to combination_type {kind}", f"merge.{unused[0]}")

    versions: list[AdapterVersion] = []
    for i, source in enumerate(merge.sources):
        try:
            versions.append(resolve_ref(session, source.adapter))
        except RegistryError as exc:
            raise _invalid(str(exc), f"merge.sources[{i}].adapter") from exc
    methods = {v.method.lower() for v in versions}
    if len(methods) > 1:
        raise _invalid(f"all sources must use the same method, got {', '.join(sorted(methods))}", "merge.sources")
    if kind in _SAME_RANK:
        ranks = [v.config.get("r") for v in versions]
        if len(set(ranks)) > 1:
            raise _invalid(f"combination_type {kind} needs sources of equal rank r, got {', '.join(map(str, ranks))}; "
                           "use cat or an _svd variant to combine different ranks", "merge.sources")
    if len({isinstance(v.config.get("target_modules"), str) for v in versions}) > 1:
        raise _invalid("sources mix target_modules given as a regex string and as a list; merging needs one kind",
                       "merge.sources")

    sources = [
        {"adapter": s.adapter, "version_id": v.id, "name": s.adapter.partition("@")[0], "version": v.version,
         "weight": s.weight}
        for s, v in zip(merge.sources, versions, strict=True)
    ]
    spec = {
        "type": "merge",
        "adapter": {"name": body.adapter.name, "method": methods.pop()},
        "merge": {
            "sources": sources,
            "combination_type": kind,
            "density": merge.density,
            "majority_sign_method": (merge.majority_sign_method or "total") if kind in _USES_SIGN else None,
            "svd_rank": merge.svd_rank,
            "svd_clamp": merge.svd_clamp,
            "svd_full_matrices": (True if merge.svd_full_matrices is None else merge.svd_full_matrices)
            if kind in _USES_SVD else None,
            "svd_driver": merge.svd_driver,
        },
    }
    return JobPlan("merge", body.adapter.name, spec)


def _config_class(method: str) -> type[AdapterConfig]:
    try:
        return config_class(method)
    except UnknownPeftTypeError as exc:
        supported = ", ".join(t.lower() for t in known_peft_types())
        raise _invalid(f"unknown or unsupported method {method!r}; this server supports: {supported}",
                       "adapter.method") from exc


def _field_param(prefix: str, field: str | None) -> str:
    return f"{prefix}.{field}" if field else prefix


@functools.cache
def _field_validators(cls: type) -> dict[str, tuple[str, TypeAdapter[Any]]]:
    """Per dataclass field of ``cls``: its type's readable name and a validator for it."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[str, TypeAdapter[Any]]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        name = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        name = name.replace(" | None", " or null").replace(" | ", " or ")
        out[f.name] = (name, TypeAdapter(hint))
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _check_fields(cls: type, data: dict[str, Any], prefix: str, what: str) -> None:
    """Refuse keys that are not fields of dataclass ``cls`` and values not of the field's JSON type."""
    validators = _field_validators(cls)
    unknown = sorted(set(data) - set(validators))
    if unknown:
        raise _invalid(f"unknown {what} field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                       f"{prefix}.{unknown[0]}")
    for key, value in data.items():
        type_name, validator = validators[key]
        if holds_non_finite(value):
            raise _invalid(f"{key} must be finite (no NaN or Infinity)", f"{prefix}.{key}")
        try:
            validator.validate_json(json.dumps(value), strict=True)
        except ValidationError as exc:
            raise _invalid(f"{key} must be {type_name}, got {_json_type(value)} {json.dumps(value)[:60]}",
                           f"{prefix}.{key}") from exc
