"""The job worker path at its edges, end to end through the API a user calls: a job submitted with
``POST /jobs``, run in process by the worker runner on the same database and store, then watched
through ``GET /jobs/{id}``, its events, cancel, and the registered adapter version."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.reconciler import reconcile_once
from app.registry.jobs import claim
from app.registry.models import AdapterVersion
from tests.app.conftest import RecordingQueue, api_settings, base_host, client
from tests.worker.test_runner import LINES, _context, _Observer, models
from worker import runner
from worker.model_cache import ModelCache
from worker.runner import WorkerContext, run_train_job

__all__ = ["api_settings", "base_host", "client", "models"]

HP: dict[str, Any] = {"max_steps": 6, "save_steps": 2, "batch_size": 2, "packing": False,
                      "learning_rate": 1e-2, "lr_scheduler": "constant", "warmup_ratio": 0.0, "max_seq_len": 64}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


@pytest.fixture
def wctx(client: TestClient, db_url: str, tmp_path: Path, models: ModelCache,
         demo_model_dir: Path) -> Iterator[WorkerContext]:
    """A worker on the API's database and store (same data dir)."""
    context = _context(db_url, tmp_path, models, demo_model_dir)
    assert context.settings.store_dir == client.settings.store_dir  # type: ignore[attr-defined]
    yield context
    context.close()


def _submit(client: TestClient, *, lines: list[str] = LINES, config: dict[str, Any] | None = None,
            name: str = "qa", **hp: Any) -> str:
    up = client.post("/datasets", files={"file": ("train.jsonl", ("\n".join(lines) + "\n").encode(), "application/jsonl")})
    assert up.status_code == 201, up.text
    body = {"type": "train", "adapter": {"name": name, "method": "lora", "config": config or LORA},
            "dataset_id": up.json()["id"], "hyperparameters": {**HP, **hp}}
    job = client.post("/jobs", json=body)
    assert job.status_code == 201, job.text
    return str(job.json()["id"])


def _job(client: TestClient, job_id: str) -> dict[str, Any]:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def _kinds(client: TestClient, job_id: str) -> list[str]:
    response = client.get(f"/jobs/{job_id}/events", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return [e["kind"] for e in response.json()["data"]]


def _versions(client: TestClient) -> int:
    with client.app.state.services.db.sessions() as s:  # type: ignore[attr-defined]
        return int(s.execute(select(func.count()).select_from(AdapterVersion)).scalar_one())


# ---------------------------------------------------------------------------------------- NaN loss


@pytest.mark.parametrize(
    "hp",
    [
        # every assistant turn lies past max_seq_len: no token is left in the loss (0/0 = NaN)
        {"max_seq_len": 4},
        # a learning rate that makes the run diverge
        {"learning_rate": 1e30, "max_grad_norm": None},
    ],
    ids=["no-loss-tokens-after-truncation", "diverging-learning-rate"],
)
def test_a_run_whose_loss_is_nan_fails_clearly_and_registers_nothing(client: TestClient, wctx: WorkerContext,
                                                                     hp: dict[str, Any]) -> None:
    """A run whose loss is NaN trained nothing usable: the job must fail with an error a user can act on
    (not succeed with a NaN adapter that ``POST /adapters`` itself would refuse, and not an internal
    error quoting SQL), and no version may be registered."""
    job_id = _submit(client, **hp)

    status = run_train_job(job_id, wctx)

    job = _job(client, job_id)
    assert (status, job["status"], job["result"]) == ("failed", "failed", None), job
    assert _versions(client) == 0
    error = job["error"]
    assert error["code"] != "internal", error
    assert "SQL" not in error["message"] and "INSERT" not in error["message"], error
    assert "nan" in error["message"].lower() or "loss" in error["message"].lower(), error
    assert _kinds(client, job_id)[-1] == "failed"


# ---------------------------------------------------------------------------------------- cancel


def _hand_back_after_first_checkpoint(wctx: WorkerContext, job_id: str) -> None:
    def die(step: int) -> None:
        raise KeyboardInterrupt  # the worker process is going away

    with pytest.raises(KeyboardInterrupt):
        run_train_job(job_id, wctx, observer=_Observer(on_ckpt=die))


def _die_holding_the_lease(wctx: WorkerContext, job_id: str) -> None:
    with wctx.db.session() as s:  # a worker claimed it with a short lease and was SIGKILLed
        assert claim(s, job_id, "dead-host:1:abcd", 0.2) is not None
    time.sleep(0.5)


@pytest.mark.parametrize("how", [_hand_back_after_first_checkpoint, _die_holding_the_lease],
                         ids=["worker-interrupted", "worker-killed"])
def test_cancelling_a_job_whose_worker_is_gone_ends_it(client: TestClient, wctx: WorkerContext, how: Any) -> None:
    """The worker went away (interrupted and handed the job back, or killed); before any other worker
    resumed it, the user cancels it. The cancel is accepted (200), so the job must end ``cancelled``:
    at once, or when the reconciler / the next worker gets to it. It must not stay ``running`` forever
    (its event stream never ending, its dataset undeletable)."""
    job_id = _submit(client)
    how(wctx, job_id)
    assert _job(client, job_id)["status"] == "running"

    cancel = client.post(f"/jobs/{job_id}/cancel")
    assert cancel.status_code == 200, cancel.text

    # what the system does next: the reconciler rings, a worker takes every message
    queue = RecordingQueue()
    reconcile_once(wctx.db, queue, requeue_after=0.01)
    for queued_id, _ in queue.sent:
        run_train_job(queued_id, wctx)
    run_train_job(job_id, wctx)  # even a stray redelivery of the old message

    job = _job(client, job_id)
    assert job["status"] == "cancelled", job
    assert job["result"] is None and _versions(client) == 0
    assert _kinds(client, job_id)[-1] == "cancelled"


def test_a_cancel_accepted_during_the_last_step_is_not_ignored(client: TestClient, wctx: WorkerContext) -> None:
    """The user cancels while the last step (then the final save) runs; the API answers 200 with
    ``cancel_requested: true`` ("its worker stops at the next step"). The job must not then end
    ``succeeded`` with a new adapter version registered."""
    job_id = _submit(client)
    answers: list[dict[str, Any]] = []

    def cancel_at_last_step(step: int) -> None:
        if step == HP["max_steps"]:
            response = client.post(f"/jobs/{job_id}/cancel")
            answers.append({"status_code": response.status_code, **response.json()})

    run_train_job(job_id, wctx, observer=_Observer(cancel_at_last_step))

    assert answers and answers[0]["status_code"] == 200 and answers[0]["cancel_requested"] is True
    job = _job(client, job_id)
    assert job["status"] == "cancelled", (job["status"], job["result"])
    assert job["result"] is None and _versions(client) == 0


# ---------------------------------------------------------------------------------------- sound paths


def test_a_message_delivered_twice_trains_once_and_registers_one_version(client: TestClient,
                                                                         wctx: WorkerContext) -> None:
    job_id = _submit(client)
    assert run_train_job(job_id, wctx) == "succeeded"
    assert run_train_job(job_id, wctx) is None  # Celery redelivery (acks_late) of the same message
    assert _versions(client) == 1
    kinds = _kinds(client, job_id)
    assert kinds.count("started") == 1 and kinds.count("adapter_version") == 1 and kinds[-1] == "succeeded"


def test_progress_is_monotone_and_consistent(client: TestClient, wctx: WorkerContext) -> None:
    job_id = _submit(client, max_steps=12)
    seen: list[tuple[int, int | None]] = []

    def watch(step: int) -> None:
        p = _job(client, job_id)["progress"]
        seen.append((p["step"], p["total_steps"]))

    assert run_train_job(job_id, wctx, observer=_Observer(watch)) == "succeeded"
    steps = [s for s, _ in seen]
    assert steps == sorted(steps) and all(t == 12 and s <= t for s, t in seen)
    job = _job(client, job_id)
    assert job["progress"] == {"step": 12, "total_steps": 12, "eta_seconds": 0.0}
    events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    with client.stream("GET", f"/jobs/{job_id}/events",
                       headers={"Accept": "text/event-stream", "Last-Event-ID": str(ids[2])}) as stream:
        body = stream.read().decode()
    assert [int(line[4:]) for line in body.splitlines() if line.startswith("id: ")] == ids[3:]


# ---------------------------------------------------------------------------------------- PEFT oracle


def _download(client: TestClient, ref: str, dest: Path) -> Path:
    name, version = ref.split("@")
    response = client.get(f"/adapters/{name}/versions/{version}/download")
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    (folder,) = [p for p in dest.iterdir() if p.is_dir()]
    return folder


@pytest.mark.parametrize(
    "config",
    [
        LORA,
        {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "use_rslora": True},
        {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2},
         "alpha_pattern": {"q_proj": 2}, "layers_to_transform": [1]},
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"]},
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"], "bias": "lora_only"},
    ],
    ids=["lora", "rslora-all-linear", "dora", "patterns-one-layer", "modules-to-save", "lora-bias"],
)
def test_the_trained_adapter_is_what_peft_loads_and_what_was_asked(client: TestClient, wctx: WorkerContext,
                                                                   demo_model_dir: Path, tmp_path: Path,
                                                                   config: dict[str, Any]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters_core import AdapterModel

    job_id = _submit(client, config=config)
    assert run_train_job(job_id, wctx) == "succeeded"
    job = _job(client, job_id)
    ref = job["result"]["adapter"]
    version = client.get(f"/adapters/qa/versions/{job['result']['version']}").json()
    for key, value in config.items():
        if value == "all-linear":  # expanded to the matched modules, as PEFT does
            continue
        assert version["config"][key] == value, (key, version["config"][key])
    assert version["method"] == "lora"
    assert job["metrics"]["steps"] == HP["max_steps"] and job["metrics"]["train_loss"] > 0

    folder = _download(client, ref, tmp_path / "dl")
    tok = AutoTokenizer.from_pretrained(demo_model_dir)
    ids = tok("What is the capital of France?", return_tensors="pt")["input_ids"]

    def fresh() -> Any:
        return AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()

    with torch.no_grad():
        base = fresh()(input_ids=ids).logits
        ours = AdapterModel(fresh())
        ours.load_adapter(folder, "qa")
        ours.set_adapter("qa")
        mine = ours(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(fresh(), folder).eval()(input_ids=ids).logits
    assert not torch.allclose(theirs, base)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert runner.job_workdir(wctx.settings, job_id).exists() is False



# ---------------------------------------------------------------------------------------- PiSSA / OLoRA


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_base_rewriting_init_registers_the_plain_lora_of_the_real_base(client: TestClient, wctx: WorkerContext,
                                                                         demo_model_dir: Path, tmp_path: Path,
                                                                         init: str) -> None:
    """PiSSA / OLoRA rewrite the base as training starts; registered as trained, the version would only fit
    that rewritten base (serving and uploads refuse such files). The job registers it converted: a rank-2r
    plain LoRA that applies to the real base model, and passes the upload checks."""
    from adapters_core.peft_format import base_rewriting_init

    job_id = _submit(client, config={**LORA, "init_lora_weights": init})
    assert run_train_job(job_id, wctx) == "succeeded"
    name, number = _job(client, job_id)["result"]["adapter"].split("@")
    config = client.get(f"/adapters/{name}/versions/{number}").json()["config"]
    assert base_rewriting_init(config) is None and config["init_lora_weights"] is True
    assert config["r"] == 2 * LORA["r"] and config["lora_alpha"] == 2 * LORA["lora_alpha"]
    archive = client.get(f"/adapters/{name}/versions/{number}/download")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        files = {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    again = client.post("/adapters", data={"name": "again"},
                        files=[("files", (n, files[n])) for n in ("adapter_config.json", "adapter_model.safetensors")])
    assert again.status_code == 201, again.text  # the upload checks (a load on the real base) accept it


# ---------------------------------------------------------------------------------------- worker deaths


def test_a_job_out_of_attempts_fails_clearly_and_its_checkpoints_are_removed(
        client: TestClient, wctx: WorkerContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each time a worker is killed after its first checkpoint (lease held, never handed back), the
    reconciler rings once the lease expired and the next worker resumes. Out of attempts, the job fails
    with ``attempts_exhausted``, its event stream ends, and its checkpoints (optimizer states: several
    times the adapter's size) do not stay on the shared volume forever."""
    from app.registry.models import Job, utcnow

    job_id = _submit(client, max_steps=12)
    workdir = runner.job_workdir(wctx.settings, job_id)
    attempts = client.settings.job_max_attempts  # type: ignore[attr-defined]

    def killed(step: int) -> None:
        raise KeyboardInterrupt  # stands in for SIGKILL (no hand-back: see the monkeypatch below)

    with monkeypatch.context() as m:
        m.setattr(runner, "_hand_back", lambda *a, **k: None)  # a killed process runs no clean-up
        for attempt in range(attempts):
            if attempt:
                queue = RecordingQueue()
                reconcile_once(wctx.db, queue, requeue_after=3600)
                assert [j for j, _ in queue.sent] == [job_id]
            with pytest.raises(KeyboardInterrupt):
                run_train_job(job_id, wctx, observer=_Observer(on_ckpt=killed))
            time.sleep(0.05)
            with wctx.db.session() as s:  # ... and its lease expires
                s.get(Job, job_id).lease_expires_at = utcnow()
            time.sleep(0.05)
    kinds = _kinds(client, job_id)
    assert kinds.count("resumed_from_checkpoint") == attempts - 1 and kinds.count("requeued") == attempts - 1
    queue = RecordingQueue()
    reconcile_once(wctx.db, queue, requeue_after=3600)
    assert [j for j, _ in queue.sent] == [job_id]
    assert run_train_job(job_id, wctx) is None

    job = _job(client, job_id)
    assert job["status"] == "failed" and job["error"]["code"] == "attempts_exhausted"
    assert str(attempts) in job["error"]["message"] and job["result"] is None and _versions(client) == 0
    with client.stream("GET", f"/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as stream:
        body = stream.read().decode()
    assert "event: failed" in body.strip().split("\n\n")[-1]
    assert not workdir.exists(), sorted(p.name for p in (workdir / "checkpoints").iterdir())


def test_a_dataset_deleted_after_submission_fails_the_job_clearly(client: TestClient, wctx: WorkerContext) -> None:
    """The API refuses to delete a dataset a queued job uses (409); should a delete slip in anyway (it
    raced the submission), the job fails with ``dataset_not_found``."""
    job_id = _submit(client)
    dataset_id = _job(client, job_id)["dataset_id"]
    assert client.delete(f"/datasets/{dataset_id}").status_code == 409
    with wctx.db.session() as s:
        from app.registry.models import Dataset, utcnow
        s.get(Dataset, dataset_id).deleted_at = utcnow()
    assert run_train_job(job_id, wctx) == "failed"
    job = _job(client, job_id)
    assert job["error"]["code"] == "dataset_not_found" and dataset_id in job["error"]["message"]
    assert _kinds(client, job_id)[-1] == "failed" and _versions(client) == 0


def test_a_job_cancelled_while_queued_is_never_trained(client: TestClient, wctx: WorkerContext) -> None:
    job_id = _submit(client)
    assert client.post(f"/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert run_train_job(job_id, wctx) is None  # its message is still on the broker
    assert _job(client, job_id)["status"] == "cancelled" and _versions(client) == 0
    assert _kinds(client, job_id) == ["queued", "cancelled"]
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 409


def test_an_exception_mid_training_fails_the_job_and_ends_its_stream(client: TestClient, wctx: WorkerContext) -> None:
    job_id = _submit(client)

    def crash(step: int) -> None:
        if step == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    assert run_train_job(job_id, wctx, observer=_Observer(crash)) == "failed"
    job = _job(client, job_id)
    assert job["error"]["code"] == "internal" and "illegal memory access" in job["error"]["message"]
    assert job["result"] is None and _versions(client) == 0
    with client.stream("GET", f"/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as stream:
        assert "event: failed" in stream.read().decode().strip().split("\n\n")[-1]
    assert not runner.job_workdir(wctx.settings, job_id).exists()
    base = wctx.models.get().model
    assert not [n for n, _ in base.named_parameters() if "lora" in n.lower()]


def test_the_checkpoints_a_job_lists_exist(client: TestClient, wctx: WorkerContext) -> None:
    """``GET /jobs/{id}/checkpoints`` ("checkpoints the worker saved") lists every checkpoint event, also those
    the worker deleted since: pruned by ``save_total_limit`` (2 by default) while it ran, and all of
    them once the job ended (its work dir is removed)."""
    job_id = _submit(client, max_steps=10)
    listed: list[list[str]] = []  # names of listed checkpoints that no longer exist

    def look(step: int) -> None:
        if step == 9:  # checkpoints at steps 2, 4, 6 and 8 were saved
            paths = [c["path"] for c in client.get(f"/jobs/{job_id}/checkpoints").json()["data"]]
            listed.append([Path(p).name for p in paths if not Path(p).exists()])

    assert run_train_job(job_id, wctx, observer=_Observer(look)) == "succeeded"
    assert listed[0] == [], f"listed but deleted while the job runs: {listed[0]}"
    after = client.get(f"/jobs/{job_id}/checkpoints").json()["data"]
    gone = [Path(c["path"]).name for c in after if not Path(c["path"]).exists()]
    assert gone == [], f"listed but deleted once the job ended: {gone}"


@pytest.mark.parametrize("task_name", ["train", "merge"])
def test_a_message_handed_to_a_worker_that_is_shutting_down_goes_back_to_the_queue(
        task_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery still hands a stopping worker its prefetched message; the task returned, the message was acked and
    gone, and the job sat queued until the reconciler re-sent it (5 minutes by default)."""
    from celery.exceptions import Reject

    from worker import tasks

    ran: list[str] = []
    monkeypatch.setattr(tasks, f"run_{task_name}_job", lambda job_id, ctx: ran.append(job_id))
    monkeypatch.setattr(tasks, "context", lambda: None)
    task = getattr(tasks, task_name)
    task.run("job_a")
    assert ran == ["job_a"]
    monkeypatch.setattr(tasks, "SHUTDOWN", threading.Event())
    tasks.SHUTDOWN.set()
    with pytest.raises(Reject) as info:
        task.run("job_b")
    assert info.value.requeue and ran == ["job_a"]
