"""Finds jobs the broker lost or whose worker died, and enqueues them again.

The registry is the truth and the broker only a doorbell. Every ``interval`` seconds the reconciler
enqueues (1) running jobs whose lease expired — their worker was killed; the next worker resumes
from the last checkpoint — and (2) queued jobs that no worker took within ``requeue_after`` of their
last enqueue — the message may have been lost (a broker restart without persistence). A duplicate
message is harmless: claiming a job is atomic, and a worker drops a message for a job it cannot claim.
Running jobs with a cancel requested whose lease expired (the worker died before it saw the cancel) are
ended as cancelled: no worker claims them.
"""

from __future__ import annotations

import logging
import threading

from app.db import Database
from app.metrics import ApiMetrics
from app.queue import JobQueue
from app.registry.jobs import add_event, cancel_abandoned, mark_enqueued, stale_jobs

logger = logging.getLogger(__name__)


def reconcile_once(db: Database, queue: JobQueue, *, requeue_after: float, metrics: ApiMetrics | None = None) -> int:
    """One pass; returns how many jobs were enqueued again."""
    with db.session() as session:
        for job_id in cancel_abandoned(session):
            logger.info("reconciler: job %s cancelled (its worker stopped before it saw the cancel)", job_id)
    with db.session() as session:
        stale = stale_jobs(session, queued_for=requeue_after)
    sent = 0
    for job_id, job_type, reason in stale:
        try:
            queue.enqueue(job_id, job_type)
        except Exception as exc:  # broker down: try again next pass
            logger.warning("reconciler could not enqueue job %s (%s): %s", job_id, reason, exc)
            break
        with db.session() as session:
            mark_enqueued(session, job_id)
            message = ("lease expired (worker gone); enqueued again to resume from the last checkpoint"
                       if reason == "lease_expired" else "no worker took it; enqueued again")
            add_event(session, job_id, "requeued", message, {"reason": reason})
        if metrics is not None:
            metrics.jobs_requeued.labels(reason).inc()
        logger.info("reconciler: job %s enqueued again (%s)", job_id, reason)
        sent += 1
    return sent


class Reconciler:
    """Runs :func:`reconcile_once` every ``interval`` seconds on a daemon thread."""

    def __init__(self, db: Database, queue: JobQueue, *, interval: float, requeue_after: float,
                 metrics: ApiMetrics | None = None) -> None:
        self._db, self._queue, self._metrics = db, queue, metrics
        self._interval, self._requeue_after = interval, requeue_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                reconcile_once(self._db, self._queue, requeue_after=self._requeue_after, metrics=self._metrics)
            except Exception:  # a DB hiccup must not kill the loop
                logger.exception("reconciler pass failed")
