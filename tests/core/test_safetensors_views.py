"""Viewing a safetensors file in place (``adapters_core.safetensors_views``): the views hold exactly what
the safetensors library reads, share the file's buffer, and anything short of a plainly valid file is
declined, so that ``load_weights`` falls back to the library and answers as it always did."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import load, save

from adapters_core.errors import AdapterFormatError
from adapters_core.peft_format import load_weights, read_into_buffer
from adapters_core.safetensors_views import tensor_views
from tests.core.test_weights_file import mixed


def tensors() -> dict[str, torch.Tensor]:
    """``test_weights_file``'s runs of several dtypes, plus the formats and shapes it lacks."""
    return {**mixed(), "j.u8": torch.arange(7, dtype=torch.uint8), "k.bool": torch.tensor([True, False, True]),
            "l.scalar": torch.tensor(2.5), "m.empty": torch.zeros(0, 5)}


def raw(header: dict[str, Any], data: bytes, *, pad: bool = True) -> bytes:
    """A file from its parts, the header padded with spaces to 8 bytes as the library writes it."""
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def parts(file: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack_from("<Q", file)
    return json.loads(file[8:8 + length]), file[8 + length:]


def test_views_hold_what_safetensors_reads_and_share_the_buffer() -> None:
    file = bytearray(save(tensors(), metadata={"format": "pt"}))
    views = tensor_views(file)
    assert views is not None
    expected = load(bytes(file))
    assert sorted(views) == sorted(expected)
    for key, tensor in expected.items():
        view = views[key]
        assert (view.dtype, view.shape) == (tensor.dtype, tensor.shape), key
        assert torch.equal(view.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
    views["g.i64"][0] = 41  # a write through the view lands in the buffer: no copy was made
    assert load(bytes(file))["g.i64"][0] == 41


def test_a_file_read_from_disk_is_viewed(tmp_path: Any) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(save(tensors()))
    with path.open("rb") as f:
        buffer = read_into_buffer(f)
    assert isinstance(buffer, bytearray) and bytes(buffer) == path.read_bytes()
    assert tensor_views(buffer) is not None


def _edit(change: Callable[[dict[str, Any]], None]) -> bytes:
    header, data = parts(save(tensors()))
    change(header)
    return raw(header, data)


def _misaligned() -> bytes:
    """A valid file whose float32 tensor starts 2 bytes past a multiple of 4 (an unpadded header)."""
    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    text = json.dumps(header).encode()
    text += b" " * ((2 - len(text)) % 4)  # 8 + len(text) = 2 (mod 4)
    return struct.pack("<Q", len(text)) + text + struct.pack("<2f", 1.0, 2.0)


INVALID: dict[str, Callable[[], bytes]] = {
    "truncated data": lambda: save(tensors())[:-3],
    "trailing bytes": lambda: save(tensors()) + b"\0" * 8,
    "header longer than the file": lambda: struct.pack("<Q", 10_000) + b"{}",
    "header not json": lambda: raw({}, b"")[:8] + b"{nope!!}",
    "header not an object": lambda: struct.pack("<Q", 8) + b"[1, 2] ",
    "unknown dtype": lambda: _edit(lambda h: h["a.f32"].update(dtype="F7")),
    "size not the shape's": lambda: _edit(lambda h: h["a.f32"].update(shape=[8, 5])),
    "negative dimension": lambda: _edit(lambda h: h["a.f32"].update(shape=[-8, -4])),
    "gap between tensors": lambda: raw({"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                                        "y": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"\0" * 6),
    "overlapping tensors": lambda: raw({"x": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                                        "y": {"dtype": "U8", "shape": [2], "data_offsets": [2, 4]}}, b"\0" * 4),
    "offsets missing": lambda: _edit(lambda h: h["a.f32"].pop("data_offsets")),
}
DECLINED_ONLY: dict[str, Callable[[], bytes]] = {  # views decline; the library decides
    "misaligned float32": _misaligned,
    "extra entry field": lambda: _edit(lambda h: h["a.f32"].update(note="hi")),
    "non-string metadata": lambda: _edit(lambda h: h.update(__metadata__={"format": 1})),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_files_are_declined_and_refused_as_before(case: str) -> None:
    file = INVALID[case]()
    assert tensor_views(bytearray(file)) is None
    with pytest.raises(AdapterFormatError, match="not a valid safetensors file") as viewed:
        load_weights(bytearray(file), "f")
    with pytest.raises(AdapterFormatError) as copied:
        load_weights(bytes(file), "f")
    assert str(viewed.value) == str(copied.value)


@pytest.mark.parametrize("case", sorted(DECLINED_ONLY))
def test_files_views_decline_are_answered_as_the_library_answers(case: str) -> None:
    file = DECLINED_ONLY[case]()
    assert tensor_views(bytearray(file)) is None
    try:
        expected: dict[str, torch.Tensor] | str = load_weights(bytes(file), "f")
    except AdapterFormatError as exc:
        expected = str(exc)
    try:
        got: dict[str, torch.Tensor] | str = load_weights(bytearray(file), "f")
    except AdapterFormatError as exc:
        got = str(exc)
    if isinstance(expected, str) or isinstance(got, str):
        assert got == expected
    else:
        assert sorted(got) == sorted(expected)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_duplicate_keys_are_declined() -> None:
    entry = '{"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}'
    text = ('{"x": ' + entry + ', "x": ' + entry + "}").encode()
    text += b" " * (-len(text) % 8)
    assert tensor_views(bytearray(struct.pack("<Q", len(text)) + text + b"\0\0")) is None
