"""AdapterForge's torch PEFT engine: adapters on a resident base model, in HF PEFT's file format.

No web, no SQL, no Celery: usable as a library on its own.
"""

from adapters_core.config import AdapterConfig, config_from_dict, load_config
from adapters_core.errors import (
    AdapterError,
    AdapterExistsError,
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AdapterStateError,
    ConfigError,
    NonFiniteWeightsError,
    RankTooLargeError,
    TargetModulesNotFoundError,
    UnknownPeftTypeError,
    UnsafeCheckpointError,
    UnsupportedModuleError,
)
from adapters_core.methods.lora import LoraConfig
from adapters_core.model import AdapterModel
from adapters_core.state import BASE_ADAPTER

__all__ = [
    "BASE_ADAPTER",
    "AdapterConfig",
    "AdapterError",
    "AdapterExistsError",
    "AdapterFormatError",
    "AdapterMismatchError",
    "AdapterModel",
    "AdapterNotFoundError",
    "AdapterStateError",
    "ConfigError",
    "LoraConfig",
    "NonFiniteWeightsError",
    "RankTooLargeError",
    "TargetModulesNotFoundError",
    "UnknownPeftTypeError",
    "UnsafeCheckpointError",
    "UnsupportedModuleError",
    "config_from_dict",
    "load_config",
]
