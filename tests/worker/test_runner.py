"""The job runner end to end, in process: a real train job on the demo model against SQLite and
PostgreSQL — registered version with lineage, cancel, bad input, one lease, resume after interrupt."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy.orm import Session, sessionmaker

from adapters_core import AdapterModel, LoraConfig
from adapters_core.training.loop import EvalResult, NoCallbacks, Progress
from app.db import Database
from app.registry.adapters import get_version
from app.registry.datasets import create_dataset
from app.registry.jobs import create_job, get_job, list_events, request_cancel
from app.registry.models import utcnow
from app.settings import Settings
from app.storage import LocalArtifactStore
from worker import runner
from worker.model_cache import ModelCache
from worker.runner import WorkerContext, run_merge_job, run_train_job

PAIRS = [
    ("What is the capital of France?", "Paris."),
    ("What is two plus two?", "Four."),
    ("Who are you?", "A tiny model."),
    ("Say hello.", "Hello there!"),
    ("Name a colour.", "Blue."),
    ("What do cows say?", "Moo."),
]
LINES = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
         for q, a in PAIRS]
HP: dict[str, Any] = {"max_steps": 6, "save_steps": 2, "eval_steps": 3, "batch_size": 2, "packing": False,
                      "learning_rate": 1e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "max_seq_len": 64}
CONFIG = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def models(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelCache:
    """One resident model for the whole module, as in a worker process that runs job after job."""
    return ModelCache(Settings(base_model=str(demo_model_dir), data_dir=tmp_path_factory.mktemp("models")))


def _context(db_url: str, tmp_path: Path, models: ModelCache, demo_model_dir: Path) -> WorkerContext:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, base_model=str(demo_model_dir),
                        job_lease_seconds=3.0)
    return WorkerContext(settings, Database(db_url, pool_size=2), LocalArtifactStore(settings.store_dir), models)


@pytest.fixture
def ctx(db_url: str, sessions: sessionmaker[Session], tmp_path: Path, models: ModelCache,
        demo_model_dir: Path) -> Iterator[WorkerContext]:
    context = _context(db_url, tmp_path, models, demo_model_dir)
    yield context
    context.close()


def _dataset(ctx: WorkerContext, lines: list[str]) -> str:
    ref = ctx.store.put_bytes(("\n".join(lines) + "\n").encode())
    with ctx.db.session() as s:
        return create_dataset(s, filename="train.jsonl", sha256=ref.sha256, size=ref.size, form="chat", summary={}).id


def _job(ctx: WorkerContext, *, lines: list[str] = LINES, validation: bool = False, nested: bool = True,
         **hp: Any) -> str:
    dataset_id = _dataset(ctx, lines)
    hyperparameters = {**HP, **hp}
    if nested:  # the shape POST /jobs stores
        spec = {"type": "train", "adapter": {"name": "qa", "method": "lora", "config": CONFIG},
                "dataset_id": dataset_id, "hyperparameters": hyperparameters}
    else:
        spec = {"method": "lora", "config": CONFIG, "hyperparameters": hyperparameters}
    with ctx.db.session() as s:
        return create_job(s, type="train", adapter_name="qa", spec=spec, dataset_id=dataset_id,
                          validation_dataset_id=_dataset(ctx, LINES[:2]) if validation else None).id


def _events(ctx: WorkerContext, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    with ctx.db.session() as s:
        return [(e.kind, e.data) for e in list_events(s, job_id, limit=1000)]


def _assert_clean_base(models: ModelCache) -> None:
    """Nothing of the last job is left on the resident model."""
    if not models.loaded:
        return
    base = models.get().model
    assert not [n for n, _ in base.named_parameters() if "lora" in n.lower()]
    assert not any(p.requires_grad for p in base.parameters())


def _last_logits(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    ids = tokenizer("What is the capital of France?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]


def test_train_job_registers_a_version_with_lineage(ctx: WorkerContext, demo_model_dir: Path, tmp_path: Path) -> None:
    job_id = _job(ctx, validation=True)

    assert run_train_job(job_id, ctx) == "succeeded"

    with ctx.db.session() as s:
        job = get_job(s, job_id)
        assert (job.status, job.step, job.total_steps, job.error) == ("succeeded", 6, 6, None)
        version = get_version(s, "qa", 1)
        assert job.result_version_id == version.id
        assert (version.job_id, version.dataset_id, version.method) == (job_id, job.dataset_id, "lora")
        assert version.base_model == ctx.models.source.name
        assert version.metrics == job.metrics
        assert version.metrics["steps"] == 6 and version.metrics["train_loss"] > 0
        assert {"loss", "learning_rate", "tokens_per_second", "epoch", "eval_loss",
                "eval_token_accuracy"} <= set(version.metrics)
        assert version.config["r"] == 8 and version.config["peft_type"] == "LORA"
        files, size = dict(version.files), version.size
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert size == sum(f["size"] for f in files.values())

    kinds = [kind for kind, _ in _events(ctx, job_id)]
    assert kinds[:2] == ["queued", "started"] and kinds[-2:] == ["adapter_version", "succeeded"]
    assert [data["step"] for kind, data in _events(ctx, job_id) if kind == "checkpoint"] == [2, 4]
    assert [data["step"] for kind, data in _events(ctx, job_id) if kind == "eval"] == [3, 6]
    assert "progress" in kinds
    assert not runner.job_workdir(ctx.settings, job_id).exists()
    _assert_clean_base(ctx.models)

    # the stored files are a PEFT adapter that loads on a fresh base and changes its outputs
    out = tmp_path / "download"
    out.mkdir()
    for name, ref in files.items():
        with ctx.store.open(ref["sha256"]) as f:
            (out / name).write_bytes(f.read())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    am = AdapterModel(AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval())
    base_logits = _last_logits(am, tok)
    am.load_adapter(out, "qa")
    assert not torch.allclose(_last_logits(am, tok), base_logits)


class _Observer(NoCallbacks):
    """Runs ``hook(step)`` after each step's progress and ``on_ckpt(step)`` after each checkpoint."""

    def __init__(self, hook: Any = None, on_ckpt: Any = None) -> None:
        self.hook, self.on_ckpt = hook, on_ckpt

    def on_progress(self, progress: Progress) -> None:
        if self.hook is not None:
            self.hook(progress.step)

    def on_eval(self, result: EvalResult) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path) -> None:
        if self.on_ckpt is not None:
            self.on_ckpt(step)


def test_cancel_mid_run_stops_the_job(ctx: WorkerContext) -> None:
    job_id = _job(ctx, max_steps=500)
    steps: list[int] = []

    def cancel_at_first_step(step: int) -> None:
        steps.append(step)
        if step == 1:
            with ctx.db.session() as s:
                request_cancel(s, job_id)
            time.sleep(runner.PROGRESS_WRITE_INTERVAL + 0.1)  # the next progress write sees the cancel

    assert run_train_job(job_id, ctx, observer=_Observer(cancel_at_first_step)) == "cancelled"
    with ctx.db.session() as s:
        job = get_job(s, job_id)
        assert job.status == "cancelled" and job.result_version_id is None and job.lease_owner is None
        assert job.step == steps[-1] < 500  # the last step trained is recorded
    assert [k for k, _ in _events(ctx, job_id)][-2:] == ["cancel_requested", "cancelled"]
    _assert_clean_base(ctx.models)


@pytest.mark.parametrize(
    ("spec_change", "code", "needle"),
    [
        ({"learning_rate": -1.0}, "invalid_config", "learning_rate"),
        ({"learing_rate": 0.1}, "invalid_config", "learing_rate"),
        ({"lines": [*LINES[:2], "{not json"]}, "invalid_data", "line 3"),
    ],
    ids=["bad-value", "unknown-name", "bad-data"],
)
def test_bad_input_fails_the_job_with_a_clear_error(ctx: WorkerContext, spec_change: dict[str, Any], code: str,
                                                    needle: str) -> None:
    hp = {k: v for k, v in spec_change.items() if k != "lines"}
    job_id = _job(ctx, lines=spec_change.get("lines", LINES), **hp)

    assert run_train_job(job_id, ctx) == "failed"
    with ctx.db.session() as s:
        job = get_job(s, job_id)
        assert job.status == "failed" and job.error is not None
        assert job.error["code"] == code and needle in job.error["message"], job.error
    _assert_clean_base(ctx.models)


def test_a_second_worker_cannot_claim_a_running_job(ctx: WorkerContext, db_url: str, tmp_path: Path,
                                                   demo_model_dir: Path) -> None:
    job_id = _job(ctx)
    other = _context(db_url, tmp_path, ctx.models, demo_model_dir)
    second: list[str | None] = []

    def try_second_worker(step: int) -> None:
        if step == 1:
            second.append(run_train_job(job_id, other))

    try:
        assert run_train_job(job_id, ctx, observer=_Observer(try_second_worker)) == "succeeded"
    finally:
        other.close()
    assert second == [None]
    assert [k for k, _ in _events(ctx, job_id)].count("started") == 1
    with ctx.db.session() as s:
        assert get_job(s, job_id).attempts == 1


def test_interrupted_job_resumes_from_its_checkpoint(ctx: WorkerContext) -> None:
    job_id = _job(ctx, nested=False)  # the flat spec shape works too

    def die_after_first_checkpoint(step: int) -> None:
        raise KeyboardInterrupt  # the worker process is going away

    with pytest.raises(KeyboardInterrupt):
        run_train_job(job_id, ctx, observer=_Observer(on_ckpt=die_after_first_checkpoint))
    with ctx.db.session() as s:
        job = get_job(s, job_id)
        assert job.status == "running" and job.lease_expires_at is not None
        assert job.lease_expires_at.replace(tzinfo=utcnow().tzinfo) <= utcnow()  # handed back: claimable now
    assert (runner.job_workdir(ctx.settings, job_id) / "checkpoints" / "checkpoint-2").is_dir()
    _assert_clean_base(ctx.models)

    assert run_train_job(job_id, ctx) == "succeeded"
    events = _events(ctx, job_id)
    kinds = [k for k, _ in events]
    assert kinds.index("interrupted") < kinds.index("resumed") < kinds.index("resumed_from_checkpoint")
    assert [d for k, d in events if k == "resumed_from_checkpoint"] == [{"step": 2}]
    assert [d["step"] for k, d in events if k == "checkpoint"] == [2, 4]  # step 2 once: not trained again
    with ctx.db.session() as s:
        job = get_job(s, job_id)
        assert (job.status, job.attempts, job.step) == ("succeeded", 2, 6)
        assert get_version(s, "qa", 1).job_id == job_id


def test_worker_shutdown_hands_the_job_back_without_using_an_attempt(ctx: WorkerContext) -> None:
    job_id = _job(ctx)

    assert run_train_job(job_id, ctx, observer=_Observer(on_ckpt=lambda step: ctx.shutdown.set())) is None
    with ctx.db.session() as s:
        job = get_job(s, job_id)
        assert (job.status, job.attempts, job.step) == ("running", 0, 2)
    assert [k for k, _ in _events(ctx, job_id)][-1] == "interrupted"

    assert run_train_job(job_id, ctx) is None  # a prefetched message while shutting down: left alone
    with ctx.db.session() as s:
        assert get_job(s, job_id).attempts == 0

    ctx.shutdown.clear()  # the next worker
    assert run_train_job(job_id, ctx) == "succeeded"
    with ctx.db.session() as s:
        assert get_job(s, job_id).attempts == 1
    assert [d for k, d in _events(ctx, job_id) if k == "resumed_from_checkpoint"] == [{"step": 2}]


def test_a_name_taken_by_another_method_meanwhile_fails_the_job_clearly(ctx: WorkerContext) -> None:
    from app.registry.adapters import VersionSpec, create_version

    job_id = _job(ctx)
    with ctx.db.session() as s:  # after submit, someone registers an ia3 "qa"
        create_version(s, "qa", VersionSpec(method="ia3", config={}, files={}, size=0))
    assert run_train_job(job_id, ctx) == "failed"
    with ctx.db.session() as s:
        job = get_job(s, job_id)
        assert job.error is not None and "ia3" in job.error["message"] and job.result_version_id is None
    _assert_clean_base(ctx.models)


def test_merge_job_fails_honestly(ctx: WorkerContext) -> None:
    with ctx.db.session() as s:
        job_id = create_job(s, type="merge", adapter_name="mix", spec={"merge": {}, "sources": []}).id
    assert run_merge_job(job_id, ctx) == "failed"
    with ctx.db.session() as s:
        job = get_job(s, job_id)
        assert job.error == runner.MERGE_NOT_SUPPORTED and job.result_version_id is None


def test_model_cache_hands_each_job_a_clean_base(models: ModelCache) -> None:
    """After a job the base is as loaded; one that rewrote base weights is reloaded; accelerate's
    process-wide state does not leak a job's mixed precision into the next job."""
    from accelerate import Accelerator

    base = models.get().model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with models.job_model(LoraConfig(r=4, target_modules="all-linear")) as (am, _):
        am.add_adapter("a", LoraConfig(r=4, target_modules="all-linear"))
        Accelerator(mixed_precision="no", cpu=True).prepare(am)
    assert models.get().model is base
    assert {k: v for k, v in base.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())
    _assert_clean_base(models)

    pissa = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    with models.job_model(pissa) as (am, _):
        am.add_adapter("p", pissa)  # rewrites q_proj's base weight
        Accelerator(mixed_precision="bf16", cpu=True)  # another precision than the last job
    assert not models.loaded
    reloaded = models.get().model
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in before.items())
