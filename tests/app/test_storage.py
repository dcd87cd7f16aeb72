"""The local artifact store: content addressing, dedupe, atomic writes, limits, safe ids."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.storage import ArtifactNotFound, ArtifactTooLarge, LocalArtifactStore, iter_file


def test_objects_are_named_by_sha256_and_read_back(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    data = b"adapter bytes " * 1000
    ref = store.put_bytes(data)
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
    with store.open(ref.sha256) as f:
        assert f.read() == data
    assert store.path(ref.sha256) == tmp_path / "objects" / ref.sha256[:2] / ref.sha256[2:]


def test_same_bytes_are_stored_once(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    a = store.put([b"abc", b"def"])
    b = store.put_bytes(b"abcdef")
    assert a == b
    assert len(list((tmp_path / "objects").rglob("*"))) == 2  # one prefix dir, one object
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_writer_that_fails_midway_leaves_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)

    def broken() -> Iterator[bytes]:
        yield b"first half"
        raise OSError("client went away")

    with pytest.raises(OSError, match="went away"):
        store.put(broken())
    assert list((tmp_path / "objects").rglob("*")) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_size_limit_stores_nothing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    with pytest.raises(ArtifactTooLarge) as err:
        store.put([b"x" * 600, b"y" * 600], max_bytes=1000)
    assert err.value.limit == 1000
    assert list((tmp_path / "objects").rglob("*")) == [] and list((tmp_path / "tmp").iterdir()) == []
    assert store.put_bytes(b"x" * 1000, max_bytes=1000).size == 1000


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ab", "A" * 64, "g" * 64, ""])
def test_malformed_ids_never_name_a_path(tmp_path: Path, bad: str) -> None:
    store = LocalArtifactStore(tmp_path)
    assert not store.exists(bad)
    with pytest.raises(ArtifactNotFound):
        store.open(bad)
    with pytest.raises(ArtifactNotFound):
        store.delete(bad)


def test_delete_and_missing(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    ref = store.put_bytes(b"bye")
    store.delete(ref.sha256)
    assert not store.exists(ref.sha256)
    with pytest.raises(ArtifactNotFound):
        store.open(ref.sha256)
    store.delete(ref.sha256)  # idempotent


def test_streams_a_file_and_cleans_crash_leftovers(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    src = tmp_path / "big.bin"
    src.write_bytes(bytes(range(256)) * 9000)
    with src.open("rb") as f:
        ref = store.put(iter_file(f, chunk_size=4096))
    assert ref.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    (tmp_path / "store" / "tmp" / "put-crashed").write_bytes(b"partial")
    assert store.clean_temp() == 1


def test_start_up_cleaning_spares_recent_temp_files_of_other_processes(tmp_path: Path) -> None:
    import os
    import time

    store = LocalArtifactStore(tmp_path / "store")
    old, fresh = tmp_path / "store" / "tmp" / "put-old", tmp_path / "store" / "tmp" / "put-fresh"
    old.write_bytes(b"crashed long ago")
    fresh.write_bytes(b"another process is writing this")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.clean_temp(older_than=3600) == 1
    assert not old.exists() and fresh.exists()
