"""Lease-guarded writes a worker makes to its running job: progress, metrics, lease release.

Every write here applies only while ``owner`` holds the job (``lease_owner`` matches and the job is
running), so a worker that lost its lease can never overwrite the progress of the worker that took
the job over. The functions answer whether the worker should keep going.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session

from app.registry.locks import lock_rows
from app.registry.models import Job, utcnow


def _held(session: Session, job_id: str, owner: str) -> Job | None:
    lock_rows(session, Job.attempts, Job.id == job_id)  # read after the lock (app.registry.locks)
    stmt = (select(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
            .with_for_update().execution_options(populate_existing=True))
    return session.execute(stmt).scalar_one_or_none()


def update_progress(session: Session, job_id: str, owner: str, *, step: int | None = None,
                    total_steps: int | None = None, eta_seconds: float | None = None,
                    metrics: dict[str, Any] | None = None) -> bool:
    """Record progress (fields left ``None`` are kept) and merge ``metrics`` into the job's metrics.

    Returns False, writing nothing, when ``owner`` no longer holds the job; False too (after
    writing) when a cancel was requested. Either way the worker should stop.
    """
    job = _held(session, job_id, owner)
    if job is None:
        return False
    if step is not None:
        job.step = step
    if total_steps is not None:
        job.total_steps = total_steps
    if eta_seconds is not None:
        job.eta_seconds = eta_seconds
    if metrics:
        job.metrics = {**(job.metrics or {}), **metrics}  # a new dict: JSON columns track assignment only
    session.flush()
    return not job.cancel_requested


def release_lease(session: Session, job_id: str, owner: str, *, refund_attempt: bool = False) -> bool:
    """Let the lease lapse now and drop its owner (the job stays running) so another worker may resume it at once.

    For a worker that stops without finishing the job (shutdown, interrupt): the reconciler
    enqueues the job again, and the next claim resumes it from its last checkpoint. With
    ``refund_attempt`` (an orderly worker shutdown, not a failure) the attempt is given back, so
    restarting workers never exhausts a job's attempts. False when ``owner`` did not hold the job.
    """
    # the owner goes too: a heartbeat of the old lease still in flight must not renew it
    values: dict[str, Any] = {"lease_expires_at": utcnow(), "lease_owner": None}
    if refund_attempt:
        values["attempts"] = case((Job.attempts > 0, Job.attempts - 1), else_=0)
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running").values(**values)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]
