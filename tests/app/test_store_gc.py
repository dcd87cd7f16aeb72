"""Store garbage collection removes only old objects that no registry row references."""

from __future__ import annotations

import os
import time
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from app.registry.adapters import VersionSpec, create_version, delete_version
from app.registry.datasets import create_dataset
from app.storage import LocalArtifactStore
from app.store_gc import collect_garbage


def _age(store: LocalArtifactStore, sha256: str, seconds: float = 7200) -> None:
    then = time.time() - seconds
    os.utime(store.path(sha256), (then, then))


def test_gc_removes_old_orphans_only(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "store")
    data = store.put_bytes(b'{"text": "hello"}\n')
    weights = store.put_bytes(b"weights of a deleted version")
    orphan = store.put_bytes(b"stored, then the commit failed")
    fresh = store.put_bytes(b"an upload still on its way to a commit")
    for ref in (data, weights, orphan):
        _age(store, ref.sha256)
    with sessions.begin() as s:
        create_dataset(s, filename="d.jsonl", sha256=data.sha256, size=data.size, form="text", summary={})
        create_version(s, "bot", VersionSpec(method="lora", config={}, size=weights.size,
                                             files={"adapter_model.safetensors": {"sha256": weights.sha256, "size": 1}}))
        delete_version(s, "bot", 1)  # soft delete keeps its files

    with sessions() as s:
        dry = collect_garbage(s, store, older_than=3600, dry_run=True)
    assert (dry.removed, dry.kept) == (1, 3) and store.exists(orphan.sha256)
    with sessions() as s:
        report = collect_garbage(s, store, older_than=3600)
    assert (report.removed, report.removed_bytes) == (1, orphan.size)
    assert not store.exists(orphan.sha256)
    assert all(store.exists(r.sha256) for r in (data, weights, fresh))


def test_cli_store_gc(tmp_path: Path, monkeypatch: object) -> None:
    import pytest

    from adapterforge.cli import main
    from app.registry.migrate import upgrade
    from app.settings import Settings

    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]
    mp.setenv("ADAPTERFORGE_DATA_DIR", str(tmp_path / "data"))
    settings = Settings()
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.resolved_database_url)
    store = LocalArtifactStore(settings.store_dir)
    orphan = store.put_bytes(b"orphan")
    _age(store, orphan.sha256)
    assert main(["store", "gc", "--dry-run"]) == 0 and store.exists(orphan.sha256)
    assert main(["store", "gc"]) == 0 and not store.exists(orphan.sha256)
