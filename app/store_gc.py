"""Remove artifact-store objects that no registry row references.

Files are stored before the row that references them commits (uploads, a worker registering a
version), so a crash or a failed commit in between leaves an orphan: harmless, but it takes space.
Soft-deleted datasets and versions keep their objects (deletes are soft; nothing here undoes that).
Only objects older than a grace period are removed, so uploads still on their way to a commit are
never touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.registry.models import AdapterVersion, Dataset
from app.storage import LocalArtifactStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    """What a collection found: objects removed (or that would be, on a dry run), their bytes, and kept."""

    removed: int
    removed_bytes: int
    kept: int


def referenced_objects(session: Session) -> set[str]:
    """Every sha256 a dataset or adapter version row (deleted or not) points at."""
    refs = set(session.execute(select(Dataset.sha256)).scalars())
    for files in session.execute(select(AdapterVersion.files)).scalars():
        refs.update(entry["sha256"] for entry in (files or {}).values() if isinstance(entry, dict) and "sha256" in entry)
    return refs


def collect_garbage(session: Session, store: LocalArtifactStore, *, older_than: float = 3600.0,
                    dry_run: bool = False) -> GcReport:
    """Delete unreferenced objects not modified for ``older_than`` seconds."""
    cutoff = time.time() - older_than
    keep = referenced_objects(session)
    removed = removed_bytes = kept = 0
    for sha256, path in store.objects():
        stat = path.stat()
        if sha256 in keep or stat.st_mtime > cutoff:
            kept += 1
            continue
        removed += 1
        removed_bytes += stat.st_size
        if not dry_run:
            store.delete(sha256)
    logger.info("store gc: %s %d unreferenced objects (%d bytes), kept %d",
                "would remove" if dry_run else "removed", removed, removed_bytes, kept)
    return GcReport(removed, removed_bytes, kept)
