"""Content-addressed artifact store (datasets, adapter files, checkpoints).

Objects are named by the sha256 of their bytes and written atomically: bytes stream into a temp
file under the store's root (hashed on the way, size-limited), are fsynced, then renamed into
``objects/<2 hex>/<62 hex>``. A crash mid-write leaves at most a temp file, never a partial object,
and the same bytes stored twice are kept once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


class StorageError(Exception):
    """Base class of artifact store errors."""


class ArtifactTooLarge(StorageError):
    """The object exceeds the size limit; nothing was stored."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"artifact exceeds the size limit of {limit} bytes")
        self.limit = limit


class ArtifactNotFound(StorageError, KeyError):
    """No object with this sha256."""


@dataclass(frozen=True)
class ArtifactRef:
    """A stored object: its sha256 (hex) and size in bytes."""

    sha256: str
    size: int


class ArtifactStore(Protocol):
    """What the registry and the workers need from artifact storage."""

    def put(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> ArtifactRef: ...
    def open(self, sha256: str) -> BinaryIO: ...
    def exists(self, sha256: str) -> bool: ...
    def delete(self, sha256: str) -> None: ...


def iter_file(f: BinaryIO, chunk_size: int = _CHUNK) -> Iterator[bytes]:
    """Chunks of a binary file object, for :meth:`ArtifactStore.put`."""
    while chunk := f.read(chunk_size):
        yield chunk


class LocalArtifactStore:
    """:class:`ArtifactStore` in a local directory (the embedded default; a shared volume in production)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._objects.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """Where the object lives (validated: a malformed id can never name another path)."""
        if not _SHA256.match(sha256):
            raise ArtifactNotFound(f"not a sha256 hex digest: {sha256!r}")
        return self._objects / sha256[:2] / sha256[2:]

    def put(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> ArtifactRef:
        """Store the concatenated ``chunks``; raises :class:`ArtifactTooLarge` past ``max_bytes``."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise ArtifactTooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            ref = ArtifactRef(digest.hexdigest(), size)
            final = self.path(ref.sha256)
            if final.exists():
                tmp.unlink()
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
            return ref
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def put_bytes(self, data: bytes, *, max_bytes: int | None = None) -> ArtifactRef:
        return self.put([data], max_bytes=max_bytes)

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError as exc:
            raise ArtifactNotFound(f"no artifact {sha256}") from exc

    def exists(self, sha256: str) -> bool:
        try:
            return self.path(sha256).is_file()
        except ArtifactNotFound:
            return False

    def delete(self, sha256: str) -> None:
        """Remove the object (a no-op when it is not there)."""
        self.path(sha256).unlink(missing_ok=True)

    def objects(self) -> Iterator[tuple[str, Path]]:
        """Every stored object: ``(sha256, path)``."""
        for path in self._objects.glob("??/*"):
            sha256 = path.parent.name + path.name
            if _SHA256.match(sha256) and path.is_file():
                yield sha256, path

    def clean_temp(self, older_than: float = 0.0) -> int:
        """Remove temp files left by crashed writers, if untouched for ``older_than`` seconds (other
        processes sharing the store may be writing the newer ones); returns how many were removed."""
        removed = remove_stale(self._tmp.glob("put-*"), older_than)
        if removed:
            logger.info("removed %d partial uploads from %s", removed, self._tmp)
        return removed


def remove_stale(paths: Iterable[Path], older_than: float) -> int:
    """Delete the files and folders among ``paths`` not modified for ``older_than`` seconds."""
    cutoff = time.time() - older_than
    removed = 0
    for path in paths:
        try:
            if path.stat().st_mtime > cutoff:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
        except FileNotFoundError:
            continue
    return removed
