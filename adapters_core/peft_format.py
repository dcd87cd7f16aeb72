"""Read and write the HF PEFT on-disk format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``); keys are ``base_model.model.<module path>.<peft suffix>`` with no adapter name
(e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). ``adapter_model.bin``
(pickle) is refused unless the caller passes ``allow_pickle=True`` for a file they trust.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from adapters_core.config import CONFIG_NAME, AdapterConfig, load_config
from adapters_core.errors import AdapterFormatError, NonFiniteWeightsError, UnsafeCheckpointError

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def read_adapter_weights(directory: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load the adapter tensors of ``directory`` (safetensors preferred), checked for NaN/Inf."""
    d = Path(directory)
    st = d / WEIGHTS_NAME
    if st.exists():
        try:
            tensors = load_file(st)
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise AdapterFormatError(f"{st} is not a valid safetensors file: {exc}") from exc
    elif (d / PICKLE_WEIGHTS_NAME).exists():
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{d / PICKLE_WEIGHTS_NAME} is a pickle file, which can run arbitrary code when loaded; "
                "convert it to adapter_model.safetensors, or pass allow_pickle=True if you trust its source"
            )
        loaded = torch.load(d / PICKLE_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise AdapterFormatError(f"{d / PICKLE_WEIGHTS_NAME} does not hold a flat dict of tensors")
        tensors = dict(loaded)
    else:
        raise AdapterFormatError(f"no {WEIGHTS_NAME} in {d}")
    check_finite(tensors)
    return tensors


# IEEE formats: a value is NaN or Inf exactly when all its exponent bits are set
_EXPONENT_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first key holding NaN or Inf.

    The check reads exponent bits with NumPy (single-threaded, exact): a parallel torch reduction on
    a server's request thread would start a second OpenMP team beside the generation engine's, which
    costs the engine half its speed on CPUs (see ``app.serving.engine``).
    """
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not _all_finite(tensor):
            raise NonFiniteWeightsError(f"adapter weight {key} contains NaN or Inf values")


def _all_finite(tensor: torch.Tensor) -> bool:
    bits = _EXPONENT_BITS.get(tensor.dtype)
    if bits is None or tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    if tensor.dtype != torch.bfloat16:  # NumPy knows the format itself
        return bool(np.isfinite(tensor.detach().numpy()).all())
    int_dtype, mask = bits
    ints = tensor.detach().contiguous().view(int_dtype).numpy()
    exponent = np.asarray(mask).astype(ints.dtype)
    return not bool(np.any((ints & exponent) == exponent))


def read_adapter(directory: str | Path, *, allow_pickle: bool = False) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of the PEFT adapter in ``directory``."""
    config = load_config(directory)
    return config, read_adapter_weights(directory, allow_pickle=allow_pickle)


def write_adapter(
    directory: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor], *, readme: bool = True
) -> Path:
    """Write ``adapter_config.json``, ``adapter_model.safetensors`` and (``readme``) a short README."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared storage; clone so every key owns its bytes (as PEFT does)
    owned = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(owned, str(d / WEIGHTS_NAME), metadata={"format": "pt"})
    config.save(d)
    readme_path = d / "README.md"
    if readme and not readme_path.exists():
        readme_path.write_text(
            f"# {config.peft_type} adapter\n\nHF PEFT format (`{CONFIG_NAME}` + `{WEIGHTS_NAME}`), written by the "
            f"AdapterForge engine.\nBase model: `{config.base_model_name_or_path}`.\n"
        )
    return d

