"""What a worker does with a job id, callable without Celery: ``run_train_job`` / ``run_merge_job``.

A job runs only while this worker holds its lease: claimed first (a job another worker holds, a
cancelled one, or one out of attempts is left alone), renewed by a heartbeat thread every third of
the lease. When the heartbeat or a progress write finds the lease lost or a cancel requested, the
training loop stops at its next step. Work happens in ``DATA_DIR/jobs/<job id>`` (a shared volume
in production): the dataset copies and the checkpoints, so a job claimed again after its worker
died resumes from the last checkpoint. A finished run stores the adapter's files in the artifact
store (a PiSSA / OLoRA adapter converted first to the plain LoRA of the real base, its weights checked
finite) and, in one transaction that first reads the job's cancel flag under its row lock, registers the
adapter version and marks the job succeeded (or, cancelled meanwhile, cancelled with nothing registered).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from adapters_core.config import CONFIG_NAME, AdapterConfig, config_from_dict
from adapters_core.errors import AdapterError, ConfigError, NonFiniteWeightsError, TrainingDiverged
from adapters_core.methods.lora.convert import convert_saved
from adapters_core.peft_format import check_finite, read_adapter_weights
from adapters_core.training.api import INITIAL_ADAPTER_DIR, TrainOutcome, train_adapter
from adapters_core.training.data import DataError
from adapters_core.training.hyperparameters import Hyperparameters
from adapters_core.training.loop import EvalResult, Progress, TrainingCallbacks, latest_checkpoint
from app.db import Database
from app.registry.adapters import RegistryError, VersionSpec, check_method, create_version
from app.registry.datasets import DatasetNotFound, get_dataset
from app.registry.jobs import (
    TERMINAL,
    JobConflict,
    add_event,
    cancel_requested_locked,
    claim,
    finish,
    get_job,
    heartbeat,
)
from app.registry.models import Job
from app.registry.progress import release_lease, update_progress
from app.settings import Settings
from app.storage import LocalArtifactStore, iter_file
from worker.model_cache import ModelCache

logger = logging.getLogger(__name__)

#: The job's progress is written to its row at most this often (the last step always).
PROGRESS_WRITE_INTERVAL = 0.5
#: A ``progress`` event is added at most this often (the first and last steps always).
PROGRESS_EVENT_INTERVAL = 5.0
#: Name of the job's adapter on the resident model while it trains (not "training": ParameterDict keys
#: become attributes of nn.Module, and "training" is one of them).
TRAINING_SLOT = "job_adapter"
MERGE_NOT_SUPPORTED = {
    "code": "not_supported",
    "message": "merge jobs are accepted and validated, but this server has no merge engine yet",
}


class JobSpecError(ValueError):
    """The job row does not describe a runnable job (malformed spec, missing dataset id)."""


@dataclass
class WorkerContext:
    """What the runner needs: settings, database, artifact store, the resident model, and an event
    set when the worker process is shutting down (running jobs then hand their lease back)."""

    settings: Settings
    db: Database
    store: LocalArtifactStore
    models: ModelCache
    shutdown: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def from_settings(cls, settings: Settings, *, shutdown: threading.Event | None = None) -> WorkerContext:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings, Database(settings.resolved_database_url, pool_size=2),
                   LocalArtifactStore(settings.store_dir), ModelCache(settings), shutdown or threading.Event())

    def close(self) -> None:
        self.db.dispose()


def new_owner() -> str:
    """A lease owner id unique to this attempt: ``host:pid:random``."""
    return f"{socket.gethostname()[:90]}:{os.getpid()}:{secrets.token_hex(4)}"


def job_workdir(settings: Settings, job_id: str) -> Path:
    return settings.data_dir / "jobs" / job_id


# ---------------------------------------------------------------------------------------- leases
class LeaseKeeper:
    """Renews the lease every ``lease_seconds / 3`` on a daemon thread. Sets ``stop`` when the lease is
    lost or a cancel was requested, or when renewals have failed (database unreachable) for a whole
    lease: another worker may have taken the job by then."""

    def __init__(self, db: Database, job_id: str, owner: str, lease_seconds: float, stop: threading.Event) -> None:
        self._db, self._job_id, self._owner = db, job_id, owner
        self._lease, self._stop = lease_seconds, stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._done.wait(self._lease / 3):
            try:
                with self._db.session() as session:
                    held = heartbeat(session, self._job_id, self._owner, self._lease)
            except Exception as exc:
                logger.warning("job %s: lease renewal failed: %s", self._job_id, exc)
                if time.monotonic() - last_ok > self._lease:
                    logger.error("job %s: no lease renewal for %.0fs; stopping", self._job_id, self._lease)
                    self._stop.set()
                    return
                continue
            if not held:
                logger.info("job %s: cancel requested or lease lost; stopping at the next step", self._job_id)
                self._stop.set()
                return
            last_ok = time.monotonic()


# ---------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class TrainSpec:
    """A train job's spec, parsed: method, engine config, hyperparameters."""

    method: str
    config: AdapterConfig
    hyperparameters: Hyperparameters


def parse_train_spec(spec: dict[str, Any]) -> TrainSpec:
    """A train job's spec → engine objects (``ConfigError`` names a bad field).

    The method and config are read from ``spec["adapter"]`` (``{"name", "method", "config"}``, as
    ``POST /jobs`` stores them) or from top-level ``method`` / ``config`` keys.
    """
    adapter = spec.get("adapter")
    source = adapter if isinstance(adapter, dict) else spec
    method = source.get("method", "lora")
    config = source.get("config") or {}
    hp = spec.get("hyperparameters") or {}
    if not isinstance(method, str) or not method:
        raise JobSpecError(f"spec.method must be a method name, got {method!r}")
    if not isinstance(config, dict):
        raise JobSpecError(f"spec.config must be an object, got {type(config).__name__}")
    if not isinstance(hp, dict):
        raise JobSpecError(f"spec.hyperparameters must be an object, got {type(hp).__name__}")
    return TrainSpec(method.lower(), config_from_dict({**config, "peft_type": method.upper()}),
                     Hyperparameters.from_dict(hp))


def _error_for(exc: Exception) -> dict[str, Any]:
    """The job error a user sees for a problem with their input."""
    if isinstance(exc, TrainingDiverged):
        return {"code": "training_diverged", "message": str(exc)}
    if isinstance(exc, DataError):
        return {"code": "invalid_data", "message": str(exc)}
    if isinstance(exc, ConfigError):
        return {"code": "invalid_config", "message": str(exc), "param": exc.field}
    if isinstance(exc, AdapterError | JobSpecError):
        return {"code": "invalid_config", "message": str(exc)}
    if isinstance(exc, DatasetNotFound):
        return {"code": "dataset_not_found", "message": str(exc)}
    return {"code": "invalid_input", "message": str(exc), "param": getattr(exc, "param", None)}


_INPUT_ERRORS = (DataError, AdapterError, JobSpecError, DatasetNotFound, RegistryError)


# ---------------------------------------------------------------------------------------- callbacks
class JobReporter:
    """:class:`TrainingCallbacks` writing a job's progress, metrics and events to its row (only while
    its lease is held). ``should_cancel`` is true once ``stop`` is set (by the lease keeper, a progress
    write that found the lease gone or a cancel requested, or the worker shutting down)."""

    def __init__(self, ctx: WorkerContext, job_id: str, owner: str, stop: threading.Event,
                 metrics: dict[str, Any], observer: TrainingCallbacks | None = None) -> None:
        self._ctx, self._job_id, self._owner, self._stop = ctx, job_id, owner, stop
        self._observer = observer
        self.metrics: dict[str, Any] = dict(metrics)
        self._last_write = self._last_event = float("-inf")
        self._unwritten: Progress | None = None

    def _write(self, *, event: tuple[str, str, dict[str, Any]] | None = None, **progress: Any) -> None:
        try:
            with self._ctx.db.session() as session:
                keep_going = update_progress(session, self._job_id, self._owner, metrics=self.metrics, **progress)
                if keep_going and event is not None:
                    add_event(session, self._job_id, *event)
        except Exception as exc:  # a database hiccup must not kill the run; the lease keeper decides
            logger.warning("job %s: could not record progress: %s", self._job_id, exc)
            return
        if not keep_going:
            self._stop.set()

    def on_progress(self, progress: Progress) -> None:
        self.metrics.update(loss=progress.loss, learning_rate=progress.learning_rate,
                            tokens_per_second=progress.tokens_per_second, epoch=progress.epoch)
        self._unwritten = progress
        now = time.monotonic()
        last = progress.step >= progress.total_steps
        if last or now - self._last_write >= PROGRESS_WRITE_INTERVAL:
            self._unwritten = None
            event = None
            if last or now - self._last_event >= PROGRESS_EVENT_INTERVAL:
                data = {"step": progress.step, "total_steps": progress.total_steps,
                        "eta_seconds": progress.eta_seconds, **self.metrics}
                event = ("progress", f"step {progress.step}/{progress.total_steps} loss {progress.loss:.4f}", data)
                self._last_event = now
            self._write(step=progress.step, total_steps=progress.total_steps, eta_seconds=progress.eta_seconds,
                        event=event)
            self._last_write = now
        if self._observer is not None:
            self._observer.on_progress(progress)

    def on_eval(self, result: EvalResult) -> None:
        self.metrics.update(eval_loss=result.loss, eval_token_accuracy=result.token_accuracy)
        best = self.metrics.get("best_eval_loss")
        if best is None or result.loss < best:
            self.metrics.update(best_eval_loss=result.loss, best_eval_token_accuracy=result.token_accuracy,
                                best_step=result.step)
        data = {"step": result.step, "eval_loss": result.loss, "eval_token_accuracy": result.token_accuracy}
        self._write(event=("eval", f"step {result.step}: eval loss {result.loss:.4f}", data))
        if self._observer is not None:
            self._observer.on_eval(result)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._write(event=("checkpoint", f"checkpoint at step {step}", {"step": step, "path": str(path)}))
        if self._observer is not None:
            self._observer.on_checkpoint(step, path)

    def flush(self) -> None:
        """Write the last step's progress if throttling held it back (a run that stopped early)."""
        if self._unwritten is not None:
            p, self._unwritten = self._unwritten, None
            self._write(step=p.step, total_steps=p.total_steps, eta_seconds=p.eta_seconds)

    def should_cancel(self) -> bool:
        if self._ctx.shutdown.is_set():
            self._stop.set()
        return self._stop.is_set() or (self._observer is not None and self._observer.should_cancel())

    def final_metrics(self, outcome: TrainOutcome) -> dict[str, Any]:
        """The metrics recorded on the job and its adapter version."""
        result = outcome.result
        metrics = dict(self.metrics)
        if result.losses:
            metrics["train_loss"] = result.losses[-1]
        metrics["steps"] = result.global_step
        if result.status == "early_stopped" and "best_eval_loss" in self.metrics:
            # the registered adapter is the best checkpoint: report its evaluation
            metrics.update(eval_loss=self.metrics["best_eval_loss"],
                           eval_token_accuracy=self.metrics["best_eval_token_accuracy"], early_stopped=True)
        return metrics


# ---------------------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class _JobInfo:
    id: str
    type: str
    adapter_name: str
    dataset_id: str | None
    validation_dataset_id: str | None
    spec: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def of(cls, job: Job) -> _JobInfo:
        return cls(job.id, job.type, job.adapter_name, job.dataset_id, job.validation_dataset_id,
                   dict(job.spec or {}), dict(job.metrics or {}))


def _shutting_down(ctx: WorkerContext, job_id: str) -> bool:
    """A worker that is shutting down takes no new job (Celery may still hand it a prefetched message)."""
    if ctx.shutdown.is_set():
        logger.info("job %s left for another worker: this one is shutting down", job_id)
        return True
    return False


def _claim(ctx: WorkerContext, job_id: str, owner: str) -> _JobInfo | None:
    with ctx.db.session() as session:
        job = claim(session, job_id, owner, ctx.settings.job_lease_seconds)
        info = _JobInfo.of(job) if job is not None else None
    if info is None:
        logger.info("job %s not claimed (another worker holds it, it was cancelled or finished, "
                    "or it ran out of attempts)", job_id)
    else:
        logger.info("job %s claimed by %s", job_id, owner)
    return info


def _finish(ctx: WorkerContext, job_id: str, owner: str, status: str, error: dict[str, Any] | None = None) -> str | None:
    try:
        with ctx.db.session() as session:
            finish(session, job_id, owner, status, error=error)
    except JobConflict as exc:
        logger.warning("job %s: could not mark it %s, the lease was lost: %s", job_id, status, exc)
        return None
    logger.info("job %s %s%s", job_id, status, f": {error['message']}" if error else "")
    return status


def _hand_back(ctx: WorkerContext, job_id: str, owner: str, why: str, *, orderly: bool = False) -> None:
    """Let the lease lapse so the reconciler enqueues the job again and it resumes from its checkpoint.

    An ``orderly`` hand-back (the worker shutting down) does not count as one of the job's attempts.
    """
    try:
        with ctx.db.session() as session:
            if release_lease(session, job_id, owner, refund_attempt=orderly):
                add_event(session, job_id, "interrupted", f"{why}; the job resumes from its last checkpoint")
    except Exception:
        logger.exception("job %s: could not hand the lease back (it expires on its own)", job_id)
    logger.info("job %s handed back: %s", job_id, why)


def _copy_dataset(ctx: WorkerContext, dataset_id: str, dest: Path) -> Path:
    """Copy a stored dataset to ``dest``, checking its bytes against the registered sha256."""
    with ctx.db.session() as session:
        expected = get_dataset(session, dataset_id).sha256
    digest = hashlib.sha256()
    tmp = dest.with_suffix(".part")
    with ctx.store.open(expected) as src, tmp.open("wb") as out:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"dataset {dataset_id}: stored bytes do not match their sha256 {expected}")
    os.replace(tmp, dest)
    return dest


def _store_adapter(store: LocalArtifactStore, directory: Path) -> tuple[dict[str, Any], int]:
    """Store every file of the saved adapter; ``({filename: {sha256, size}}, total size)``."""
    files: dict[str, Any] = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        with path.open("rb") as f:
            ref = store.put(iter_file(f))
        files[path.name] = {"sha256": ref.sha256, "size": ref.size}
    return files, sum(f["size"] for f in files.values())


# ---------------------------------------------------------------------------------------- train
def run_train_job(job_id: str, ctx: WorkerContext, *, observer: TrainingCallbacks | None = None) -> str | None:
    """Run train job ``job_id`` if it can be claimed; returns the terminal status written, or ``None``
    when the job was not claimed or was handed back / lost before it ended.

    ``observer`` receives the training callbacks after the job's own (tools and tests watch a run
    with it; its ``should_cancel`` can stop the run).
    """
    if _shutting_down(ctx, job_id):
        return None
    ctx.models.get()  # load before claiming: a worker that cannot load its model must not take jobs
    owner = new_owner()
    job = _claim(ctx, job_id, owner)
    if job is None:
        _remove_if_ended(ctx, job_id)  # (out of attempts, or cancelled after its worker went: its checkpoints)
        return None
    stop = threading.Event()
    keeper = LeaseKeeper(ctx.db, job_id, owner, ctx.settings.job_lease_seconds, stop)
    keeper.start()
    workdir = job_workdir(ctx.settings, job_id)
    status: str | None = None
    try:
        status = _train(ctx, job, owner, workdir, stop, observer)
    except _INPUT_ERRORS as exc:
        keeper.stop()
        status = _finish(ctx, job_id, owner, "failed", _error_for(exc))
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        keeper.stop()
        status = _finish(ctx, job_id, owner, "failed", {"code": "internal", "message": _internal_message(exc)})
    except BaseException:  # KeyboardInterrupt, SystemExit: this process is going away
        keeper.stop()
        _hand_back(ctx, job_id, owner, "the worker was interrupted")
        raise
    finally:
        keeper.stop()
    if status in TERMINAL:
        shutil.rmtree(workdir, ignore_errors=True)
    return status


def _internal_message(exc: Exception) -> str:
    """What a job's ``internal`` error says: the database driver's own words for a database error (the
    statement and its parameters stay in the worker's log), the exception otherwise."""
    driver_error = getattr(exc, "orig", None) if isinstance(exc, SQLAlchemyError) else None
    if driver_error is not None:
        return f"internal error: the database refused a write: {driver_error}"[:1000]
    return f"internal error: {exc.__class__.__name__}: {exc}"[:1000]


def _remove_if_ended(ctx: WorkerContext, job_id: str) -> None:
    """Remove the work directory of a job that has ended (a message for it may still arrive)."""
    try:
        with ctx.db.session() as session:
            ended = get_job(session, job_id).status in TERMINAL
    except Exception:  # no such job, or no database now: leave the directory
        return
    if ended:
        shutil.rmtree(job_workdir(ctx.settings, job_id), ignore_errors=True)


def _train(ctx: WorkerContext, job: _JobInfo, owner: str, workdir: Path, stop: threading.Event,
           observer: TrainingCallbacks | None) -> str | None:
    if job.type != "train":
        raise JobSpecError(f"job {job.id} is a {job.type!r} job, not a train job")
    if not job.dataset_id:
        raise JobSpecError("a train job needs a dataset_id")
    spec = parse_train_spec(job.spec)
    workdir.mkdir(parents=True, exist_ok=True)
    train_path = _copy_dataset(ctx, job.dataset_id, workdir / "train.jsonl")
    eval_path = None
    if job.validation_dataset_id:
        eval_path = _copy_dataset(ctx, job.validation_dataset_id, workdir / "validation.jsonl")
    resume = latest_checkpoint(workdir / "checkpoints")
    if resume is not None:
        step = int(resume.name.rsplit("-", 1)[-1])
        with ctx.db.session() as session:
            add_event(session, job.id, "resumed_from_checkpoint", f"resuming from the checkpoint at step {step}",
                      {"step": step})
        logger.info("job %s resumes from %s", job.id, resume)
    reporter = JobReporter(ctx, job.id, owner, stop, job.metrics, observer)
    with ctx.models.job_model(spec.config) as (model, tokenizer):
        outcome = train_adapter(model, tokenizer, TRAINING_SLOT, spec.config, train_path, spec.hyperparameters,
                                workdir, eval_data=eval_path, callbacks=reporter, resume_from=resume)
    reporter.flush()
    if outcome.result.status == "cancelled":
        return _stopped(ctx, job.id, owner)
    return _register(ctx, job, owner, spec, outcome, reporter.final_metrics(outcome))


def _stopped(ctx: WorkerContext, job_id: str, owner: str) -> str | None:
    """The loop stopped early: a cancel, the worker shutting down, or the lease lost."""
    with ctx.db.session() as session:
        cancel_requested = get_job(session, job_id).cancel_requested
    if cancel_requested:
        return _finish(ctx, job_id, owner, "cancelled")
    if ctx.shutdown.is_set():
        _hand_back(ctx, job_id, owner, "the worker is shutting down", orderly=True)
        return None
    logger.warning("job %s: lease lost; another worker resumes it from its last checkpoint", job_id)
    return None


def _register(ctx: WorkerContext, job: _JobInfo, owner: str, spec: TrainSpec, outcome: TrainOutcome,
              metrics: dict[str, Any]) -> str | None:
    """Store the adapter's files, then register the version and finish the job in one transaction."""
    result = outcome.result
    adapter_dir = outcome.adapter_dir
    if result.status == "early_stopped":
        best = result.best_checkpoint or adapter_dir.parent / "checkpoints" / "best"
        if (best / CONFIG_NAME).exists():
            adapter_dir = best
    # PiSSA / OLoRA: registered as the plain LoRA of the real base model (the trained files only fit the
    # base their initialisation rewrote, which serving and uploads refuse)
    convert_saved(adapter_dir, outcome.adapter_dir.parent / INITIAL_ADAPTER_DIR)
    try:
        check_finite(read_adapter_weights(adapter_dir))
    except NonFiniteWeightsError as exc:  # the last steps overflowed: serving would refuse these weights
        raise TrainingDiverged(f"the trained weights hold NaN or Inf ({exc}): the run diverged (lower "
                               "learning_rate, or set max_grad_norm); nothing was registered") from exc
    files, size = _store_adapter(ctx.store, adapter_dir)
    config = json.loads((adapter_dir / CONFIG_NAME).read_text())
    base_model = ctx.models.source.name
    try:
        with ctx.db.session() as session:
            if cancel_requested_locked(session, job.id):  # asked during the last step or the save: honoured
                finish(session, job.id, owner, "cancelled")
                logger.info("job %s cancelled after its last step; nothing registered", job.id)
                return "cancelled"
            check_method(session, job.adapter_name, spec.method)  # the name may have changed hands meanwhile
            version = create_version(session, job.adapter_name, VersionSpec(
                method=spec.method, config=config, files=files, size=size, base_model=base_model,
                job_id=job.id, dataset_id=job.dataset_id, metrics=metrics,
            ))
            ref = f"{job.adapter_name}@{version.version}"
            add_event(session, job.id, "adapter_version", f"registered {ref}",
                      {"adapter": ref, "version_id": version.id})
            done = finish(session, job.id, owner, "succeeded", result_version_id=version.id)
            done.metrics = metrics
            done.step, done.eta_seconds = result.global_step, 0.0
    except JobConflict as exc:
        logger.warning("job %s: trained, but the lease was lost before it was registered: %s", job.id, exc)
        return None
    logger.info("job %s succeeded: %s (%s after %d steps)", job.id, ref, result.status, result.global_step)
    return "succeeded"


# ---------------------------------------------------------------------------------------- merge
def run_merge_job(job_id: str, ctx: WorkerContext) -> str | None:
    """Claim merge job ``job_id`` and fail it honestly: this server has no merge engine yet."""
    if _shutting_down(ctx, job_id):
        return None
    owner = new_owner()
    if _claim(ctx, job_id, owner) is None:
        return None
    return _finish(ctx, job_id, owner, "failed", dict(MERGE_NOT_SUPPORTED))
