"""Typed errors raised by the engine.

Every error the engine raises on purpose derives from :class:`AdapterError`, so the service can map
them to clear 4xx answers without parsing messages::

    AdapterError
    ├── ConfigError                 a config field is invalid or unsupported (names the field)
    │   └── UnknownPeftTypeError    ``peft_type`` is not one this engine knows
    ├── TargetModulesNotFoundError  target_modules matched no module of the base model
    ├── UnsupportedModuleError      a matched module has a type the method cannot wrap
    ├── AdapterNotFoundError        no adapter of that name is loaded
    ├── AdapterExistsError          an adapter of that name is already loaded
    ├── AdapterFormatError          the files on disk are not a readable PEFT adapter
    │   ├── UnsafeCheckpointError   pickle weights refused (``allow_pickle=False``)
    │   └── AdapterMismatchError    keys or shapes do not fit this base model
    ├── NonFiniteWeightsError       NaN/Inf in adapter weights or in a merge result
    ├── TrainingDiverged            the training loss stopped being finite
    ├── RankTooLargeError           an adapter's rank exceeds what the serving slots hold
    └── AdapterStateError           the call does not fit the model's state (e.g. adapters merged)
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base class of every error the engine raises deliberately."""


class ConfigError(AdapterError, ValueError):
    """A config field is invalid or not supported; ``field`` names it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownPeftTypeError(ConfigError):
    """The ``peft_type`` of a config is not one this engine implements."""


class TargetModulesNotFoundError(AdapterError, ValueError):
    """``target_modules`` (after exclusions and layer filters) matched no module."""


class UnsupportedModuleError(AdapterError, TypeError):
    """A module matched by ``target_modules`` has a type the method cannot wrap."""


class AdapterNotFoundError(AdapterError, KeyError):
    """No adapter with this name is loaded on the model."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(AdapterError, ValueError):
    """An adapter with this name is already loaded."""


class AdapterFormatError(AdapterError, ValueError):
    """Files on disk are not a readable HF PEFT adapter."""


class UnsafeCheckpointError(AdapterFormatError):
    """Pickle-based weights (``adapter_model.bin``) refused unless the caller trusts them."""


class AdapterMismatchError(AdapterFormatError):
    """The adapter's keys or tensor shapes do not fit this base model."""


class NonFiniteWeightsError(AdapterError, ValueError):
    """NaN or Inf found in adapter weights, or produced by a merge."""


class TrainingDiverged(AdapterError, ArithmeticError):
    """The training loss became NaN or Inf: the run can no longer learn anything."""


class AdapterStateError(AdapterError, RuntimeError):
    """The requested operation does not fit the current state (e.g. adapters are merged)."""


class RankTooLargeError(AdapterError, ValueError):
    """An adapter's LoRA rank is above the largest rank the serving slot banks accept."""

    def __init__(self, message: str, *, rank: int, limit: int) -> None:
        super().__init__(message)
        self.rank = rank
        self.limit = limit
