"""Unpacking uploaded adapter archives (``.tar.gz`` / ``.tgz`` / ``.zip``) safely.

An archive may hold the PEFT folder at its root or inside one top-level directory. Refused with
:class:`UnsafeArchive` (the API's 400) before anything is written: absolute paths, ``..`` parts,
links and devices, more than ``max_files`` members, unpacked size over ``max_bytes``, and anything
that is not a regular file or directory. Only the files an adapter needs are extracted.
"""

from __future__ import annotations

import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")


class UnsafeArchive(ValueError):
    """The archive is malformed or tries to write outside its folder."""


@dataclass(frozen=True)
class _Member:
    name: PurePosixPath
    size: int
    is_dir: bool


def _check_name(raw: str) -> PurePosixPath:
    """A member name as a relative path inside the archive (no root, drive, or ``..``)."""
    norm = raw.replace("\\", "/")
    path = PurePosixPath(norm)
    if norm.startswith("/") or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise UnsafeArchive(f"archive member {raw!r} points outside the archive")
    return path


def _members(path: Path) -> tuple[str, list[_Member]]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            out = []
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0o170000
                if mode and mode not in (0o100000, 0o040000):
                    raise UnsafeArchive(f"archive member {info.filename!r} is not a regular file")
                out.append(_Member(_check_name(info.filename), info.file_size, info.is_dir()))
            return "zip", out
    try:
        with tarfile.open(path, "r:*") as tf:
            out = []
            for m in tf.getmembers():
                if not (m.isfile() or m.isdir()):
                    raise UnsafeArchive(f"archive member {m.name!r} is a link or special file")
                out.append(_Member(_check_name(m.name), m.size, m.isdir()))
            return "tar", out
    except tarfile.TarError as exc:
        raise UnsafeArchive(f"not a .tar.gz or .zip archive: {exc}") from exc


def extract_adapter_archive(archive: Path, dest: Path, *, max_bytes: int, max_files: int = 64) -> Path:
    """Extract the adapter files of ``archive`` into ``dest``; returns the folder holding them."""
    kind, members = _members(archive)
    files = [m for m in members if not m.is_dir]
    if len(members) > max_files:
        raise UnsafeArchive(f"archive has {len(members)} members; at most {max_files} are accepted")
    if sum(m.size for m in files) > max_bytes:
        raise UnsafeArchive(f"archive unpacks to more than {max_bytes} bytes")
    configs = [m.name for m in files if m.name.name == "adapter_config.json"]
    if len(configs) != 1:
        raise UnsafeArchive(f"archive must hold exactly one adapter_config.json, found {len(configs)}")
    folder = configs[0].parent
    if len(folder.parts) > 1:
        raise UnsafeArchive("adapter files must be at the archive root or inside one top-level folder")
    wanted = {m.name: m for m in files if m.name.parent == folder and m.name.name in ADAPTER_FILES}
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = _check_name(info.filename)
                if name in wanted:
                    (dest / name.name).write_bytes(zf.read(info))
    else:
        with tarfile.open(archive, "r:*") as tf:
            for m in tf.getmembers():
                name = _check_name(m.name)
                if name in wanted:
                    src = tf.extractfile(m)
                    if src is None:
                        raise UnsafeArchive(f"cannot read archive member {m.name!r}")
                    (dest / name.name).write_bytes(src.read())
    return dest
