"""Adapter archives: the PEFT folder comes out; anything that escapes or overflows is refused."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.uploads import UnsafeArchive, extract_adapter_archive

CONFIG = b'{"peft_type": "LORA"}'
WEIGHTS = b"\x00" * 100


def _tar(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if symlink:
            link = tarfile.TarInfo(symlink)
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tf.addfile(link)
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


@pytest.mark.parametrize("prefix", ["", "my-adapter/"])
@pytest.mark.parametrize("maker", [_tar, _zip], ids=["tar.gz", "zip"])
def test_extracts_the_adapter_files(tmp_path: Path, prefix: str, maker: Callable[..., Path]) -> None:
    archive = maker(tmp_path / "a.arc", {f"{prefix}adapter_config.json": CONFIG,
                                         f"{prefix}adapter_model.safetensors": WEIGHTS,
                                         f"{prefix}notes/other.txt": b"ignored"})
    out = extract_adapter_archive(archive, tmp_path / "out", max_bytes=10_000)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (out / "adapter_config.json").read_bytes() == CONFIG


@pytest.mark.parametrize(
    ("members", "needle"),
    [
        ({"../../evil.json": b"x", "adapter_config.json": CONFIG}, "outside"),
        ({"/etc/adapter_config.json": CONFIG}, "outside"),
        ({"C:/adapter_config.json": CONFIG}, "outside"),
        ({"adapter_model.safetensors": WEIGHTS}, "exactly one adapter_config.json"),
        ({"a/adapter_config.json": CONFIG, "b/adapter_config.json": CONFIG}, "exactly one"),
        ({"a/b/adapter_config.json": CONFIG}, "one top-level folder"),
        ({"adapter_config.json": CONFIG, "adapter_model.safetensors": b"\x00" * 20_000}, "more than"),
    ],
)
def test_refuses_unsafe_or_malformed_archives(tmp_path: Path, members: dict[str, bytes], needle: str) -> None:
    for maker in (_tar, _zip):
        archive = maker(tmp_path / f"bad.{maker.__name__}", members)
        with pytest.raises(UnsafeArchive, match=needle):
            extract_adapter_archive(archive, tmp_path / "out", max_bytes=10_000)
        assert not (tmp_path / "out").exists()


def test_refuses_links_too_many_members_and_garbage(tmp_path: Path) -> None:
    linked = _tar(tmp_path / "l.tgz", {"adapter_config.json": CONFIG}, symlink="adapter_model.safetensors")
    with pytest.raises(UnsafeArchive, match="link"):
        extract_adapter_archive(linked, tmp_path / "o1", max_bytes=10_000)
    many = _zip(tmp_path / "m.zip", {f"f{i}": b"" for i in range(70)} | {"adapter_config.json": CONFIG})
    with pytest.raises(UnsafeArchive, match="members"):
        extract_adapter_archive(many, tmp_path / "o2", max_bytes=10_000)
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(UnsafeArchive, match="not a"):
        extract_adapter_archive(junk, tmp_path / "o3", max_bytes=10_000)


def _corrupt(path: Path, kind: str) -> Path:
    """``path`` with its stored bytes damaged the way ``kind`` says."""
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        data = data[: len(data) // 2]
    else:  # flip bytes of the first member's (compressed) data, past its local header
        start = data.index(b"adapter_config.json") + len("adapter_config.json")
        for i in range(start + 2, start + 10):
            data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("maker", "kind"),
    [(_tar, "truncated"), (_zip, "truncated"), (_zip, "damaged"), ("deflated zip", "damaged")],
    ids=["tar.gz-truncated", "zip-truncated", "zip-bad-crc", "zip-bad-deflate"],
)
def test_refuses_corrupt_archives(tmp_path: Path, maker: Any, kind: str) -> None:
    members = {"adapter_config.json": CONFIG * 50, "adapter_model.safetensors": bytes(range(256)) * 40}
    if maker == "deflated zip":
        archive = tmp_path / "a.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    else:
        archive = maker(tmp_path / "a.arc", members)
    _corrupt(archive, kind)
    with pytest.raises(UnsafeArchive, match=r"corrupt|not a"):
        extract_adapter_archive(archive, tmp_path / "out", max_bytes=100_000)
