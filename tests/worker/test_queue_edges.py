"""The queue / worker integration under broker faults: the API's real Celery producer
(``app.queue.CeleryJobQueue``) against a private ``redis-server`` that stops answering (SIGSTOP: the
process is frozen, its socket still accepts connections, as with a hung or partitioned Redis host).

docs/api.md: "if the broker is down the job is still accepted and the reconciler enqueues it later";
docs/deployment.md: `/readyz` "answers 503 while the database or the broker is unreachable". Each test
waits with a generous deadline and never asserts a duration.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import api_settings, base_host
from tests.e2e.harness import RedisServer

__all__ = ["api_settings", "base_host"]

#: Generous: with socket timeouts on the broker connection, a frozen Redis fails an operation (publish
#: retries included) well within this.
DEADLINE = 90.0

LINES = b'{"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}\n' * 4
JOB = {"type": "train", "adapter": {"name": "qa", "method": "lora",
                                    "config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
       "hyperparameters": {"max_steps": 2, "batch_size": 2, "max_seq_len": 32}}

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the broker is under test here


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    server.start()
    yield server
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)  # (in case a test left it frozen)
    server.stop()


class _Frozen:
    """SIGSTOP the Redis server for the ``with`` block (SIGCONT on the way out, whatever happens)."""

    def __init__(self, server: RedisServer) -> None:
        assert server.proc is not None
        self.pid = server.proc.pid

    def __enter__(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def __exit__(self, *_: object) -> None:
        os.kill(self.pid, signal.SIGCONT)


def _within(deadline: float, call: Callable[[], Any]) -> tuple[bool, Any]:
    """Run ``call`` on a thread; (whether it returned or raised within ``deadline`` s, its result)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # the caller asserts on it
            out["value"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    return not thread.is_alive(), out.get("value")


def _settings_on(api_settings: Settings, redis_server: RedisServer) -> Settings:
    return api_settings.model_copy(update={"broker_url": redis_server.url})


def _dataset(client: TestClient) -> str:
    up = client.post("/datasets", files={"file": ("train.jsonl", LINES, "application/jsonl")})
    assert up.status_code == 201, up.text
    return str(up.json()["id"])


# ------------------------------------------------------------------------------- submit, broker hung


def test_submit_is_accepted_when_the_redis_broker_stops_answering(api_settings: Settings, base_host: Any,
                                                                  redis_server: RedisServer) -> None:
    """A broker that does not answer is down: POST /jobs must still answer 201 (the row committed,
    queued) and leave the job to the reconciler, not hang the request (and one of the API's worker
    threads) for as long as Redis is unresponsive."""
    import redis

    from app.reconciler import reconcile_once

    settings = _settings_on(api_settings, redis_server)
    app = create_app(settings, base_model=base_host)  # the real Celery producer on Redis
    with TestClient(app) as client:
        dataset_id = _dataset(client)
        with _Frozen(redis_server):
            answered, response = _within(DEADLINE, lambda: client.post("/jobs", json={**JOB, "dataset_id": dataset_id}))
        assert answered, (f"POST /jobs had no answer {DEADLINE:.0f} s after the broker stopped answering "
                          "(app.queue.CeleryJobQueue.enqueue blocks on a Redis socket that has no timeout)")
        assert not isinstance(response, BaseException), response
        assert response.status_code == 201, response.text
        job = response.json()
        assert job["status"] == "queued"
        # Redis answers again: the reconciler rings for the job whose message was never sent
        services = app.state.services
        sent = reconcile_once(services.db, services.queue, requeue_after=0)
        assert sent == 1
        assert redis.Redis.from_url(redis_server.url).llen("gpu") == 1


def test_the_reconciler_is_not_stuck_by_a_broker_that_stops_answering(api_settings: Settings, base_host: Any,
                                                                      redis_server: RedisServer) -> None:
    """A reconciler pass with the broker hung must give up ("broker down: try again next pass"), not block
    its thread forever: while it blocks, no lost job is rung again and no abandoned cancel is ended."""
    from app.queue import CeleryJobQueue
    from app.reconciler import reconcile_once

    settings = _settings_on(api_settings, redis_server)
    app = create_app(settings, base_model=base_host)
    queue = CeleryJobQueue(settings)
    try:
        with TestClient(app) as client:
            dataset_id = _dataset(client)
            submitted = client.post("/jobs", json={**JOB, "dataset_id": dataset_id})
            assert submitted.status_code == 201, submitted.text
            services = app.state.services
            with _Frozen(redis_server):
                returned, result = _within(DEADLINE, lambda: reconcile_once(services.db, queue, requeue_after=0))
            assert returned, (f"a reconciler pass was still blocked {DEADLINE:.0f} s after the broker stopped "
                              "answering (app.reconciler.reconcile_once -> CeleryJobQueue.enqueue has no timeout)")
            assert result == 0, result
    finally:
        queue.close()


# ------------------------------------------------------------------------------- readiness, broker hung


def test_readiness_probes_of_a_hung_broker_do_not_stall_the_api(api_settings: Settings, base_host: Any,
                                                                 redis_server: RedisServer) -> None:
    """/readyz gives up on the broker after its probe timeout (503) but leaves the blocked ping running on
    asyncio's shared default executor. A load balancer polling /readyz fills that executor
    (min(32, cpus + 4) threads) with pings that never return, and every endpoint that runs its work there
    (event pages and streams, dataset and adapter uploads, generation leases) stops answering."""
    settings = _settings_on(api_settings, redis_server)
    app = create_app(settings, base_model=base_host)
    probes = min(32, (os.cpu_count() or 1) + 4) + 2
    with TestClient(app) as client:
        dataset_id = _dataset(client)
        submitted = client.post("/jobs", json={**JOB, "dataset_id": dataset_id})
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]
        with _Frozen(redis_server):
            results: list[tuple[bool, Any]] = []
            threads = [threading.Thread(target=lambda: results.append(_within(DEADLINE, lambda: client.get("/readyz"))))
                       for _ in range(probes)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert all(done for done, _ in results), "a /readyz probe did not answer"
            assert {r.status_code for _, r in results} == {503}, [r.text for _, r in results]
            answered, events = _within(DEADLINE, lambda: client.get(f"/jobs/{job_id}/events"))
        assert answered, (f"GET /jobs/{{id}}/events (no broker involved) had no answer {DEADLINE:.0f} s after "
                          f"{probes} /readyz probes of a hung broker: their pings hold every thread of asyncio's "
                          "default executor (app.api.health._probe)")
        assert events.status_code == 200, events.text
