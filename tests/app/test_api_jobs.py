"""`/jobs`: submit (train and merge, validated before anything is stored), list, get, cancel, events
(JSON pages and live SSE), checkpoints.

Every refused submission is checked to store nothing and enqueue nothing.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

import app.api.jobs as jobs_api
from app.main import create_app
from app.registry.adapters import VersionSpec, create_version
from app.registry.jobs import add_event, claim, finish
from app.registry.models import Job
from app.settings import Settings
from tests.app.conftest import RecordingQueue
from tests.app.test_api_datasets import assert_error, chat_line, jsonl, make_dataset, snapshot


def sessions(client: TestClient) -> Any:
    return client.app.state.services.db.sessions()  # type: ignore[attr-defined]


def train_body(dataset_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "train",
        "adapter": {"name": "support-bot", "method": "lora",
                    "config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "dataset_id": dataset_id,
        "hyperparameters": {"epochs": 2, "learning_rate": 1e-3},
    }
    body.update(overrides)
    return body


def submit(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/jobs", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def add_version(client: TestClient, name: str, r: int = 4, method: str = "lora", target_modules: Any = None) -> int:
    with sessions(client) as session:
        config = {"r": r, "lora_alpha": r, "target_modules": target_modules or ["q_proj", "v_proj"]}
        version = create_version(session, name, VersionSpec(method=method, config=config, files={}, size=0))
        session.commit()
        return version.version


@pytest.fixture
def ds(client: TestClient) -> str:
    return make_dataset(client)


# ------------------------------------------------------------------------------------------ submit: train


def test_a_train_job_saving_single_layers_is_accepted(client: TestClient, ds: str) -> None:
    """The server serves copies of single layers (a block such as `mlp` is refused: see the refusals below)."""
    config = {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head", "norm"]}
    job = submit(client, train_body(ds, adapter={"name": "heads", "method": "lora", "config": config}))
    assert job["status"] == "queued"


def test_train_job_is_stored_then_enqueued(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))
    assert job["id"].startswith("job_") and job["object"] == "job"
    assert (job["type"], job["status"], job["adapter_name"], job["method"]) == ("train", "queued", "support-bot", "lora")
    assert job["dataset_id"] == ds and job["validation_dataset_id"] is None
    assert job["hyperparameters"]["epochs"] == 2 and job["hyperparameters"]["learning_rate"] == 1e-3
    assert job["hyperparameters"]["batch_size"] == 8  # defaults filled in and shown
    assert job["progress"] == {"step": 0, "total_steps": None, "eta_seconds": None}
    assert (job["metrics"], job["error"], job["result"], job["attempts"], job["cancel_requested"]) == ({}, None, None, 0, False)
    assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None
    assert job["merge"] is None
    assert client.queue.sent == [(job["id"], "train")]  # type: ignore[attr-defined]
    with sessions(client) as session:
        row = session.get(Job, job["id"])
        assert row.enqueued_at is not None and row.max_attempts == client.settings.job_max_attempts  # type: ignore[attr-defined]
        config = row.spec["adapter"]["config"]
        assert config["r"] == 4 and config["peft_type"] == "LORA" and config["lora_dropout"] == 0.0
    assert client.get(f"/jobs/{job['id']}").json() == job


def test_defaults_validation_dataset_and_a_config_from_peft(client: TestClient, ds: str) -> None:
    val = make_dataset(client, jsonl(chat_line("held out?", "yes")))
    peft_style = {"r": 8, "lora_alpha": 16, "peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none",
                  "target_modules": "all-linear", "init_lora_weights": "pissa", "use_rslora": True}
    job = submit(client, {"type": "train", "adapter": {"name": "b", "config": peft_style}, "dataset_id": ds,
                          "validation_dataset_id": val, "hyperparameters": {"eval_steps": 5}})
    assert job["method"] == "lora" and job["validation_dataset_id"] == val
    assert job["hyperparameters"]["max_seq_len"] == 1024 and job["hyperparameters"]["eval_steps"] == 5
    minimal = submit(client, {"type": "train", "adapter": {"name": "c"}, "dataset_id": ds})
    assert minimal["hyperparameters"]["epochs"] == 3


def test_dora_from_a_base_rewriting_init_is_refused(client: TestClient, ds: str) -> None:
    """A PiSSA / OLoRA job registers its adapter as the plain LoRA of the real base; DoRA has no such form."""
    for init in ("pissa", "olora"):
        config = {"r": 8, "target_modules": ["q_proj"], "init_lora_weights": init, "use_dora": True}
        r = client.post("/jobs", json={"type": "train", "adapter": {"name": "d", "config": config}, "dataset_id": ds})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["param"] == "adapter.config.init_lora_weights" and "use_dora" in r.json()["error"]["message"]
    with sessions(client) as session:
        assert session.execute(select(Job)).first() is None


def test_enqueue_happens_after_commit(api_settings: Settings, base_host: Any) -> None:
    seen: list[str | None] = []

    class CheckingQueue(RecordingQueue):
        """Reads the job from a fresh session when the message is sent: it must already be committed."""

        def enqueue(self, job_id: str, job_type: str) -> None:
            with app.state.services.db.sessions() as other:
                seen.append(other.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none())
            super().enqueue(job_id, job_type)

    queue = CheckingQueue()
    app = create_app(api_settings, queue=queue, base_model=base_host)
    with TestClient(app) as c:
        ds_id = c.post("/datasets", files={"file": ("t.jsonl", jsonl(chat_line()))}).json()["id"]
        job = c.post("/jobs", json=train_body(ds_id)).json()
    assert queue.sent == [(job["id"], "train")] and seen == ["queued"]


def test_broker_down_still_answers_201_and_leaves_the_job_for_the_reconciler(client: TestClient, ds: str) -> None:
    client.queue.fail = True  # type: ignore[attr-defined]
    job = submit(client, train_body(ds))
    assert client.queue.sent == []  # type: ignore[attr-defined]
    with sessions(client) as session:
        row = session.get(Job, job["id"])
        assert row.status == "queued" and row.enqueued_at is None


def test_malformed_json_is_400(client: TestClient, ds: str) -> None:
    unchanged = snapshot(client)
    response = client.post("/jobs", content=b'{"type": "train", ', headers={"Content-Type": "application/json"})
    assert_error(response, 400, "invalid_json", None, "not valid JSON")
    unchanged()


@pytest.mark.parametrize(("change", "param", "words"), [
    # wrong types
    ({"dataset_id": 5}, "dataset_id", ("valid string",)),
    ({"adapter": "bot"}, "adapter", ()),
    ({"hyperparameters": [1]}, "hyperparameters", ()),
    ({"adapter": {"name": "b", "config": {"r": "8"}}}, "adapter.config.r", ("r must be int, got string",)),
    ({"adapter": {"name": "b", "config": {"r": True}}}, "adapter.config.r", ("got boolean",)),
    ({"adapter": {"name": "b", "config": {"target_modules": 5}}}, "adapter.config.target_modules", ("got number",)),
    ({"adapter": {"name": "b", "config": {"lora_alpha": float("nan")}}}, "adapter.config.lora_alpha", ("finite",)),
    ({"hyperparameters": {"learning_rate": "high"}}, "hyperparameters.learning_rate", ("float",)),
    ({"hyperparameters": {"epochs": True}}, "hyperparameters.epochs", ()),
    ({"hyperparameters": {"packing": "yes"}}, "hyperparameters.packing", ("bool",)),
    # values the engine refuses
    ({"adapter": {"name": "b", "config": {"r": 0}}}, "adapter.config.r", ("positive integer",)),
    ({"adapter": {"name": "b", "config": {"lora_dropout": 1.5}}}, "adapter.config.lora_dropout", ()),
    ({"adapter": {"name": "b", "config": {"use_qalora": True}}}, "adapter.config.use_qalora", ("not supported",)),
    ({"adapter": {"name": "b", "config": {"init_lora_weights": "eva"}}}, "adapter.config.init_lora_weights", ()),
    ({"adapter": {"name": "b", "config": {"peft_type": "IA3"}}}, "adapter.config.peft_type", ()),
    ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate", ("> 0",)),
    ({"hyperparameters": {"early_stopping_patience": 2}}, "hyperparameters.early_stopping_patience", ("eval_steps",)),
    ({"hyperparameters": {"seed": 2**64}}, "hyperparameters.seed", ("<= 4294967295",)),
    ({"hyperparameters": {"eval_steps": 5}}, "hyperparameters.eval_steps", ("validation_dataset_id",)),
    ({"adapter": {"name": "b", "config": {"rank_pattern": {"no_such_module": 16}}}}, "adapter.config.rank_pattern",
     ("no_such_module", "matches no module")),
    ({"adapter": {"name": "b", "config": {"target_modules": ["q_proj"], "alpha_pattern": {"v_proj": 4}}}},
     "adapter.config.alpha_pattern", ("v_proj",)),
    ({"hyperparameters": {"epochs": 10**30}}, "hyperparameters.epochs", ("<= 10000",)),
    ({"hyperparameters": {"max_steps": 2**31}}, "hyperparameters.max_steps", ("<= 2147483647",)),
    ({"hyperparameters": {"batch_size": 10**20}}, "hyperparameters.batch_size", ("<=",)),
    ({"hyperparameters": {"max_seq_len": 10**12}}, "hyperparameters.max_seq_len", ("<=",)),
    ({"hyperparameters": {"learning_rate": 10**400}}, "hyperparameters.learning_rate", ("finite",)),
    # unknown fields
    ({"priority": 1}, "priority", ("unknown field",)),
    ({"adapter": {"name": "b", "rank": 8}}, "adapter.rank", ("unknown field",)),
    ({"adapter": {"name": "b", "config": {"rank": 8, "alpha": 2}}}, "adapter.config.alpha", ("alpha, rank",)),
    ({"hyperparameters": {"lr": 0.1}}, "hyperparameters.lr", ("unknown hyperparameter field: lr",)),
    # missing required fields
    ({"dataset_id": None}, "dataset_id", ()),
    ({"adapter": {"method": "lora"}}, "adapter.name", ("Field required",)),
    # bad enum values
    ({"type": "finetune"}, "type", ("train", "merge")),
    ({"adapter": {"name": "b", "method": "ia3"}}, "adapter.method", ("supports: lora",)),
    ({"hyperparameters": {"lr_scheduler": "fast"}}, "hyperparameters.lr_scheduler", ("cosine",)),
    ({"hyperparameters": {"mixed_precision": "fp8"}}, "hyperparameters.mixed_precision", ()),
    # names and ids
    ({"adapter": {"name": "bad name!"}}, "adapter.name", ("invalid adapter name",)),
    ({"adapter": {"name": "base"}}, "adapter.name", ("reserved",)),
    ({"adapter": {"name": "b", "config": {"modules_to_save": ["mlp"]}}}, "adapter.config.modules_to_save",
     ("single layers",)),  # a block of modules: the server could not serve the trained adapter
    ({"dataset_id": "ds_missing"}, "dataset_id", ("ds_missing", "POST /datasets")),
    ({"validation_dataset_id": "ds_missing"}, "validation_dataset_id", ("ds_missing",)),
    # the base model
    ({"adapter": {"name": "b", "config": {"target_modules": ["nope_proj"]}}}, "adapter.config.target_modules",
     ("nope_proj", "matched no module")),
    ({"adapter": {"name": "b", "config": {"target_modules": ["norm"]}}}, "adapter.config.target_modules",
     ("LlamaRMSNorm",)),
    ({"adapter": {"name": "b", "config": {"modules_to_save": ["missing_head"]}}}, "adapter.config.modules_to_save",
     ("missing_head",)),
])
def test_invalid_train_jobs_are_refused_before_anything_is_stored(
    client: TestClient, ds: str, change: dict[str, Any], param: str, words: tuple[str, ...]
) -> None:
    body = train_body(ds)
    for key, value in change.items():  # None removes the field
        if value is None:
            body.pop(key)
        else:
            body[key] = value
    unchanged = snapshot(client)
    response = client.post("/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert_error(response, 422, "invalid_request", param, *words)
    unchanged()


def test_missing_type_and_body(client: TestClient, ds: str) -> None:
    unchanged = snapshot(client)
    body = train_body(ds)
    body.pop("type")
    assert_error(client.post("/jobs", json=body), 422, "invalid_request", "type")
    assert_error(client.post("/jobs", json=[1, 2]), 422, "invalid_request", None, "valid dictionary")
    assert_error(client.post("/jobs"), 422, "invalid_request", None, "Field required")
    unchanged()


def test_a_name_holding_another_method_is_a_409(client: TestClient, ds: str) -> None:
    add_version(client, "support-bot", method="ia3")
    before = len(client.queue.sent)  # type: ignore[attr-defined]
    response = client.post("/jobs", json=train_body(ds))
    assert response.status_code == 409, response.text
    assert response.json()["error"]["param"] == "adapter.name" and "ia3" in response.json()["error"]["message"]
    assert len(client.queue.sent) == before  # type: ignore[attr-defined]


def test_a_deleted_dataset_cannot_be_trained_on(client: TestClient, ds: str) -> None:
    assert client.delete(f"/datasets/{ds}").status_code == 200
    unchanged = snapshot(client)
    assert_error(client.post("/jobs", json=train_body(ds)), 422, "invalid_request", "dataset_id", ds)
    unchanged()


# ------------------------------------------------------------------------------------------ submit: merge


def merge_body(*sources: tuple[str, float], combination_type: str = "linear", **params: Any) -> dict[str, Any]:
    return {"type": "merge", "adapter": {"name": "blend"},
            "merge": {"sources": [{"adapter": ref, "weight": w} for ref, w in sources],
                      "combination_type": combination_type, **params}}


def test_merge_job_fixes_its_sources_at_submit_time(client: TestClient) -> None:
    add_version(client, "a")
    add_version(client, "b")
    with sessions(client) as session:
        from app.registry.adapters import set_alias

        set_alias(session, "b", "prod", 1)
        session.commit()
    job = submit(client, merge_body(("a", 0.7), ("b@prod", 0.3)))
    assert (job["type"], job["status"], job["adapter_name"], job["method"]) == ("merge", "queued", "blend", "lora")
    assert job["dataset_id"] is None and job["hyperparameters"] is None
    sources = job["merge"]["sources"]
    assert [(s["adapter"], s["name"], s["version"], s["weight"]) for s in sources] == [("a", "a", 1, 0.7),
                                                                                       ("b@prod", "b", 1, 0.3)]
    assert all(s["version_id"].startswith("av_") for s in sources)
    assert job["merge"]["combination_type"] == "linear" and job["merge"]["density"] is None
    assert client.queue.sent == [(job["id"], "merge")]  # type: ignore[attr-defined]
    add_version(client, "a")  # a@2 appears later: the job still merges a@1
    assert client.get(f"/jobs/{job['id']}").json()["merge"]["sources"][0]["version"] == 1


def test_merge_parameters_are_normalised(client: TestClient) -> None:
    add_version(client, "a", r=4)
    add_version(client, "b", r=8)
    ties = submit(client, merge_body(("a", 1.0), ("b", -0.5), combination_type="ties_svd", density=0.5, svd_rank=4))
    assert ties["merge"]["majority_sign_method"] == "total" and ties["merge"]["svd_full_matrices"] is True
    cat = submit(client, merge_body(("a", 1.0), ("b", 1.0), combination_type="cat"))
    assert cat["merge"]["majority_sign_method"] is None and cat["merge"]["svd_full_matrices"] is None
    single = submit(client, merge_body(("a@1", 0.5)))
    assert len(single["merge"]["sources"]) == 1


@pytest.mark.parametrize(("body", "param", "words"), [
    (merge_body(("a", 1.0), ("ghost", 1.0)), "merge.sources[1].adapter", ("ghost",)),
    (merge_body(("a@9", 1.0)), "merge.sources[0].adapter", ("no version 9",)),
    (merge_body(("a@nope", 1.0)), "merge.sources[0].adapter", ("alias",)),
    (merge_body(("bad name!", 1.0)), "merge.sources[0].adapter", ("invalid adapter name",)),
    (merge_body(), "merge.sources", ("at least 1",)),
    (merge_body(("a", 1.0), combination_type="ties", density=0.5), "merge.sources", ("at least 2",)),
    (merge_body(("a", 1.0), ("b", 1.0), combination_type="avg"), "merge.combination_type", ("linear", "dare_ties")),
    (merge_body(("a", 1.0), ("b", 1.0), combination_type="ties"), "merge.density", ("needs density",)),
    (merge_body(("a", 1.0), ("b", 1.0), combination_type="ties", density=0), "merge.density", ()),
    (merge_body(("a", 1.0), ("b", 1.0), combination_type="dare_linear", density=1.5), "merge.density", ()),
    (merge_body(("a", 1.0), ("b", 1.0), density=0.5), "merge.density", ("does not apply",)),
    (merge_body(("a", 1.0), ("b", 1.0), svd_rank=4), "merge.svd_rank", ("does not apply",)),
    (merge_body(("a", 1.0), ("b", 1.0), combination_type="dare_linear", density=0.5, majority_sign_method="total"),
     "merge.majority_sign_method", ("does not apply",)),
    (merge_body(("a", 1.0), ("b", 1.0), combination_type="ties", density=0.5, majority_sign_method="most"),
     "merge.majority_sign_method", ()),
    (merge_body(("a", 1.0), ("c", 1.0)), "merge.sources", ("equal rank", "4, 8")),
    (merge_body(("a", 1.0), ("d", 1.0), combination_type="cat"), "merge.sources", ("same method",)),
    (merge_body(("a", 1.0), ("e", 1.0), combination_type="svd"), "merge.sources", ("regex",)),
    (merge_body(("a", float("inf")), ("b", 1.0)), "merge.sources[0].weight", ()),
    (merge_body(("a", "0.5"), ("b", 1.0)), "merge.sources[0].weight", ("valid number",)),  # type: ignore[arg-type]
    ({**merge_body(("a", 1.0)), "adapter": {"name": "blend", "config": {"r": 4}}}, "adapter.config", ("unknown field",)),
    ({**merge_body(("a", 1.0)), "hyperparameters": {}}, "hyperparameters", ("unknown field",)),
    ({"type": "merge", "adapter": {"name": "blend"}, "merge": {"sources": [{"adapter": "a"}]}},
     "merge.combination_type", ("Field required",)),
    ({"type": "merge", "adapter": {"name": "blend"}}, "merge", ("Field required",)),
    ({**merge_body(("a", 1.0)), "adapter": {"name": "no spaces"}}, "adapter.name", ("invalid adapter name",)),
])
def test_invalid_merge_jobs_are_refused_before_anything_is_stored(
    client: TestClient, body: dict[str, Any], param: str, words: tuple[str, ...]
) -> None:
    add_version(client, "a", r=4)
    add_version(client, "b", r=4)
    add_version(client, "c", r=8)
    add_version(client, "d", r=4, method="other")
    add_version(client, "e", r=4, target_modules="q_proj|v_proj")
    unchanged = snapshot(client)
    response = client.post("/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert_error(response, 422, "invalid_request", param, *words)
    unchanged()


# ------------------------------------------------------------------------------------------ list and get


def test_list_jobs_pages_and_filters(client: TestClient, ds: str) -> None:
    ids = [submit(client, train_body(ds, adapter={"name": f"bot-{i % 2}"}))["id"] for i in range(5)]
    first = client.get("/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    rest = client.get("/jobs", params={"limit": 10, "after": first["next_cursor"]}).json()
    assert [j["id"] for j in rest["data"]] == ids[::-1][2:]
    assert rest["has_more"] is False and rest["next_cursor"] is None
    client.post(f"/jobs/{ids[1]}/cancel")
    assert [j["id"] for j in client.get("/jobs", params={"status": "cancelled"}).json()["data"]] == [ids[1]]
    assert [j["id"] for j in client.get("/jobs", params={"adapter_name": "bot-0"}).json()["data"]] == [ids[4], ids[2], ids[0]]
    queued_bot1 = client.get("/jobs", params={"adapter_name": "bot-1", "status": "queued"}).json()["data"]
    assert [j["id"] for j in queued_bot1] == [ids[3]]
    assert client.get("/jobs", params={"status": "succeeded"}).json() == {"data": [], "has_more": False,
                                                                          "next_cursor": None}


@pytest.mark.parametrize(("params", "param"), [
    ({"status": "done"}, "status"), ({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
    ({"limit": "x"}, "limit"), ({"after": "job_missing"}, "after"),
])
def test_list_jobs_rejects_bad_parameters(client: TestClient, params: dict[str, Any], param: str) -> None:
    assert_error(client.get("/jobs", params=params), 422, "invalid_request", param)


@pytest.mark.parametrize("route", ["/jobs/job_missing", "/jobs/job_missing/events", "/jobs/job_missing/checkpoints"])
def test_unknown_job_is_404(client: TestClient, route: str) -> None:
    assert_error(client.get(route), 404, "not_found", "job_id", "job_missing")


def test_unknown_job_is_404_for_cancel_and_stream(client: TestClient) -> None:
    assert_error(client.post("/jobs/job_missing/cancel"), 404, "not_found", "job_id")
    streamed = client.get("/jobs/job_missing/events", headers={"Accept": "text/event-stream"})
    assert_error(streamed, 404, "not_found", "job_id")


def test_a_succeeded_job_shows_its_result_version(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))
    with sessions(client) as session:
        claim(session, job["id"], "worker-1", 60)
        version = create_version(session, "support-bot", VersionSpec(method="lora", config={"r": 4}, files={}, size=0,
                                                                     job_id=job["id"], dataset_id=ds))
        finish(session, job["id"], "worker-1", "succeeded", result_version_id=version.id)
        session.commit()
    done = client.get(f"/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["result"] == {"adapter": "support-bot@1", "version": 1}
    assert done["started_at"] and done["finished_at"]
    assert client.get("/jobs").json()["data"][0]["result"] == done["result"]


# ------------------------------------------------------------------------------------------ cancel


def test_cancel_a_queued_job_at_once_then_409(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))
    cancelled = client.post(f"/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["cancel_requested"] is True
    assert cancelled.json()["finished_at"] is not None
    assert_error(client.post(f"/jobs/{job['id']}/cancel"), 409, "conflict", None, "already cancelled")


def test_cancel_a_running_job_flags_it_for_the_worker(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))
    with sessions(client) as session:
        claim(session, job["id"], "worker-1", 60)
        session.commit()
    flagged = client.post(f"/jobs/{job['id']}/cancel").json()
    assert flagged["status"] == "running" and flagged["cancel_requested"] is True
    with sessions(client) as session:
        finish(session, job["id"], "worker-1", "cancelled")
        session.commit()
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    assert_error(client.post(f"/jobs/{job['id']}/cancel"), 409, "conflict", None, "already cancelled")
    kinds = [e["kind"] for e in client.get(f"/jobs/{job['id']}/events").json()["data"]]
    assert kinds == ["queued", "started", "cancel_requested", "cancelled"]


def test_cancel_a_finished_job_is_409(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))
    with sessions(client) as session:
        claim(session, job["id"], "worker-1", 60)
        finish(session, job["id"], "worker-1", "failed", error={"code": "oom", "message": "out of memory"})
        session.commit()
    assert_error(client.post(f"/jobs/{job['id']}/cancel"), 409, "conflict", None, "already failed")
    assert client.get(f"/jobs/{job['id']}").json()["error"] == {"code": "oom", "message": "out of memory"}


# ------------------------------------------------------------------------------------------ events


def _run(client: TestClient, job_id: str, *events: tuple[str, dict[str, Any]], status: str | None = None) -> None:
    """Claim the job (if queued), add ``events``, and finish it with ``status`` if given."""
    with sessions(client) as session:
        if session.get(Job, job_id).status == "queued":
            claim(session, job_id, "worker-1", 60)
        for kind, data in events:
            add_event(session, job_id, kind, f"{kind} event", data)
        if status is not None:
            finish(session, job_id, "worker-1", status)
        session.commit()


def test_events_json_pages(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))["id"]
    _run(client, job, *[("progress", {"step": i, "loss": 1.0 / i}) for i in range(1, 4)])
    first = client.get(f"/jobs/{job}/events", params={"limit": 3}).json()
    assert [e["kind"] for e in first["data"]] == ["queued", "started", "progress"]
    assert first["has_more"] is True and first["next_cursor"] == str(first["data"][-1]["id"])
    assert first["data"][2]["data"] == {"step": 1, "loss": 1.0} and first["data"][2]["message"] == "progress event"
    rest = client.get(f"/jobs/{job}/events", params={"after": first["next_cursor"]}).json()
    assert [e["data"]["step"] for e in rest["data"]] == [2, 3]
    assert rest["has_more"] is False and rest["next_cursor"] is None
    ids = [e["id"] for e in first["data"] + rest["data"]]
    assert ids == sorted(ids)


@pytest.mark.parametrize(("params", "param"), [({"after": -1}, "after"), ({"after": "x"}, "after"),
                                                ({"limit": 0}, "limit"), ({"limit": 1001}, "limit")])
def test_events_reject_bad_parameters(client: TestClient, ds: str, params: dict[str, Any], param: str) -> None:
    job = submit(client, train_body(ds))["id"]
    assert_error(client.get(f"/jobs/{job}/events", params=params), 422, "invalid_request", param)


def _read_sse(response: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Parse an SSE body into events ({id, event, data}) and comment lines."""
    events, comments = [], []
    for block in response.text.split("\n\n"):
        if not block:
            continue
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line)
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events, comments


def test_event_stream_of_a_finished_job_sends_everything_and_ends(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))["id"]
    _run(client, job, ("checkpoint", {"step": 10, "path": "/ckpt/10"}), status="succeeded")
    with client.stream("GET", f"/jobs/{job}/events", headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        response.read()
    events, _ = _read_sse(response)
    assert [e["event"] for e in events] == ["queued", "started", "checkpoint", "succeeded"]
    assert [int(e["id"]) for e in events] == [e["data"]["id"] for e in events]
    assert events[2]["data"]["data"] == {"step": 10, "path": "/ckpt/10"}
    page = client.get(f"/jobs/{job}/events").json()["data"]
    assert [e["data"] for e in events] == page  # the stream carries the same objects as the JSON page


def test_event_stream_resumes_after_last_event_id(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))["id"]
    _run(client, job, ("progress", {"step": 1}), status="failed")
    ids = [e["id"] for e in client.get(f"/jobs/{job}/events").json()["data"]]
    resumed = client.get(f"/jobs/{job}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": str(ids[1])})
    assert [int(e["id"]) for e in _read_sse(resumed)[0]] == ids[2:]
    by_query = client.get(f"/jobs/{job}/events", params={"after": ids[2]}, headers={"Accept": "text/event-stream"})
    assert [e["event"] for e in _read_sse(by_query)[0]] == ["failed"]
    header_wins = client.get(f"/jobs/{job}/events", params={"after": ids[2]},
                             headers={"Accept": "text/event-stream", "Last-Event-ID": str(ids[0])})
    assert [int(e["id"]) for e in _read_sse(header_wins)[0]] == ids[1:]
    bad = client.get(f"/jobs/{job}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": "abc"})
    assert_error(bad, 422, "invalid_request", "Last-Event-ID")


def test_event_stream_follows_a_running_job_until_it_finishes(
    client: TestClient, ds: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is still running when the stream starts; events written afterwards arrive, then it ends."""
    job = submit(client, train_body(ds))["id"]
    _run(client, job)
    polled = threading.Event()
    real_poll = jobs_api._poll

    def poll(*args: Any) -> Any:
        result = real_poll(*args)
        polled.set()
        return result

    monkeypatch.setattr(jobs_api, "_poll", poll)
    monkeypatch.setattr(jobs_api, "POLL_SECONDS", 0.01)

    def worker() -> None:
        polled.wait()  # the stream has seen the job running
        _run(client, job, ("progress", {"step": 1}), ("checkpoint", {"step": 1, "path": "/c/1"}), status="succeeded")

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        response = client.get(f"/jobs/{job}/events", headers={"Accept": "text/event-stream"})
    finally:
        thread.join()
    events, _ = _read_sse(response)
    assert [e["event"] for e in events] == ["queued", "started", "progress", "checkpoint", "succeeded"]


def _collect(client: TestClient, job_id: str, disconnect_after: int) -> str:
    """Run the stream generator directly with a client that goes away after ``disconnect_after`` checks."""
    checks = 0

    class FakeRequest:
        app = client.app  # its state says whether the server is stopping

        async def is_disconnected(self) -> bool:
            nonlocal checks
            checks += 1
            return checks > disconnect_after

    async def run() -> str:
        services = client.app.state.services  # type: ignore[attr-defined]
        return "".join([chunk async for chunk in jobs_api._stream(FakeRequest(), services, job_id, 0)])  # type: ignore[arg-type]

    return asyncio.run(run())


def test_event_stream_stops_when_the_client_disconnects_and_sends_keepalives(
    client: TestClient, ds: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = submit(client, train_body(ds))["id"]
    _run(client, job)  # running: the stream would go on forever
    monkeypatch.setattr(jobs_api, "POLL_SECONDS", 0)
    body = _collect(client, job, disconnect_after=0)
    assert body.count("event: ") == 2 and "keepalive" not in body
    monkeypatch.setattr(jobs_api, "KEEPALIVE_SECONDS", 0)
    body = _collect(client, job, disconnect_after=3)
    assert body.count("event: ") == 2 and body.count(": keepalive\n\n") == 3


# ------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_come_from_checkpoint_events(client: TestClient, ds: str) -> None:
    job = submit(client, train_body(ds))["id"]
    assert client.get(f"/jobs/{job}/checkpoints").json() == {"data": [], "has_more": False, "next_cursor": None}
    _run(client, job, ("checkpoint", {"step": 50, "path": "/w/ckpt-50"}), ("progress", {"step": 60}),
         ("checkpoint", {"step": 100, "path": "/w/ckpt-100"}), ("checkpoint", {"note": "malformed"}))
    listed = client.get(f"/jobs/{job}/checkpoints").json()
    assert [(c["step"], c["path"]) for c in listed["data"]] == [(50, "/w/ckpt-50"), (100, "/w/ckpt-100")]
    assert all(c["created_at"] for c in listed["data"]) and listed["has_more"] is False
    _run(client, job, ("checkpoint", {"step": 150, "path": "/w/ckpt-150"}))  # save_total_limit 2 prunes 50
    assert [c["step"] for c in client.get(f"/jobs/{job}/checkpoints").json()["data"]] == [100, 150]
    _run(client, job, status="succeeded")  # the worker removes its work directory
    assert client.get(f"/jobs/{job}/checkpoints").json()["data"] == []


def test_openapi_documents_every_job_field(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        if path.startswith("/jobs"):
            for op in ops.values():
                assert op.get("summary") and op.get("description"), path
    schemas = spec["components"]["schemas"]
    for name in ("JobOut", "JobList", "JobEventOut", "JobEventList", "CheckpointOut", "CheckpointList", "ProgressOut",
                 "ResultOut", "TrainJobIn", "TrainAdapterIn", "MergeJobIn", "MergeAdapterIn", "MergeParamsIn",
                 "MergeSourceIn"):
        for field, schema in schemas[name]["properties"].items():
            assert schema.get("description"), f"{name}.{field} has no description"
    hyper = schemas["TrainJobIn"]["properties"]["hyperparameters"]["properties"]
    assert hyper["learning_rate"]["default"] == 2e-4 and all(p.get("description") for p in hyper.values())


def test_a_rank_beyond_the_layers_dimensions_is_refused(client: TestClient, ds: str) -> None:
    body = train_body(ds)
    body["adapter"]["config"]["r"] = 4096  # the demo model's layers are far smaller
    response = client.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["param"] == "adapter.config.r" and "r=4096 exceeds" in error["message"]
    assert client.queue.sent == []  # type: ignore[attr-defined]
