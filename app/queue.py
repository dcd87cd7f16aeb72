"""Enqueueing jobs on the Celery broker without importing the worker code.

The broker is only a doorbell: the job row (committed before :meth:`JobQueue.enqueue` is called) is
the truth, and the reconciler rings again for jobs whose message was lost.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from app.settings import Settings

logger = logging.getLogger(__name__)

QUEUE_NAME = "gpu"
TASK_NAMES = {"train": "adapterforge.train", "merge": "adapterforge.merge"}


class JobQueue(Protocol):
    def enqueue(self, job_id: str, job_type: str) -> None: ...
    def ping(self) -> None: ...


BROKER_SOCKET_TIMEOUT_SECONDS = 5.0


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API (producer) and the workers (consumers)."""
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url or "filesystem://localhost//",
        "task_default_queue": QUEUE_NAME,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "result_backend": None,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }
    if settings.uses_filesystem_broker:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
        }
    else:
        # redis: redeliver a message whose worker vanished without acking after this long
        conf["broker_transport_options"] = {
            "visibility_timeout": settings.visibility_timeout_seconds,
            # a Redis that accepts connections and never answers (hung, or its packets dropped) fails a send
            # or a ping after this long instead of blocking it (a job submission, the reconciler) for ever
            "socket_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
            "socket_connect_timeout": BROKER_SOCKET_TIMEOUT_SECONDS,
        }
    return conf


class CeleryJobQueue:
    """:class:`JobQueue` over a Celery producer (send by task name; the worker registers the tasks)."""

    def __init__(self, settings: Settings) -> None:
        from celery import Celery

        self._celery = Celery("adapterforge-api")
        self._celery.conf.update(celery_config(settings))

    def enqueue(self, job_id: str, job_type: str) -> None:
        # one quick retry, then the caller's fallback: the job row is the truth and the reconciler rings again
        # (Celery's default, three retries at growing intervals, held a submission ~26 s on a hung broker)
        self._celery.send_task(TASK_NAMES[job_type], args=[job_id], queue=QUEUE_NAME, retry=True,
                               retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5,
                                             "interval_max": 0.5})
        logger.info("enqueued %s job %s", job_type, job_id)

    def ping(self) -> None:
        with self._celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)

    def close(self) -> None:
        self._celery.close()
