"""End to end: real API and worker processes, on the production stack (PostgreSQL + Redis) and on
the embedded default (``adapterforge up``: SQLite + filesystem broker), including the faults the
durability design exists for: a worker SIGKILLed mid-training, and Redis restarted with jobs queued.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.registry.migrate import upgrade
from tests.e2e.flow import (
    check_registered_and_loadable,
    event_kinds,
    submit_train_job,
    upload_dataset,
    wait_for_job,
)
from tests.e2e.harness import Processes, RedisServer, wait_for

FAST_RECOVERY = {
    "ADAPTERFORGE_JOB_LEASE_SECONDS": "3",
    "ADAPTERFORGE_RECONCILE_INTERVAL_SECONDS": "1",
    "ADAPTERFORGE_REQUEUE_AFTER_SECONDS": "5",
}


def _env(tmp: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    return {"ADAPTERFORGE_DATA_DIR": str(tmp / "data"), "ADAPTERFORGE_BASE_MODEL": str(model_dir),
            **FAST_RECOVERY, **extra}


@pytest.fixture
def production(tmp_path: Path, demo_model_dir: Path, pg_url: str, redis_server: RedisServer) -> Iterator[Processes]:
    """API + one worker on PostgreSQL and a private Redis (the schema migrated first, as compose does)."""
    upgrade(pg_url)
    procs = Processes(tmp_path, _env(tmp_path, demo_model_dir, ADAPTERFORGE_DATABASE_URL=pg_url,
                                     ADAPTERFORGE_BROKER_URL=redis_server.url))
    procs.start_api()
    try:
        yield procs
    finally:
        procs.stop_all()


def test_embedded_default_trains_registers_and_serves_a_peft_loadable_adapter(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    procs = Processes(tmp_path, _env(tmp_path, demo_model_dir))
    procs.start_up()
    try:
        procs.wait_ready()
        with httpx.Client(base_url=procs.base, timeout=30) as client:
            dataset_id = upload_dataset(client)
            job_id = submit_train_job(client, "embedded-qa", dataset_id)
            job = wait_for_job(client, job_id, procs.logs)
            assert job["status"] == "succeeded", f"{job}\n{procs.logs()}"
            assert job["result"]["adapter"] == "embedded-qa@1"
            check_registered_and_loadable(client, "embedded-qa", job_id, dataset_id, demo_model_dir, tmp_path)
    finally:
        procs.stop_all()


def test_production_stack_trains_registers_and_serves_a_peft_loadable_adapter(
    production: Processes, demo_model_dir: Path, tmp_path: Path
) -> None:
    production.start_worker()
    production.wait_ready()
    with httpx.Client(base_url=production.base, timeout=30) as client:
        dataset_id = upload_dataset(client)
        job_id = submit_train_job(client, "prod-qa", dataset_id)
        job = wait_for_job(client, job_id, production.logs)
        assert job["status"] == "succeeded", f"{job}\n{production.logs()}"
        assert job["progress"]["step"] == job["progress"]["total_steps"] == 8
        kinds = event_kinds(client, job_id)
        assert kinds[0] == "queued" and "started" in kinds and "checkpoint" in kinds and kinds[-1] == "succeeded"
        check_registered_and_loadable(client, "prod-qa", job_id, dataset_id, demo_model_dir, tmp_path)


def test_worker_killed_mid_training_resumes_from_its_checkpoint(production: Processes) -> None:
    production.start_worker("worker1")
    production.wait_ready()
    with httpx.Client(base_url=production.base, timeout=30) as client:
        dataset_id = upload_dataset(client)
        job_id = submit_train_job(client, "survivor", dataset_id, max_steps=120, save_steps=4)

        def checkpointed() -> bool:
            return "checkpoint" in event_kinds(client, job_id)

        wait_for(checkpointed, 180, "a first checkpoint", production.logs)
        production.kill("worker1")  # SIGKILL: no cleanup, the lease is left to expire
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
        production.start_worker("worker2")
        job = wait_for_job(client, job_id, production.logs)
        assert job["status"] == "succeeded", f"{job}\n{production.logs()}"
        assert job["attempts"] == 2
        events = client.get(f"/jobs/{job_id}/events", params={"limit": 1000}).json()["data"]
        kinds = [e["kind"] for e in events]
        assert "requeued" in kinds and "resumed" in kinds, kinds
        resumed = [e for e in events if e["kind"] == "resumed_from_checkpoint"]
        assert len(resumed) == 1 and resumed[0]["data"]["step"] >= 4, events
        assert job["progress"]["step"] == 120


def test_redis_restarted_with_jobs_queued_loses_none(production: Processes, redis_server: RedisServer) -> None:
    production.wait_ready()
    with httpx.Client(base_url=production.base, timeout=30) as client:
        dataset_id = upload_dataset(client)
        jobs = [submit_train_job(client, f"queued-{i}", dataset_id, max_steps=4) for i in range(3)]
        redis_server.kill()  # no persistence: the three messages are gone
        redis_server.start()
        production.start_worker()
        for job_id in jobs:
            job = wait_for_job(client, job_id, production.logs)
            assert job["status"] == "succeeded", f"{job}\n{production.logs()}"
            assert "requeued" in event_kinds(client, job_id)
        listed = {a["name"]: a["latest_version"] for a in client.get("/adapters", params={"q": "queued-"}).json()["data"]}
        assert listed == {"queued-0": 1, "queued-1": 1, "queued-2": 1}


def test_ctrl_c_stops_the_embedded_service_while_a_client_follows_a_job(tmp_path: Path, demo_model_dir: Path) -> None:
    """README: "Ctrl-C stops both, and a job that was training resumes from its last checkpoint on the
    next start". A client following the job's event stream must not keep the API (and so the worker)
    up until the job has trained to its end."""
    procs = Processes(tmp_path, _env(tmp_path, demo_model_dir))
    procs.start_up()
    try:
        procs.wait_ready()
        with httpx.Client(base_url=procs.base, timeout=30) as client:
            job_id = submit_train_job(client, "long", upload_dataset(client), max_steps=100_000, save_steps=5)
            wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress"]["step"] >= 1, 240, "training to start",
                     procs.logs)
        follower = threading.Thread(target=_follow, args=(procs.base, job_id), daemon=True)
        follower.start()
        time.sleep(1.0)  # the stream is open
        up = procs.procs["up"]
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in its terminal sends
        try:
            up.wait(timeout=90)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"adapterforge up still running 90 s after SIGINT\n{procs.logs()}") from None
        assert up.returncode == 0, procs.logs()
        # the event stream ended when the server began to stop, not when uvicorn's grace period ran out
        assert "graceful shutdown exceeded" not in procs.logs(tail=100_000), procs.logs()
        procs.start_up()  # the job was handed back: it resumes
        procs.wait_ready()
        with httpx.Client(base_url=procs.base, timeout=30) as client:
            job = client.get(f"/jobs/{job_id}").json()
            assert job["status"] in ("queued", "running"), job
    finally:
        procs.stop_all()


def _follow(base: str, job_id: str) -> None:
    with contextlib.suppress(httpx.HTTPError), httpx.stream(
            "GET", f"{base}/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}, timeout=None) as events:
        for _ in events.iter_lines():
            pass
