"""/metrics and the health probes at their edges: Starlette's own routes counted under their path, the
slots gauge after a failed slot load, probes that answer while the database does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.app.serving_helpers import served_app, serving_settings, upload


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(s.labels), s.value) for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name]


def test_docs_and_openapi_requests_are_counted_under_their_route_not_as_unmatched(client: TestClient) -> None:
    """``/openapi.json`` and ``/docs`` are counted under their paths, not ``route="unmatched"`` (the label of
    paths no route matched: 404s)."""
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/docs").status_code == 200
    samples = _samples(client.get("/metrics").text, "adapterforge_http_requests_total")
    ok_unmatched = [labels for labels, _ in samples if labels["route"] == "unmatched" and labels["status"] == "200"]
    assert ok_unmatched == [], samples
    routes = {labels["route"] for labels, _ in samples if labels["status"] == "200"}
    assert {"/openapi.json", "/docs"} <= routes, routes


def test_slots_used_gauge_follows_a_failed_slot_load_that_freed_the_slot(
        tmp_path: Path, demo_model_dir: Path, base_host: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """With one slot holding a0, a request on a1 evicts a0 and its copy into the slot fails (500): the slot
    goes back to the free pool empty, and ``adapterforge_adapter_slots_used`` says 0 (it said 1)."""
    pytest.importorskip("peft")
    from tests.app.serving_helpers import peft_adapter

    root = tmp_path_factory.mktemp("review-adapters")
    folders = [peft_adapter(demo_model_dir, root / f"a{i}", seed=40 + i, r=4) for i in range(2)]
    with served_app(serving_settings(tmp_path, demo_model_dir, adapter_slots=1), base_host) as client:
        host = client.app.state.services.serving  # type: ignore[attr-defined]
        for i, folder in enumerate(folders):
            upload(client, f"a{i}", folder)
        ok = client.post("/generate", params={"adapter": "a0"}, json={"prompt": "hi", "max_new_tokens": 2})
        assert ok.status_code == 200, ok.text
        original = host.slotted.load

        def failing_copy(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("simulated slot copy failure")

        host.slotted.load = failing_copy
        try:
            failed = client.post("/generate", params={"adapter": "a1"}, json={"prompt": "hi", "max_new_tokens": 2})
        finally:
            host.slotted.load = original
        assert failed.status_code == 500, failed.text
        really_used = len(host.bank._slots)
        assert really_used == 0  # a0 was evicted for a1, whose load failed: the slot is free
        samples = _samples(client.get("/metrics").text, "adapterforge_adapter_slots_used")
        assert samples == [({}, float(really_used))], samples


def test_readyz_and_metrics_answer_when_the_database_does_not(tmp_path: Path, demo_model_dir: Path,
                                                              base_host: Any) -> None:
    """A PostgreSQL server that accepts connections but never answers (a hung server, or a host whose packets
    are dropped: no RST): ``/readyz`` answers 503 naming the database and ``/metrics`` still answers (neither
    answered at all before: no connect timeout, and each probe held a default-executor thread for ever)."""
    import socket
    import threading
    import time

    from app.db import Database
    from app.main import create_app
    from app.registry.migrate import upgrade
    from app.settings import Settings
    from tests.app.conftest import RecordingQueue

    url = f"sqlite:///{tmp_path / 'af.db'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, base_model=str(demo_model_dir),
                        reconcile_interval_seconds=0, serving_enabled=False)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections complete in the backlog; nothing ever reads or writes them
    port = silent.getsockname()[1]
    app = create_app(settings, queue=RecordingQueue(), base_model=base_host)
    answers: dict[str, tuple[int, Any]] = {}
    threads: list[threading.Thread] = []
    try:
        with TestClient(app) as client:
            real_db = app.state.services.db
            app.state.services.db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
            try:
                for path in ("/readyz", "/metrics"):
                    def ask(path: str = path) -> None:
                        r = client.get(path)
                        answers[path] = (r.status_code, r.json() if path == "/readyz" else r.text)

                    thread = threading.Thread(target=ask, daemon=True)
                    thread.start()
                    threads.append(thread)
                deadline = time.monotonic() + 20
                for thread in threads:
                    thread.join(max(0.0, deadline - time.monotonic()))
                unanswered = [p for p in ("/readyz", "/metrics") if p not in answers]
            finally:
                silent.close()  # the stuck connects now fail, so the threads end
                for thread in threads:
                    thread.join(30)
                app.state.services.db.dispose()
                app.state.services.db = real_db
    finally:
        silent.close()
    assert unanswered == [], f"no answer within 20 s from {unanswered}"
    status, body = answers["/readyz"]
    assert status == 503 and body["checks"]["database"]["ok"] is False, body
    assert answers["/metrics"][0] == 200
