"""Unpacking uploaded adapter archives (``.tar.gz`` / ``.tgz`` / ``.zip``) safely.

An archive may hold the PEFT folder at its root or inside one top-level directory. Refused with
:class:`UnsafeArchive` (the API's 400) before anything is written: absolute paths, ``..`` parts,
links and devices, more than ``max_files`` members, unpacked size over ``max_bytes``, anything
that is not a regular file or directory, and archives that cannot be read whole (truncated, bad
CRCs, corrupt compressed data, encrypted members). Only the files an adapter needs are extracted.
"""

from __future__ import annotations

import lzma
import tarfile
import zipfile
import zlib
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


# What reading a damaged archive raises: truncated or corrupt gzip/bzip2/xz streams, bad CRCs, members
# compressed with a method this Python lacks, or encrypted ones.
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError,
                NotImplementedError, RuntimeError)


def _members(path: Path) -> tuple[str, list[_Member]]:
    try:
        return _list_members(path)
    except UnsafeArchive:
        raise
    except _READ_ERRORS as exc:
        raise UnsafeArchive(f"not a .tar.gz or .zip archive, or a corrupt one: {exc}") from exc


def _list_members(path: Path) -> tuple[str, list[_Member]]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            out = []
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0o170000
                if mode and mode not in (0o100000, 0o040000):
                    raise UnsafeArchive(f"archive member {info.filename!r} is not a regular file")
                out.append(_Member(_check_name(info.filename), info.file_size, info.is_dir()))
            return "zip", out
    with tarfile.open(path, "r:*") as tf:
        out = []
        for m in tf.getmembers():
            if not (m.isfile() or m.isdir()):
                raise UnsafeArchive(f"archive member {m.name!r} is a link or special file")
            out.append(_Member(_check_name(m.name), m.size, m.isdir()))
        return "tar", out


def _read_wanted(archive: Path, kind: str, wanted: set[PurePosixPath]) -> dict[PurePosixPath, bytes]:
    """The bytes of the ``wanted`` members; a member that cannot be read whole is :class:`UnsafeArchive`."""
    out: dict[PurePosixPath, bytes] = {}
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    name = _check_name(info.filename)
                    if name in wanted:
                        out[name] = zf.read(info)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for m in tf.getmembers():
                    name = _check_name(m.name)
                    if name in wanted:
                        src = tf.extractfile(m)
                        if src is None:
                            raise UnsafeArchive(f"cannot read archive member {m.name!r}")
                        out[name] = src.read()
    except UnsafeArchive:
        raise
    except _READ_ERRORS as exc:
        raise UnsafeArchive(f"the archive is corrupt: {exc}") from exc
    return out


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
    wanted = {m.name for m in files if m.name.parent == folder and m.name.name in ADAPTER_FILES}
    contents = _read_wanted(archive, kind, wanted)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        (dest / name.name).write_bytes(data)
    return dest
