"""Dataset rows: pagination, and deletion refused while a job needs the data."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.registry.datasets import DatasetNotFound, create_dataset, delete_dataset, get_dataset, list_datasets
from app.registry.jobs import JobConflict, claim, create_job, finish


def _dataset(s: Session, n: int) -> str:
    return create_dataset(s, filename=f"d{n}.jsonl", sha256=f"{n:064x}", size=n, form="chat",
                          summary={"examples": n}).id


def test_cursor_pagination_visits_every_dataset_once(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        ids = {_dataset(s, n) for n in range(7)}
    with sessions.begin() as s:
        seen = walk_pages(s, limit=3)
    assert sorted(seen) == sorted(ids) and len(seen) == 7


def walk_pages(session: Session, *, limit: int) -> list[str]:
    """Every dataset id, page after page of ``limit``, following ``next`` cursors."""
    seen: list[str] = []
    after = None
    while True:
        page, more = list_datasets(session, limit=limit, after=after)
        seen += [d.id for d in page]
        if not more:
            return seen
        after = page[-1].id


def test_delete_waits_for_jobs_that_use_the_dataset(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        ds = _dataset(s, 1)
        job = create_job(s, type="train", adapter_name="bot", spec={}, dataset_id=ds).id
    with sessions.begin() as s, pytest.raises(JobConflict, match=job):
        delete_dataset(s, ds)
    with sessions.begin() as s:
        claim(s, job, "w", 60)
        finish(s, job, "w", "succeeded")
    with sessions.begin() as s:
        delete_dataset(s, ds)
    with sessions.begin() as s, pytest.raises(DatasetNotFound):
        get_dataset(s, ds)
