"""Config base class shared by every method, and the ``peft_type`` → config class registry.

Field names and defaults follow HF PEFT so that an ``adapter_config.json`` written by PEFT means the
same thing here and one written here loads in PEFT. See ``reference/peft-format.md``.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from adapters_core.config_types import check_field_types
from adapters_core.errors import AdapterFormatError, ConfigError, UnknownPeftTypeError

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
# The HF PEFT release whose on-disk format this engine reads and writes (written as ``peft_version``).
PEFT_FORMAT_VERSION = "0.21.2"

_CONFIG_REGISTRY: dict[str, type[AdapterConfig]] = {}
C = TypeVar("C", bound="AdapterConfig")


def register_config(cls: type[C]) -> type[C]:
    """Class decorator: make ``cls`` the config for its ``PEFT_TYPE``."""
    _CONFIG_REGISTRY[cls.PEFT_TYPE] = cls
    return cls


def known_peft_types() -> list[str]:
    """The ``peft_type`` values this engine implements."""
    return sorted(_CONFIG_REGISTRY)


def config_class(peft_type: str) -> type[AdapterConfig]:
    """The config class of ``peft_type`` (case-insensitive); :class:`UnknownPeftTypeError` if none."""
    cls = _CONFIG_REGISTRY.get(peft_type.upper())
    if cls is None:
        raise UnknownPeftTypeError(
            f"unknown or unsupported peft_type {peft_type!r}; supported: {', '.join(known_peft_types())}",
            field="peft_type",
        )
    return cls


@dataclass
class AdapterConfig:
    """Fields every HF PEFT config carries."""

    PEFT_TYPE: ClassVar[str] = ""

    task_type: str | None = None
    peft_type: str | None = None
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.peft_type, enum.Enum):
            self.peft_type = str(self.peft_type.value)
        if self.peft_type is None:
            self.peft_type = self.PEFT_TYPE
        elif str(self.peft_type).upper() != self.PEFT_TYPE:
            raise ConfigError(
                f"peft_type {self.peft_type!r} does not match {type(self).__name__} ({self.PEFT_TYPE})",
                field="peft_type",
            )
        if isinstance(self.task_type, enum.Enum):
            self.task_type = str(self.task_type.value)
        check_field_types(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with every field (sets become sorted lists), as PEFT writes it."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = _jsonable(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict, dropping keys this class does not know (with a warning), as PEFT does."""
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k != "runtime_config"}
        unknown = sorted(set(data) - names)
        if unknown:
            logger.warning("ignoring unknown %s fields: %s", cls.__name__, ", ".join(unknown))
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, directory: str | Path) -> Path:
        """Write ``adapter_config.json`` (sorted keys, indent 2, ``inference_mode`` true) to ``directory``."""
        d = self.to_dict()
        d["inference_mode"] = True
        d["peft_version"] = PEFT_FORMAT_VERSION
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(d, indent=2, sort_keys=True))
        return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Dispatch on ``peft_type`` to the right config class."""
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise UnknownPeftTypeError("adapter config has no peft_type", field="peft_type")
    return config_class(peft_type).from_dict(data)


def load_config(directory: str | Path) -> AdapterConfig:
    """Read ``adapter_config.json`` from ``directory``."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise AdapterFormatError(f"{path} not found: not a PEFT adapter directory") from exc
    except (ValueError, RecursionError) as exc:  # not UTF-8 or JSON, an integer too long, nested too deeply
        raise AdapterFormatError(f"{path} is not valid JSON: {exc or 'nested too deeply'}") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object")
    return config_from_dict(data)


__all__ = [
    "CONFIG_NAME",
    "PEFT_FORMAT_VERSION",
    "AdapterConfig",
    "config_class",
    "config_from_dict",
    "known_peft_types",
    "load_config",
    "register_config",
]
