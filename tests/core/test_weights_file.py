"""Reading an adapter's safetensors bytes (``adapters_core.peft_format.load_weights``): every float
format is checked for NaN/Inf, the error names the first bad key, and bit patterns that only look
like NaN in an integer tensor are not refused. Each case runs on ``bytes`` (copied out by safetensors)
and on a ``bytearray`` (viewed in place, :mod:`adapters_core.safetensors_views`)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from adapters_core.errors import AdapterFormatError, NonFiniteWeightsError
from adapters_core.peft_format import load_weights

BUFFERS = pytest.mark.parametrize("buffer", [bytes, bytearray])


def mixed() -> dict[str, torch.Tensor]:
    """Runs of several dtypes, interleaved (safetensors lays tensors out in key order)."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(8, 4, generator=g),
        "b.bf16": torch.randn(4, 8, generator=g).bfloat16(),
        "c.f32": torch.randn(3, generator=g),
        "d.f16": torch.randn(5, 2, generator=g).half(),
        "e.f64": torch.randn(2, 2, generator=g).double(),
        "f.i32": torch.tensor([0x7FC00000, 0x7F800000, -1], dtype=torch.int32),  # NaN and Inf bit patterns
        "g.i64": torch.arange(6),
        "h.f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn),
        "i.empty": torch.zeros(0),
    }


@BUFFERS
def test_a_clean_file_loads_exactly(buffer: type) -> None:
    tensors = mixed()
    loaded = load_weights(buffer(save(tensors)), "clean")
    assert list(loaded) == sorted(tensors)
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key].view(torch.uint8),
                                                                 tensor.view(torch.uint8)), key


FLOATS = ["a.f32", "b.bf16", "c.f32", "d.f16", "e.f64"]
CASES = [(key, bad) for key in FLOATS for bad in ("nan", "inf", "-inf")] + [("h.f8", "nan")]  # e4m3fn: no Inf


@BUFFERS
@pytest.mark.parametrize(("key", "bad"), CASES)
def test_non_finite_values_are_refused_naming_the_key(key: str, bad: str, buffer: type) -> None:
    tensors = mixed()
    tensors[key].view(-1)[-1] = float(bad)
    with pytest.raises(NonFiniteWeightsError, match=key.replace(".", r"\.")):
        load_weights(buffer(save(tensors)), "bad")


@BUFFERS
def test_the_first_bad_key_is_named(buffer: type) -> None:
    tensors = mixed()
    tensors["c.f32"][0] = float("nan")
    tensors["e.f64"][0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"c\.f32"):
        load_weights(buffer(save(tensors)), "bad")


@BUFFERS
def test_bytes_that_are_not_safetensors_name_the_source(buffer: type) -> None:
    with pytest.raises(AdapterFormatError, match="upload 7 is not a valid safetensors file"):
        load_weights(buffer(b"\x00\x01garbage"), "upload 7")
