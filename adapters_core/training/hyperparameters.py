"""Training hyperparameters: the names users know from HF Trainer and hosted fine-tuning services."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from adapters_core.errors import ConfigError

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")


_STEPS = 2**31 - 1  # steps are counted in SQL INTEGER columns
# the largest value of each integer hyperparameter: past these a run cannot be recorded or would not end
_LARGEST = {
    "epochs": 10_000,
    "max_steps": _STEPS,
    "batch_size": 65_536,
    "gradient_accumulation_steps": 65_536,
    "max_seq_len": 1 << 20,
    "eval_steps": _STEPS,
    "save_steps": _STEPS,
    "save_total_limit": _STEPS,
    "early_stopping_patience": _STEPS,
    "seed": 2**32 - 1,  # what NumPy's and torch's generators are seeded with
}
_OPTIONAL = ("max_steps", "eval_steps", "save_steps", "save_total_limit", "early_stopping_patience")


@dataclass
class Hyperparameters:
    """Everything that shapes a training run. Defaults suit a LoRA fine-tune of a small chat model.

    ``max_steps`` (optimizer steps) overrides ``epochs`` when set. ``mixed_precision="auto"`` is
    bf16 on a GPU that supports it, else fp16 on GPU, and fp32 on CPU. ``eval_steps`` /
    ``save_steps`` of ``None`` evaluate / checkpoint once per epoch; only the newest
    ``save_total_limit`` checkpoints are kept (``None`` keeps all; the best adapter is kept apart).
    """

    epochs: int = 3
    max_steps: int | None = None
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    max_seq_len: int = 1024
    packing: bool = True
    train_on_inputs: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    eval_steps: int | None = None
    early_stopping_patience: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = 2
    seed: int = 42

    def __post_init__(self) -> None:
        for name, maximum in _LARGEST.items():
            if getattr(self, name) is not None or name not in _OPTIONAL:
                _check_int(name, getattr(self, name), minimum=0 if name == "seed" else 1, maximum=maximum)
        for name in ("learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if _is_number(value) and not _finite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}", field=name)
        if not _is_number(self.learning_rate) or self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}", field="learning_rate")
        if not _is_number(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}", field="warmup_ratio")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}", field="weight_decay")
        if self.max_grad_norm is not None and (not _is_number(self.max_grad_norm) or self.max_grad_norm <= 0):
            raise ConfigError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm!r}", field="max_grad_norm")
        for name in ("packing", "train_on_inputs", "gradient_checkpointing"):
            if type(getattr(self, name)) is not bool:  # ("false" would be true)
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}", field=name)
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ConfigError(
                f"lr_scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}",
                field="lr_scheduler",
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(
                f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}",
                field="mixed_precision",
            )
        if self.early_stopping_patience is not None and self.eval_steps is None:
            raise ConfigError("early_stopping_patience needs eval_steps", field="early_stopping_patience")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyperparameters:
        """Build from user JSON; unknown names raise :class:`ConfigError` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown hyperparameter(s): {', '.join(unknown)}", field=unknown[0])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer past float's range
        return False


def _check_int(name: str, value: Any, *, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be an integer >= {minimum} and <= {maximum}, got {value!r}", field=name)
