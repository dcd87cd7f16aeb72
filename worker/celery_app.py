"""The workers' Celery app: ``celery -A worker.celery_app worker -Q gpu -c 1`` (one process per GPU).

Configuration comes from :func:`app.queue.celery_config` over the ``ADAPTERFORGE_*`` settings, the
same the API uses to enqueue, so both sides agree on broker, queue and delivery guarantees (late
acks, redelivery when a worker is lost, one message prefetched, results ignored).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, signals
from kombu.utils.url import maybe_sanitize_url
from sqlalchemy.engine import make_url

from app.queue import celery_config
from app.settings import Settings

logger = logging.getLogger("worker")

settings = Settings()
app = Celery("adapterforge-worker", include=["worker.tasks"])
app.conf.update(celery_config(settings))


@signals.worker_init.connect
def _log_start(**_: Any) -> None:
    """Say which base model, broker and database this worker uses (building the demo model if needed)."""
    from app.base_model import resolve_base_model

    source = resolve_base_model(settings)
    database = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    logger.info("AdapterForge worker starting: base model %s (%s), device %s, broker %s, database %s",
                source.name, source.path, settings.device, maybe_sanitize_url(app.conf.broker_url), database)


@signals.worker_shutting_down.connect
def _on_shutdown(**_: Any) -> None:
    """A running job stops at its next step and hands its lease back (it resumes from its checkpoint)."""
    from worker.tasks import SHUTDOWN

    SHUTDOWN.set()
