"""Job rows: creation, leases, heartbeats, cancellation, events, listing.

A worker runs a job only while it holds the job's lease (``lease_owner`` + ``lease_expires_at``),
taken and renewed by conditional UPDATEs so two workers can never both hold it. A job whose lease
expired (its worker died) can be claimed again; each claim counts an attempt, and a job out of
attempts is failed with an error saying so. Statuses: queued → running → succeeded / failed /
cancelled.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.registry.locks import lock_rows
from app.registry.models import Job, JobEvent, as_utc, is_id_text, utcnow

TERMINAL = ("succeeded", "failed", "cancelled")


class JobConflict(Exception):
    """The job is in a state that does not allow the operation (e.g. cancelling a finished job)."""


class JobNotFound(Exception):
    """No job with this id."""


def create_job(session: Session, *, type: str, adapter_name: str, spec: dict[str, Any],
               dataset_id: str | None = None, validation_dataset_id: str | None = None,
               max_attempts: int = 3) -> Job:
    """Insert a queued job (the caller commits, then enqueues its id)."""
    job = Job(type=type, adapter_name=adapter_name, spec=spec, dataset_id=dataset_id,
              validation_dataset_id=validation_dataset_id, max_attempts=max_attempts, status="queued")
    session.add(job)
    session.flush()
    add_event(session, job.id, "queued", "job created")
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id) if is_id_text(job_id) else None
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    return job


def _locked_job(session: Session, job_id: str) -> Job | None:
    """The job ``job_id``, locked for this transaction (:mod:`app.registry.locks`) and read after the lock."""
    lock_rows(session, Job.attempts, Job.id == job_id)
    stmt = select(Job).where(Job.id == job_id).with_for_update().execution_options(populate_existing=True)
    return session.execute(stmt).scalar_one_or_none()


def claim(session: Session, job_id: str, owner: str, lease_seconds: float, now: datetime | None = None) -> Job | None:
    """Take the job's lease if it is queued, or running with an expired lease; ``None`` if not ours.

    A job that has used up its attempts is failed instead (and ``None`` returned).
    """
    now = now or utcnow()
    claimable = and_(
        Job.id == job_id,
        Job.cancel_requested.is_(False),
        or_(Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now)),
    )
    lock_rows(session, Job.attempts, Job.id == job_id)
    job = session.execute(select(Job).where(claimable).with_for_update()
                          .execution_options(populate_existing=True)).scalar_one_or_none()
    if job is None:
        return None
    if job.attempts >= job.max_attempts:
        job.status, job.finished_at = "failed", now
        job.error = {"code": "attempts_exhausted",
                     "message": f"gave up after {job.attempts} attempts (the worker died or lost its lease each time)"}
        job.lease_owner = job.lease_expires_at = None
        add_event(session, job.id, "failed", job.error["message"])
        return None
    resumed = job.status == "running"
    job.status, job.lease_owner = "running", owner
    job.lease_expires_at = now + timedelta(seconds=lease_seconds)
    job.attempts += 1
    job.started_at = job.started_at or now
    add_event(session, job.id, "resumed" if resumed else "started", f"attempt {job.attempts} on {owner}",
              {"attempt": job.attempts, "owner": owner})
    session.flush()
    return job


def heartbeat(session: Session, job_id: str, owner: str, lease_seconds: float, now: datetime | None = None) -> bool:
    """Extend ``owner``'s lease; False when it no longer holds it or a cancel was requested."""
    now = now or utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running", Job.cancel_requested.is_(False))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def finish(session: Session, job_id: str, owner: str, status: str, *, error: dict[str, Any] | None = None,
           result_version_id: str | None = None, now: datetime | None = None) -> Job:
    """End a running job held by ``owner`` (``JobConflict`` if the lease was lost meanwhile)."""
    if status not in TERMINAL:
        raise ValueError(f"not a terminal status: {status!r}")
    job = _locked_job(session, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    if job.status != "running" or job.lease_owner != owner:
        raise JobConflict(f"job {job_id} is not held by {owner} (status {job.status})")
    job.status, job.finished_at = status, now or utcnow()
    job.error, job.result_version_id = error, result_version_id
    job.lease_owner = job.lease_expires_at = None
    add_event(session, job.id, status, (error or {}).get("message", status))
    session.flush()
    return job


def request_cancel(session: Session, job_id: str, now: datetime | None = None) -> Job:
    """Queued jobs are cancelled at once, and so are running ones whose worker is gone (the lease expired or
    was handed back: no worker would ever end them, since none claims a job with a cancel requested);
    other running ones are flagged for their worker; terminal ones conflict."""
    now = now or utcnow()
    job = _locked_job(session, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    if job.status in TERMINAL:
        raise JobConflict(f"job {job_id} is already {job.status}")
    job.cancel_requested = True
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", now
        add_event(session, job.id, "cancelled", "cancelled before it started")
    elif _worker_gone(job, now):
        _end_cancelled(session, job, now, "cancelled: its worker had stopped")
    else:
        add_event(session, job.id, "cancel_requested", "the worker stops at the next step")
    session.flush()
    return job


def _worker_gone(job: Job, now: datetime) -> bool:
    expires = job.lease_expires_at
    return job.lease_owner is None or expires is None or as_utc(expires) < now


def _end_cancelled(session: Session, job: Job, now: datetime, message: str) -> None:
    job.status, job.finished_at = "cancelled", now
    job.lease_owner = job.lease_expires_at = None
    add_event(session, job.id, "cancelled", message)


def cancel_abandoned(session: Session, now: datetime | None = None) -> list[str]:
    """End as cancelled the running jobs with a cancel requested whose lease expired (their worker died
    before it saw the cancel); returns their ids. The reconciler calls it every pass."""
    now = now or utcnow()
    ids = list(session.execute(select(Job.id).where(
        Job.status == "running", Job.cancel_requested.is_(True), Job.lease_expires_at < now)).scalars())
    ended = []
    for job_id in ids:
        job = _locked_job(session, job_id)  # (read again under the lock: its worker may have finished it)
        if job is not None and job.status == "running" and job.cancel_requested and _worker_gone(job, now):
            _end_cancelled(session, job, now, "cancelled: its worker stopped before it saw the cancel")
            ended.append(job_id)
    session.flush()
    return ended


def cancel_requested_locked(session: Session, job_id: str) -> bool:
    """Whether a cancel was requested for ``job_id``, read under the job's row lock (held until the
    transaction ends: a worker registering a result reads it so, and a cancel cannot slip in after)."""
    job = _locked_job(session, job_id)
    if job is None:
        raise JobNotFound(f"no job {job_id!r}")
    return bool(job.cancel_requested)


def stale_jobs(session: Session, *, queued_for: float, now: datetime | None = None) -> list[tuple[str, str, str]]:
    """``(id, type, reason)`` of jobs the reconciler should enqueue again: running with an expired
    lease and not enqueued since it expired, or ``queued_for`` seconds ago (``lease_expired``), or
    still queued ``queued_for`` seconds after their last enqueue (``message_lost``: the broker may
    have dropped it). Each job is rung once per period, so messages do not pile up while no worker
    runs; a duplicate is harmless anyway, since a claim succeeds once."""
    now = now or utcnow()
    last_enqueue = func.coalesce(Job.enqueued_at, Job.created_at)
    rows = session.execute(
        select(Job.id, Job.type, Job.status).where(
            Job.cancel_requested.is_(False),
            or_(
                and_(Job.status == "running", Job.lease_expires_at < now,
                     or_(Job.enqueued_at.is_(None), Job.enqueued_at < Job.lease_expires_at,
                         Job.enqueued_at < now - timedelta(seconds=queued_for))),
                and_(Job.status == "queued", last_enqueue < now - timedelta(seconds=queued_for)),
            ),
        ).order_by(Job.created_at)
    )
    return [(job_id, job_type, "lease_expired" if status == "running" else "message_lost")
            for job_id, job_type, status in rows]


def mark_enqueued(session: Session, job_id: str, now: datetime | None = None) -> None:
    """Record that a message for the job was just sent (the reconciler waits before sending another)."""
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=now or utcnow()))


def add_event(session: Session, job_id: str, kind: str, message: str = "", data: dict[str, Any] | None = None) -> JobEvent:
    event = JobEvent(job_id=job_id, kind=kind, message=message, data=data or {})
    session.add(event)
    session.flush()
    return event


def list_events(session: Session, job_id: str, *, after: int = 0, limit: int = 100) -> list[JobEvent]:
    """Events with id greater than ``after``, oldest first (``after`` is the cursor)."""
    rows = session.execute(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after).order_by(JobEvent.id).limit(limit)
    )
    return list(rows.scalars())


def list_jobs(session: Session, *, limit: int = 20, after: str | None = None, status: str | None = None,
              adapter_name: str | None = None) -> tuple[list[Job], bool]:
    """Newest first, optionally only one ``status`` / ``adapter_name``; ``after`` is the id of the last
    job of the previous page (``JobNotFound`` if there is no such job). Returns (page, has_more)."""
    stmt = select(Job)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if adapter_name is not None:
        if not is_id_text(adapter_name):  # no job has such a name (and PostgreSQL refuses NUL in a query)
            return [], False
        stmt = stmt.where(Job.adapter_name == adapter_name)
    if after is not None:
        cursor = get_job(session, after)
        stmt = stmt.where(
            or_(Job.created_at < cursor.created_at, and_(Job.created_at == cursor.created_at, Job.id < cursor.id))
        )
    rows = list(session.execute(stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)).scalars())
    return rows[:limit], len(rows) > limit
