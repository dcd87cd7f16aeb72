"""`/jobs` routes: submit train and merge jobs, list and follow them (JSON pages or live SSE), cancel.

A job is validated completely (see :mod:`app.api.job_specs`), inserted as ``queued`` and committed;
only then is the broker told (a lost message is re-sent by the reconciler, so a broker failure
does not fail the request).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.datasets import UtcDatetime
from app.api.deps import Services, ServicesDep, SessionDep
from app.api.errors import ERROR_RESPONSES, ApiError
from app.api.job_specs import JOB_TYPES, JobIn, plan_job
from app.digits import is_ascii_number
from app.registry.jobs import (
    TERMINAL,
    JobNotFound,
    create_job,
    get_job,
    list_events,
    list_jobs,
    mark_enqueued,
    request_cancel,
)
from app.registry.models import MAX_DB_INT, AdapterVersion, Job, JobEvent

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
POLL_SECONDS = 0.5  # how often a live event stream looks for new events
KEEPALIVE_SECONDS = 15.0  # comment line sent on an idle stream so proxies keep it open
_STREAM_BATCH = 500


class _JobRoute(APIRoute):
    """Reports body errors of the ``type``-tagged job union at the field the client wrote.

    pydantic puts the tag into the error location (``body.train.adapter.name``); clients sent
    ``adapter.name``. A missing or unknown tag is reported at ``type``, list items as ``sources[1]``.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise RequestValidationError(_untag(exc.errors()), body=exc.body) from None

        return route


def _untag(errors: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for err in errors:
        err = dict(err)
        loc = tuple(err.get("loc", ()))
        if loc[:1] == ("body",):
            if err.get("type") in ("union_tag_invalid", "union_tag_not_found"):
                loc = ("body", "type")
            elif loc[1:2] and loc[1] in JOB_TYPES:
                loc = ("body", *loc[2:])
        err["loc"] = _index_into_names(loc)
        out.append(err)
    return out


def _index_into_names(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``("merge", "sources", 1, "weight")`` → ``("merge", "sources[1]", "weight")``, as params are written."""
    out: list[Any] = []
    for part in loc:
        if isinstance(part, int) and out:
            out[-1] = f"{out[-1]}[{part}]"
        else:
            out.append(part)
    return tuple(out)


router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=_JobRoute)
JobIdPath = Annotated[str, Path(description="Job id (`job_...`).")]


# ------------------------------------------------------------------------------------------ response models


class ProgressOut(BaseModel):
    """Where a running job is."""

    step: int = Field(description="Optimizer steps done.")
    total_steps: int | None = Field(description="Steps the job will run in all, once known.")
    eta_seconds: float | None = Field(description="Estimated seconds until the job finishes, once known.")


class ResultOut(BaseModel):
    """The adapter version a successful job created."""

    adapter: str = Field(description="Reference to the new version, `name@N` (usable wherever a REF is).")
    version: int = Field(description="The version number N.")


class JobOut(BaseModel):
    """A train or merge job."""

    id: str = Field(description="Job id.")
    object: Literal["job"] = Field(default="job", description="Always `job`.")
    type: Literal["train", "merge"] = Field(description="Job type.")
    status: JobStatus = Field(description="queued → running → succeeded / failed / cancelled.")
    adapter_name: str = Field(description="Adapter the job creates a new version of.")
    method: str | None = Field(description="PEFT method of that adapter (e.g. lora).")
    dataset_id: str | None = Field(description="Training dataset (train jobs).")
    validation_dataset_id: str | None = Field(description="Evaluation dataset, if any (train jobs).")
    hyperparameters: dict[str, Any] | None = Field(
        description="Every hyperparameter the job trains with, defaults filled in (train jobs).")
    merge: dict[str, Any] | None = Field(
        default=None, description="Merge jobs: sources resolved to fixed versions at submit time, and the combination.")
    progress: ProgressOut = Field(description="Step, total steps and ETA.")
    metrics: dict[str, Any] = Field(description="Latest training metrics reported by the worker (e.g. loss).")
    error: dict[str, Any] | None = Field(description="Why the job failed: {code, message}; null otherwise.")
    result: ResultOut | None = Field(description="The adapter version created; null until the job succeeds.")
    attempts: int = Field(description="Times a worker started the job (a resume after a worker died counts).")
    cancel_requested: bool = Field(description="A cancel was requested; a running job stops at its next step.")
    created_at: UtcDatetime = Field(description="Submission time (UTC).")
    started_at: UtcDatetime | None = Field(description="When a worker first started it.")
    finished_at: UtcDatetime | None = Field(description="When it reached a terminal status.")


class JobList(BaseModel):
    """One page of jobs, newest first."""

    data: list[JobOut] = Field(description="The jobs on this page.")
    has_more: bool = Field(description="Whether another page follows.")
    next_cursor: str | None = Field(description="Pass as `after` to get the next page; null on the last page.")


class JobEventOut(BaseModel):
    """Something that happened to a job."""

    id: int = Field(description="Event id, increasing; the cursor of the events list and the SSE `id`.")
    kind: str = Field(description="queued, started, resumed, progress, checkpoint, cancel_requested, succeeded, "
                                  "failed, cancelled, ...")
    message: str = Field(description="Human-readable description.")
    data: dict[str, Any] = Field(description="Structured details (e.g. step and loss, checkpoint path).")
    created_at: UtcDatetime = Field(description="When it happened (UTC).")


class JobEventList(BaseModel):
    """One page of a job's events, oldest first."""

    data: list[JobEventOut] = Field(description="The events on this page.")
    has_more: bool = Field(description="Whether more events follow already.")
    next_cursor: str | None = Field(description="Pass as `after` to continue; null when no more events exist yet.")


class CheckpointOut(BaseModel):
    """A checkpoint a worker saved while training."""

    step: int = Field(description="Optimizer step the checkpoint was taken at.")
    path: str = Field(description="Where the worker saved it.")
    created_at: UtcDatetime = Field(description="When it was saved (UTC).")


class CheckpointList(BaseModel):
    """A job's checkpoints, oldest first."""

    data: list[CheckpointOut] = Field(description="Every checkpoint of the job.")
    has_more: bool = Field(default=False, description="Always false: the list is complete.")
    next_cursor: str | None = Field(default=None, description="Always null.")


def _jobs_out(session: Session, jobs: Sequence[Job]) -> list[JobOut]:
    version_ids = [j.result_version_id for j in jobs if j.result_version_id]
    numbers: dict[str, int] = {}
    if version_ids:
        rows = session.execute(select(AdapterVersion.id, AdapterVersion.version).where(AdapterVersion.id.in_(version_ids)))
        numbers = {vid: number for vid, number in rows}
    out = []
    for job in jobs:
        spec = job.spec or {}
        number = numbers.get(job.result_version_id or "")
        out.append(JobOut(
            id=job.id, type=job.type, status=job.status, adapter_name=job.adapter_name,  # type: ignore[arg-type]
            method=(spec.get("adapter") or {}).get("method"),
            dataset_id=job.dataset_id, validation_dataset_id=job.validation_dataset_id,
            hyperparameters=spec.get("hyperparameters"), merge=spec.get("merge"),
            progress=ProgressOut(step=job.step or 0, total_steps=job.total_steps, eta_seconds=job.eta_seconds),
            metrics=job.metrics or {}, error=job.error,
            result=ResultOut(adapter=f"{job.adapter_name}@{number}", version=number) if number is not None else None,
            attempts=job.attempts or 0, cancel_requested=bool(job.cancel_requested),
            created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        ))
    return out


def _job_out(session: Session, job: Job) -> JobOut:
    return _jobs_out(session, [job])[0]


def _event_out(event: JobEvent) -> JobEventOut:
    return JobEventOut(id=event.id, kind=event.kind, message=event.message or "", data=event.data or {},
                       created_at=event.created_at)


# ------------------------------------------------------------------------------------------ routes


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Submit a job",
    description="`type: train` fine-tunes a new version of `adapter.name` on `dataset_id`; `type: merge` combines "
    "existing adapter versions. Everything is validated before the job is stored (422 naming the field, e.g. "
    "`adapter.config.target_modules`, `hyperparameters.learning_rate`, `dataset_id`); the job is committed "
    "as queued, then handed to the workers.",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k in (400, 422)},
)
def submit_job(body: Annotated[JobIn, Body(description="The job to run.")], services: ServicesDep,
               session: SessionDep) -> JobOut:
    plan = plan_job(session, services.base_model, body)
    job = create_job(session, type=plan.type, adapter_name=plan.adapter_name, spec=plan.spec,
                     dataset_id=plan.dataset_id, validation_dataset_id=plan.validation_dataset_id,
                     max_attempts=services.settings.job_max_attempts)
    session.commit()
    log = {"job_id": job.id, "adapter": plan.adapter_name}
    try:
        services.queue.enqueue(job.id, job.type)
    except Exception as exc:  # the row is the truth: the reconciler sends the message again
        logger.warning("job %s stored but not enqueued (the reconciler will retry): %s", job.id, exc, extra=log)
    else:
        mark_enqueued(session, job.id)
        session.commit()
    logger.info("%s job %s submitted for adapter %s", job.type, job.id, plan.adapter_name, extra=log)
    return _job_out(session, job)


@router.get(
    "",
    response_model=JobList,
    summary="List jobs",
    description="Newest first, `limit` per page; pass the previous page's `next_cursor` as `after`. Filter by "
    "`status` and `adapter_name`.",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k == 422},
)
def get_jobs(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Jobs per page (1-100).")] = 20,
    after: Annotated[str | None, Query(description="Cursor: `next_cursor` of the previous page.")] = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    adapter_name: Annotated[str | None, Query(description="Only jobs creating versions of this adapter.")] = None,
) -> JobList:
    try:
        rows, has_more = list_jobs(session, limit=limit, after=after, status=status, adapter_name=adapter_name)
    except JobNotFound as exc:
        raise ApiError(422, f"unknown cursor {after!r}: use next_cursor of the previous page", param="after") from exc
    return JobList(data=_jobs_out(session, rows), has_more=has_more,
                   next_cursor=rows[-1].id if has_more and rows else None)


@router.get(
    "/{job_id}",
    response_model=JobOut,
    summary="Get a job",
    description="Status, progress, metrics, error and result of one job.",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k == 404},
)
def get_one_job(job_id: JobIdPath, session: SessionDep) -> JobOut:
    return _job_out(session, get_job(session, job_id))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a job",
    description="A queued job is cancelled at once; a running one gets `cancel_requested` and its worker stops at "
    "the next step. 409 for a job that already finished.",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k in (404, 409)},
)
def cancel_job(job_id: JobIdPath, session: SessionDep) -> JobOut:
    job = request_cancel(session, job_id)
    session.commit()
    logger.info("cancel requested for job %s (now %s)", job_id, job.status, extra={"job_id": job_id})
    return _job_out(session, job)


def _events_page(services: Services, job_id: str, after: int, limit: int) -> JobEventList:
    with services.db.sessions() as session:
        get_job(session, job_id)
        rows = list_events(session, job_id, after=after, limit=limit + 1)
    page, has_more = rows[:limit], len(rows) > limit
    return JobEventList(data=[_event_out(e) for e in page], has_more=has_more,
                        next_cursor=str(page[-1].id) if has_more else None)


def _poll(services: Services, job_id: str, after: int) -> tuple[list[JobEventOut], bool]:
    """New events after ``after`` and whether the job was terminal before they were read (then they are all)."""
    with services.db.sessions() as session:
        status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
        rows = list_events(session, job_id, after=after, limit=_STREAM_BATCH)
    terminal = status is None or status in TERMINAL
    return [_event_out(e) for e in rows], terminal and len(rows) < _STREAM_BATCH


def _sse(event: JobEventOut) -> str:
    return f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n"


async def _stream(request: Request, services: Services, job_id: str, after: int) -> AsyncIterator[str]:
    last_write = time.monotonic()
    while True:
        events, finished = await asyncio.to_thread(_poll, services, job_id, after)
        for event in events:
            yield _sse(event)
            after = event.id
        if events:
            last_write = time.monotonic()
        if finished:
            return
        if await request.is_disconnected():
            logger.debug("event stream of job %s: client went away", job_id)
            return
        if request.app.state.stopping.is_set():  # the server is stopping: EventSource reconnects and resumes
            logger.debug("event stream of job %s: the server is stopping", job_id)
            return
        if time.monotonic() - last_write >= KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            last_write = time.monotonic()
        await asyncio.sleep(POLL_SECONDS)


@router.get(
    "/{job_id}/events",
    response_model=JobEventList,
    summary="Job events",
    description="The job's events oldest first, a page at a time (cursor `after` = the last event id seen). With "
    "`Accept: text/event-stream`, a live Server-Sent Events stream instead: each event as `id`, `event` (its "
    "kind) and `data` (the event as JSON), resuming after `Last-Event-ID` or `after`; `: keepalive` comments "
    "while idle; the stream ends once the job has finished and all its events were sent, or when the server "
    "stops (reconnect with `Last-Event-ID` to resume).",
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
              "description": "JSON page, or an SSE stream when asked for with `Accept: text/event-stream`."},
        **{k: v for k, v in ERROR_RESPONSES.items() if k in (404, 422)},
    },
)
async def get_job_events(
    job_id: JobIdPath,
    request: Request,
    services: ServicesDep,
    after: Annotated[int, Query(ge=0, le=MAX_DB_INT, description="Only events with a larger id.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Events per page (1-1000; JSON only).")] = 100,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", description="SSE resume point "
                                                "(sent by EventSource on reconnect); wins over `after`.")] = None,
) -> Response | JobEventList:
    if "text/event-stream" not in request.headers.get("accept", ""):
        return await asyncio.to_thread(_events_page, services, job_id, after, limit)
    if last_event_id is not None:
        if not is_ascii_number(last_event_id.strip()) or int(last_event_id) > MAX_DB_INT:
            raise ApiError(422, f"Last-Event-ID must be an event id (an integer), got {last_event_id!r}",
                           param="Last-Event-ID")
        after = int(last_event_id)
    await asyncio.to_thread(_require_job, services, job_id)
    return StreamingResponse(_stream(request, services, job_id, after), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _require_job(services: Services, job_id: str) -> None:
    with services.db.sessions() as session:
        get_job(session, job_id)


@router.get(
    "/{job_id}/checkpoints",
    response_model=CheckpointList,
    summary="Job checkpoints",
    description="The checkpoints the worker keeps for the job, oldest first: its `checkpoint` events less those "
    "that `save_total_limit` has pruned since, and none once the job has ended (the worker then removes its work "
    "directory). Every checkpoint ever saved stays in the job's events.",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k == 404},
)
def get_job_checkpoints(job_id: JobIdPath, session: SessionDep) -> CheckpointList:
    job = get_job(session, job_id)
    if job.status in TERMINAL:
        return CheckpointList(data=[])
    rows = list(session.execute(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.kind == "checkpoint").order_by(JobEvent.id)
    ).scalars())
    data = []
    for event in rows:
        step, path = (event.data or {}).get("step"), (event.data or {}).get("path")
        if isinstance(step, int) and isinstance(path, str):
            data.append(CheckpointOut(step=step, path=path, created_at=event.created_at))
        else:
            logger.warning("job %s: malformed checkpoint event %s skipped", job_id, event.id, extra={"job_id": job_id})
    limit = ((job.spec or {}).get("hyperparameters") or {}).get("save_total_limit")
    if isinstance(limit, int) and limit >= 1:  # the worker deletes all but the newest `limit`
        data = data[-limit:]
    return CheckpointList(data=data)
