"""Read and write the HF PEFT on-disk format.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``); keys are ``base_model.model.<module path>.<peft suffix>`` with no adapter name
(e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). ``adapter_model.bin``
(pickle) is refused unless the caller passes ``allow_pickle=True`` for a file they trust.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from adapters_core.config import CONFIG_NAME, AdapterConfig, load_config
from adapters_core.errors import AdapterFormatError, NonFiniteWeightsError, UnsafeCheckpointError
from adapters_core.safetensors_views import tensor_views

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."


def read_adapter_weights(directory: str | Path, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load the adapter tensors of ``directory`` (safetensors preferred), checked to be floating point and
    free of NaN/Inf."""
    d = Path(directory)
    st = d / WEIGHTS_NAME
    if st.exists():
        with st.open("rb") as f:
            tensors = load_weights(read_into_buffer(f), str(st))
        check_floating(tensors, str(st))
        return tensors
    if (d / PICKLE_WEIGHTS_NAME).exists():
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{d / PICKLE_WEIGHTS_NAME} is a pickle file, which can run arbitrary code when loaded; "
                "convert it to adapter_model.safetensors, or pass allow_pickle=True if you trust its source"
            )
        loaded = torch.load(d / PICKLE_WEIGHTS_NAME, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise AdapterFormatError(f"{d / PICKLE_WEIGHTS_NAME} does not hold a flat dict of tensors")
        tensors = dict(loaded)
        check_floating(tensors, str(d / PICKLE_WEIGHTS_NAME))
        check_finite(tensors)
        return tensors
    raise AdapterFormatError(f"no {WEIGHTS_NAME} in {d}")


def read_into_buffer(f: BinaryIO) -> bytearray:
    """The rest of the binary file ``f`` in a writable buffer, read once (what :func:`load_weights` views
    without copying)."""
    try:
        start = f.tell()
        size = os.fstat(f.fileno()).st_size - start
    except (AttributeError, OSError, io.UnsupportedOperation):  # not a file on disk
        return bytearray(f.read())
    buffer = bytearray(size)
    read = f.readinto(buffer)  # type: ignore[attr-defined]
    if read != size or f.read(1):  # the file changed size while it was read: read it whole again
        f.seek(start)
        return bytearray(f.read())
    return buffer


def load_weights(data: bytes | bytearray, source: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``data`` (from ``source``, named in errors), checked for NaN/Inf.

    Reading the bytes and checking them whole is what makes a cold adapter load cheap: one NumPy pass
    over each run of same-dtype tensors in the file (an adapter is one run) instead of one per tensor.
    A ``bytearray`` is not copied: the tensors are views of it (:mod:`adapters_core.safetensors_views`).
    """
    views = tensor_views(data) if isinstance(data, bytearray) else None
    try:
        tensors = views if views is not None else load_safetensors_bytes(bytes(data))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AdapterFormatError(f"{source} is not a valid safetensors file: {exc}") from exc
    if not _proven_finite(data):
        check_finite(tensors)  # exact per tensor, and names the first key holding NaN or Inf
    return {key: tensors[key] for key in sorted(tensors)}  # key order, as safetensors' load_file gives


# safetensors dtype names -> (NumPy dtype to read the bytes as, exponent mask or None: NumPy's isfinite)
_SAFETENSORS_FLOATS: dict[str, tuple[str, int | None]] = {
    "F64": ("<f8", None), "F32": ("<f4", None), "F16": ("<f2", None), "BF16": ("<u2", 0x7F80),
}


def _proven_finite(data: bytes | bytearray) -> bool:
    """Whether every float in the (already validated) safetensors file ``data`` is finite, checked one
    contiguous run of same-dtype tensors at a time; ``False`` also where this cannot tell (a float
    format NumPy does not read, such as 8-bit floats: the caller then checks tensor by tensor)."""
    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + length])
    start = 8 + length
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], entry["dtype"])
                   for key, entry in header.items() if key != "__metadata__")
    runs: list[list[Any]] = []  # [begin, end, dtype]
    for begin, end, dtype in spans:
        if runs and runs[-1][2] == dtype and runs[-1][1] == begin:
            runs[-1][1] = end
        else:
            runs.append([begin, end, dtype])
    for begin, end, dtype in runs:
        kind = _SAFETENSORS_FLOATS.get(dtype)
        if kind is None:
            if dtype.startswith(("F", "BF")):
                return False
            continue  # integers and booleans
        if end == begin:
            continue
        np_dtype, mask = kind
        values = np.frombuffer(data, dtype=np_dtype, count=(end - begin) // np.dtype(np_dtype).itemsize,
                               offset=start + begin)
        if mask is None:
            if not np.isfinite(values).all():
                return False
        elif np.any((values & np.uint16(mask)) == mask):
            return False
    return True


# IEEE formats: a value is NaN or Inf exactly when all its exponent bits are set
_EXPONENT_BITS: dict[torch.dtype, tuple[torch.dtype, int]] = {
    torch.float32: (torch.int32, 0x7F800000),
    torch.float16: (torch.int16, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7F80),
    torch.float64: (torch.int64, 0x7FF0000000000000),
}


def check_floating(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`AdapterFormatError` naming the first key (in key order) whose tensor is not floating
    point: every weight of the methods this engine implements is, and loading would cast integers or
    booleans to floats without a word."""
    for key in sorted(tensors):
        dtype = tensors[key].dtype
        if not dtype.is_floating_point:
            raise AdapterFormatError(f"{source}: tensor {key} has dtype {str(dtype).removeprefix('torch.')}; "
                                     "adapter weights must be floating point (float16, bfloat16, float32 or float64)")


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first key (in key order) holding NaN or Inf.

    The check reads exponent bits with NumPy (single-threaded, exact): a parallel torch reduction on
    a server's request thread would start a second OpenMP team beside the generation engine's, which
    costs the engine half its speed on CPUs (see ``app.serving.engine``).
    """
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.is_floating_point() and tensor.numel() and not _all_finite(tensor):
            raise NonFiniteWeightsError(f"adapter weight {key} contains NaN or Inf values")


def _all_finite(tensor: torch.Tensor) -> bool:
    bits = _EXPONENT_BITS.get(tensor.dtype)
    if tensor.device.type != "cpu":
        return bool(torch.isfinite(tensor).all())
    if bits is None:  # 8-bit and other small floats: float32 holds each of their values, NaN and Inf included
        return bool(np.isfinite(tensor.detach().float().numpy()).all())
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


# initialisations that rewrite the base weights (PEFT's PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA): an adapter saved
# with one, unconverted, only fits the base as its initialisation rewrote it
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def base_rewriting_init(config: dict[str, Any]) -> str | None:
    """``init_lora_weights`` of an ``adapter_config.json`` whose initialisation rewrote the base weights, else None."""
    init = config.get("init_lora_weights")
    return init if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS) else None
