"""The workers' Celery app: ``celery -A worker.celery_app worker -Q gpu -c 1`` (one process per GPU).

Configuration comes from :func:`app.queue.celery_config` over the ``ADAPTERFORGE_*`` settings, the
same the API uses to enqueue, so both sides agree on broker, queue and delivery guarantees (late
acks, redelivery when a worker is lost, one message prefetched, results ignored).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from celery import Celery, signals
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.engine import make_url

from app.queue import celery_config
from app.settings import Settings

logger = logging.getLogger("worker")

#: Set by ``adapterforge up`` for the worker it supervises: the worker stops when that process is gone.
SUPERVISOR_PID_ENV = "ADAPTERFORGE_SUPERVISOR_PID"

settings = Settings()
app = Celery("adapterforge-worker", include=["worker.tasks"])
app.conf.update(celery_config(settings))


@signals.worker_ready.connect
def _log_start(**_: Any) -> None:
    """Say which base model, broker and database this worker uses (building the demo model if needed)."""
    from app.base_model import resolve_base_model

    source = resolve_base_model(settings)
    database = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    logger.info("AdapterForge worker starting: base model %s (%s), device %s, broker %s, database %s",
                source.name, source.path, settings.device, maybe_sanitize_url(app.conf.broker_url), database)
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if supervisor and supervisor.isdigit():
        threading.Thread(target=_exit_with_supervisor, args=(int(supervisor),), name="supervisor-watch",
                         daemon=True).start()


def _exit_with_supervisor(pid: int) -> None:
    """Shut down (handing the running job back) once ``adapterforge up`` is gone, e.g. killed -9."""
    while os.getppid() == pid:
        time.sleep(2.0)
    logger.warning("the supervising `adapterforge up` (pid %d) is gone: shutting down", pid)
    os.kill(os.getpid(), signal.SIGTERM)


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    """A running job stops at its next step and hands its lease back (it resumes from its checkpoint)."""
    from worker.tasks import SHUTDOWN

    SHUTDOWN.set()
