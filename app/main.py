"""The FastAPI application: ``create_app(settings)``.

The lifespan checks the database schema (refusing to start on an out-of-date one, saying what to
run), opens the artifact store, loads the base model's tokenizer and architecture, connects the job
queue and starts the reconciler. Routers live in :mod:`app.api`, one per resource.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from app.api import adapters, datasets, generate, health, jobs, openai_compat
from app.api.auth import ApiKeyMiddleware
from app.api.body_limit import BodyLimitMiddleware
from app.api.deps import Services
from app.api.errors import install_error_handlers, use_error_schema_for_validation
from app.api.json_body import reject_repeated_json_keys
from app.api.query_params import reject_unknown_query_params
from app.base_model import BaseModelHost
from app.db import Database
from app.metrics import ApiMetrics
from app.queue import CeleryJobQueue, JobQueue
from app.reconciler import Reconciler
from app.registry.migrate import current_revision, head_revision
from app.serving.host import ServingHost
from app.settings import Settings
from app.storage import LocalArtifactStore, remove_stale

logger = logging.getLogger(__name__)

_DESCRIPTION = """\
Fine-tuning as a service: upload a JSONL dataset, `POST /jobs` to train a PEFT adapter on the
server's base model, browse every adapter version with its lineage, upload and download adapters in
the HF PEFT format, and generate with any of them (`POST /generate?adapter=name`, or the
OpenAI-compatible `/v1` routes) on the one resident base model. Errors always have the shape
`{"error": {"code", "message", "param"}}`; unknown body fields and query parameters are refused (422
naming them), never ignored.
"""


STALE_UPLOAD_SECONDS = 3600.0


class SchemaOutOfDate(RuntimeError):
    """The database is not at the schema revision this code needs."""


def check_schema(url: str) -> None:
    current, head = current_revision(url), head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"the database schema is at revision {current or 'none (empty database)'} but this server needs {head}: "
            "run `adapterforge db upgrade` (with the same ADAPTERFORGE_DATABASE_URL) and start again"
        )


def pin_adapters(services: Services, refs: list[str]) -> None:
    """Load the versions ``refs`` name now into host memory and pin them (never evicted). A ref that names no
    adapter (not uploaded yet, or deleted since it was configured) is logged and skipped, so that a deletion
    cannot keep the server from starting again; ``serving.pinned`` (``/readyz``) says what each ref pinned."""
    from app.api.inference import resolve_version
    from app.serving.errors import AdapterNotFound

    assert services.serving is not None
    for ref in dict.fromkeys(refs):
        try:
            version = resolve_version(services, ref, "pinned_adapters")
        except AdapterNotFound as exc:
            logger.warning("serving: ADAPTERFORGE_PINNED_ADAPTERS names %r, which is not pinned: %s", ref, exc)
            services.serving.pinned[ref] = None
            continue
        lease = services.serving.lease(version, services.store)
        services.serving.bank.pin(version.id)
        services.serving.bank.release(lease)
        services.serving.pinned[ref] = version.ref
        logger.info("serving: pinned adapter %s", version.ref)


class _MetricsMiddleware:
    """Counts requests and their latency by route template (pure ASGI: no cost on streaming bodies)."""

    def __init__(self, app: Any, metrics: ApiMetrics) -> None:
        self.app, self.metrics = app, metrics
        self._paths: dict[Any, str] | None = None  # route template by endpoint, for Starlette's own routes

    def _path(self, scope: MutableMapping[str, Any]) -> str:
        """The matched route's template: FastAPI's routes put themselves in the scope; Starlette's (the
        OpenAPI document and its pages) only their endpoint. ``unmatched`` when no route matched."""
        route = scope.get("route")
        if route is not None:
            return str(route.path)
        endpoint = scope.get("endpoint")
        if endpoint is None:
            return "unmatched"
        if self._paths is None:
            self._paths = {r.endpoint: r.path for r in getattr(scope.get("app"), "routes", ())
                           if hasattr(r, "endpoint") and hasattr(r, "path")}
        return self._paths.get(endpoint, "unmatched")

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = self._path(scope)
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(scope["method"], path).observe(time.perf_counter() - start)


def create_app(settings: Settings | None = None, *, queue: JobQueue | None = None,
               base_model: BaseModelHost | None = None, serving: ServingHost | None = None) -> FastAPI:
    """The API app. ``queue``, ``base_model`` and ``serving`` may be injected (tests; the caller then owns
    them); otherwise built from settings."""
    settings = settings or Settings()
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        url = settings.resolved_database_url
        await asyncio.to_thread(check_schema, url)
        db = Database(url)
        store = LocalArtifactStore(settings.store_dir)
        # leftovers of crashed uploads; recent ones may belong to other processes sharing DATA_DIR
        store.clean_temp(older_than=STALE_UPLOAD_SECONDS)
        remove_stale((settings.data_dir / "uploads").glob("adapter-*"), STALE_UPLOAD_SECONDS)
        host = base_model if base_model is not None else await asyncio.to_thread(BaseModelHost.load, settings)
        job_queue = queue or CeleryJobQueue(settings)
        server = serving
        if server is None and settings.serving_enabled:
            server = await asyncio.to_thread(ServingHost.load, settings, metrics.serving)
        app.state.services = Services(settings, db, store, job_queue, host, metrics, server)
        if server is not None and settings.pinned_adapters:
            try:
                await asyncio.to_thread(pin_adapters, app.state.services, settings.pinned_adapters)
            except BaseException:
                if serving is None:
                    server.close()
                raise
        reconciler = None
        if settings.reconcile_interval_seconds > 0:
            reconciler = Reconciler(db, job_queue, interval=settings.reconcile_interval_seconds,
                                    requeue_after=settings.requeue_after_seconds, metrics=metrics)
            reconciler.start()
        logger.info("AdapterForge API ready: base model %s, database %s", host.name, db.engine.url.render_as_string())
        try:
            yield
        finally:
            if reconciler is not None:
                reconciler.stop()
            if server is not None and serving is None:
                server.close()
            close = getattr(job_queue, "close", None)
            if close is not None and queue is None:
                close()
            db.dispose()

    app = FastAPI(
        title="AdapterForge",
        version="0.1.0",
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    # set by whoever stops the server (``adapterforge up`` on Ctrl-C): streams that would otherwise run
    # for as long as a job trains (its event stream) end, so the server's graceful shutdown can finish
    app.state.stopping = threading.Event()
    install_error_handlers(app)
    known_params = Depends(reject_unknown_query_params)
    auth = [known_params, Depends(reject_repeated_json_keys)]  # (the API key: ApiKeyMiddleware, before routing)
    app.include_router(health.router, dependencies=[known_params])  # probes stay open; /metrics is behind the key
    app.include_router(health.metrics_router, dependencies=auth)
    app.include_router(datasets.router, dependencies=auth)
    app.include_router(jobs.router, dependencies=auth)
    app.include_router(adapters.router, dependencies=auth)
    app.include_router(generate.router, dependencies=auth)
    app.include_router(openai_compat.router, dependencies=auth)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)  # (after the key check)
    app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # (outermost: refused requests are counted too)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = use_error_schema_for_validation(
                get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
