"""Celery tasks: take a job id, hand it to the runner. The job row is the record; results are ignored.

Late acks and redelivery on a lost worker come from the app's configuration; duplicates are harmless
because the runner runs a job only after claiming its lease.
"""

from __future__ import annotations

import threading

from celery.exceptions import Reject

from app.queue import TASK_NAMES
from app.settings import Settings
from worker.celery_app import app
from worker.runner import WorkerContext, run_merge_job, run_train_job

#: Set when the worker process starts shutting down: a running job then hands its lease back.
SHUTDOWN = threading.Event()
_context: WorkerContext | None = None
_lock = threading.Lock()


def context() -> WorkerContext:
    """The process's worker context (database, store, resident model), created on first use."""
    global _context
    with _lock:
        if _context is None:
            _context = WorkerContext.from_settings(Settings(), shutdown=SHUTDOWN)
        return _context


def _not_while_shutting_down(job_id: str) -> None:
    """A worker shutting down may still be handed its prefetched message: it goes back to the queue for the next
    worker (acknowledged, it was gone: the job waited for the reconciler's requeue, minutes)."""
    if SHUTDOWN.is_set():
        raise Reject(f"job {job_id}: this worker is shutting down", requeue=True)


@app.task(name=TASK_NAMES["train"], ignore_result=True, acks_late=True)
def train(job_id: str) -> None:
    """Run train job ``job_id`` (a no-op when another worker holds it or it has ended)."""
    _not_while_shutting_down(job_id)
    run_train_job(job_id, context())


@app.task(name=TASK_NAMES["merge"], ignore_result=True, acks_late=True)
def merge(job_id: str) -> None:
    """Run merge job ``job_id``."""
    _not_while_shutting_down(job_id)
    run_merge_job(job_id, context())
