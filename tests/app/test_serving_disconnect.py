"""A client that goes away stops its generation (real uvicorn server, real sockets)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.main import create_app
from tests.app.conftest import RecordingQueue
from tests.app.serving_helpers import serving_settings
from tests.e2e.harness import free_port, wait_for

LONG = {"prompt": "x", "max_new_tokens": 250, "min_new_tokens": 250, "temperature": 0}


@pytest.fixture
def server(tmp_path: Path, demo_model_dir: Path, base_host: Any) -> Iterator[tuple[str, Any]]:
    app = create_app(serving_settings(tmp_path, demo_model_dir), queue=RecordingQueue(), base_model=base_host)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_for(lambda: uv.started, 60, "uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        uv.should_exit = True
        thread.join(30)


def cancelled(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("adapterforge_generate_requests_total{") and 'finish_reason="cancelled"' in line:
            return float(line.split()[-1])
    return 0.0


def test_closing_a_stream_stops_the_generation(server: tuple[str, Any]) -> None:
    base, app = server
    engine = app.state.services.serving.engine
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/generate", json={**LONG, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert any(line.startswith("event: token") for line in lines)
    wait_for(lambda: cancelled(base) == 1 and engine.running_rows == 0, 10, "the engine to drop the request")
    done = httpx.post(f"{base}/generate", json={"prompt": "y", "max_new_tokens": 3}, timeout=30)
    assert done.status_code == 200


def test_a_client_timing_out_stops_the_generation(server: tuple[str, Any]) -> None:
    base, app = server
    engine = app.state.services.serving.engine
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/generate", json=LONG, timeout=httpx.Timeout(30, read=0.05))
    wait_for(lambda: cancelled(base) == 1 and engine.running_rows == 0, 10, "the engine to drop the request")
    assert time.monotonic() - started < 10


def test_leases_taken_after_their_request_was_cancelled_are_released(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request task is cancelled (the server stopping) while a thread still reads its adapter: when the
    thread ends, the leases it took go back, rather than keep the adapter held for ever."""
    import asyncio
    from types import SimpleNamespace

    from app.api import inference

    reading, released = threading.Event(), []
    bank = SimpleNamespace(release=released.append)
    monkeypatch.setattr(inference, "serving_host", lambda services: SimpleNamespace(bank=bank))

    def slow_lease(services: Any, ref: str, param: str, count: int) -> tuple[str, list[str]]:
        reading.set()
        time.sleep(0.3)
        return "version", [f"lease{i}" for i in range(count)]

    monkeypatch.setattr(inference, "_lease", slow_lease)

    async def main() -> None:
        task = asyncio.ensure_future(inference._leased(None, "a", "adapter", 2))  # type: ignore[arg-type]
        await asyncio.to_thread(reading.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if released:
                break
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert released == ["lease0", "lease1"]


def test_a_stream_that_leaves_before_its_first_token_never_runs(tmp_path: Path, demo_model_dir: Path,
                                                                base_host: Any) -> None:
    """A stream's answer starts with its first event; a client that leaves while the request still waits
    for a row (one row here, taken by a long request) cancels it there: it is never run."""
    settings = serving_settings(tmp_path, demo_model_dir, max_batch_size=1)
    app = create_app(settings, queue=RecordingQueue(), base_model=base_host)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_for(lambda: uv.started, 60, "uvicorn to start")
    base = f"http://127.0.0.1:{port}"
    engine = app.state.services.serving.engine
    try:  # long requests (about half a second each here) ahead of the stream in a batch of one row
        longs = [threading.Thread(target=lambda: httpx.post(f"{base}/generate", json=LONG, timeout=120))
                 for _ in range(4)]
        for long in longs:
            long.start()
        wait_for(lambda: engine.running_rows == 1 and engine.queue_depth >= 2, 10, "long requests to queue")
        with pytest.raises(httpx.ReadTimeout):  # nothing comes, not even the status line, while it waits
            httpx.post(f"{base}/generate", json={"prompt": "y", "max_new_tokens": 3, "stream": True},
                       timeout=httpx.Timeout(30, read=0.1))
        wait_for(lambda: cancelled(base) == 1, 10, "the queued stream to be cancelled")
        for long in longs:
            long.join(120)
        first_tokens = [line for line in httpx.get(f"{base}/metrics").text.splitlines()
                        if line.startswith("adapterforge_time_to_first_token_seconds_count")]
        assert first_tokens and float(first_tokens[0].split()[-1]) == len(longs)  # the stream never ran
    finally:
        uv.should_exit = True
        thread.join(30)
