"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import func, select

from app.api.deps import Services, ServicesDep
from app.registry.models import AdapterVersion, Job

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
metrics_router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness", description="200 while the process serves HTTP.")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


PROBE_TIMEOUT_SECONDS = 5.0  # a dependency that does not answer by then is down, as far as probes go


# the probes' own threads: a dependency that hangs holds these, never the default pool that the API's other
# routes run their blocking work on (a load balancer polling /readyz would otherwise starve them)
_PROBES = ThreadPoolExecutor(max_workers=4, thread_name_prefix="probe")


async def _probe(ping: Callable[[], object]) -> dict[str, Any]:
    """``ping`` (blocking) on a probe thread: ``{"ok": True}``, or why not, within :data:`PROBE_TIMEOUT_SECONDS`."""
    try:
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(_PROBES, ping), PROBE_TIMEOUT_SECONDS)
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {PROBE_TIMEOUT_SECONDS:g} s"}
    except Exception as exc:
        return {"ok": False, "error": f"{exc.__class__.__name__}: {exc}"[:300]}
    return {"ok": True}


async def _checks(services: Services) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    checks["database"], checks["broker"] = await asyncio.gather(_probe(services.db.ping),
                                                                _probe(services.queue.ping))
    name = services.base_model.name  # a local directory's own name only: no server path on an open route
    checks["base_model"] = {"ok": services.base_model is not None,
                            "name": Path(name).name if Path(name).is_absolute() else name}
    serving = services.serving
    if serving is None:
        checks["serving"] = {"ok": True, "enabled": False}
    else:
        checks["serving"] = {"ok": serving.engine.alive, "enabled": True, "queued": serving.engine.queue_depth,
                             "running": serving.engine.running_rows, **serving.lora_kernel,
                             **_pinned_counts(serving.pinned)}
    return checks


def _pinned_counts(pinned: dict[str, str | None]) -> dict[str, int]:
    """How many ADAPTERFORGE_PINNED_ADAPTERS refs pinned a version at start and how many named nothing (counts: the
    probe needs no API key, and adapter names are the tenants' own; the log names the skipped refs)."""
    if not pinned:
        return {}
    missing = sum(1 for version in pinned.values() if version is None)
    return {"pinned": len(pinned) - missing, "pinned_missing": missing}


@router.get(
    "/readyz",
    summary="Readiness",
    description="200 when the database and the broker answer, the base model is loaded and (unless disabled) "
    "the generation engine runs; 503 otherwise, with each check's result.",
    responses={503: {"description": "a dependency is down"}},
)
async def readyz(services: ServicesDep) -> JSONResponse:
    checks = await _checks(services)
    ready = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


def _refresh_gauges(services: Services) -> None:
    with services.db.sessions() as session:
        counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        for status in ("queued", "running", "succeeded", "failed", "cancelled"):
            services.metrics.jobs.labels(status).set(counts.get(status, 0))
        live = session.execute(
            select(func.count()).select_from(AdapterVersion).where(AdapterVersion.deleted_at.is_(None))
        ).scalar_one()
        services.metrics.adapter_versions.set(live)


@metrics_router.get("/metrics", summary="Prometheus metrics", description="Request counts and latencies, jobs by status, "
            "live adapter versions, reconciler requeues and, where the server generates, generations by adapter "
            "and outcome, prompt and generated tokens, time to first token, inter-token latency, queue depth, "
            "running rows, adapter cache hits, misses and evictions and slots used, in the Prometheus text format.",
                    response_class=PlainTextResponse)
async def metrics(services: ServicesDep) -> Response:
    try:
        await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(_PROBES, _refresh_gauges, services),
                               PROBE_TIMEOUT_SECONDS)
    except TimeoutError:  # metrics must still answer when the database is down, or does not answer
        logger.warning("could not refresh registry gauges: no answer within %g s", PROBE_TIMEOUT_SECONDS)
    except Exception as exc:
        logger.warning("could not refresh registry gauges: %s", exc)
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
