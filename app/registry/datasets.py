"""Dataset rows: register an uploaded JSONL (already stored and validated), list, get, delete."""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.registry.jobs import JobConflict
from app.registry.locks import lock_rows
from app.registry.models import Dataset, Job, is_id_text, utcnow


class DatasetNotFound(Exception):
    """No (undeleted) dataset with this id."""


def create_dataset(session: Session, *, filename: str, sha256: str, size: int, form: str,
                   summary: dict[str, Any]) -> Dataset:
    """Record a stored, validated upload (the caller commits)."""
    ds = Dataset(filename=filename, sha256=sha256, size=size, form=form, summary=summary)
    session.add(ds)
    session.flush()
    return ds


def get_dataset(session: Session, dataset_id: str) -> Dataset:
    ds = session.get(Dataset, dataset_id) if is_id_text(dataset_id) else None
    if ds is None or ds.deleted_at is not None:
        raise DatasetNotFound(f"no dataset {dataset_id!r}")
    return ds


def dataset_for_job(session: Session, dataset_id: str) -> Dataset:
    """:func:`get_dataset`, read under a share lock (PostgreSQL's ``FOR SHARE``; SQLite's write lock, which a
    job submission already holds) until the job's transaction ends: a delete of the dataset waits for the
    job's commit and then sees the job (409), or deletes first and the job sees it gone."""
    return _locked_dataset(session, dataset_id, share=True)


def _locked_dataset(session: Session, dataset_id: str, *, share: bool) -> Dataset:
    """The undeleted dataset, read after locking its row (shared or exclusive) for the transaction."""
    if not is_id_text(dataset_id):
        raise DatasetNotFound(f"no dataset {dataset_id!r}")
    lock_rows(session, Dataset.size, Dataset.id == dataset_id)
    ds = session.execute(select(Dataset).where(Dataset.id == dataset_id).with_for_update(read=share)
                         .execution_options(populate_existing=True)).scalar_one_or_none()
    if ds is None or ds.deleted_at is not None:
        raise DatasetNotFound(f"no dataset {dataset_id!r}")
    return ds


def list_datasets(session: Session, *, limit: int = 20, after: str | None = None) -> tuple[list[Dataset], bool]:
    """Newest first; ``after`` is the id of the last dataset of the previous page (deleted since or not: its
    place in the order stays). Returns (page, has_more)."""
    stmt = select(Dataset).where(Dataset.deleted_at.is_(None))
    if after is not None:
        cursor = session.get(Dataset, after) if is_id_text(after) else None
        if cursor is None:
            raise DatasetNotFound(f"no dataset {after!r}")
        stmt = stmt.where(
            or_(Dataset.created_at < cursor.created_at,
                (Dataset.created_at == cursor.created_at) & (Dataset.id < cursor.id))
        )
    rows = list(session.execute(stmt.order_by(Dataset.created_at.desc(), Dataset.id.desc()).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit


def delete_dataset(session: Session, dataset_id: str) -> Dataset:
    """Soft-delete; refused (``JobConflict``) while a queued or running job uses the dataset. The dataset row
    is locked before the jobs are looked at, so a job being created on it either commits first (and is seen
    here) or sees the deletion (:func:`dataset_for_job`)."""
    ds = _locked_dataset(session, dataset_id, share=False)
    busy = session.execute(
        select(Job.id).where(
            Job.status.in_(("queued", "running")),
            or_(Job.dataset_id == dataset_id, Job.validation_dataset_id == dataset_id),
        ).limit(1)
    ).scalar_one_or_none()
    if busy is not None:
        raise JobConflict(f"dataset {dataset_id} is used by job {busy}, which has not finished")
    ds.deleted_at = utcnow()
    session.flush()
    return ds
