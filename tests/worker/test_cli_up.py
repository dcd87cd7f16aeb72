"""``adapterforge up`` as a user runs it: API and worker start, a job sent through the broker is
trained by the worker, Ctrl-C stops both; the supervisor restarts a worker that dies."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from adapterforge.cli import WorkerSupervisor
from tests.e2e.harness import wait_for

ROOT = Path(__file__).resolve().parents[2]
WAIT = 180.0  # generous: two processes import torch on a shared two-core CI machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(what: str, check: Callable[[], object], timeout: float = WAIT) -> object:
    return wait_for(check, timeout, what)


class _Output:
    """Collects a process's output lines on a thread (so its pipe never fills)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def worker_pids(self) -> list[int]:
        return [int(m) for m in re.findall(r"worker started \(pid (\d+)\)", self.text())]


@pytest.fixture
def up(tmp_path: Path, demo_model_dir: Path) -> Iterator[tuple[subprocess.Popen[str], _Output, int, Path]]:
    port, data = _free_port(), tmp_path / "data"
    env = {**os.environ, "ADAPTERFORGE_DATA_DIR": str(data), "ADAPTERFORGE_BASE_MODEL": str(demo_model_dir)}
    for key in ("ADAPTERFORGE_DATABASE_URL", "ADAPTERFORGE_BROKER_URL", "ADAPTERFORGE_API_KEYS"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "adapterforge.cli", "up", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _Output(proc)
    try:
        yield proc, output, port, data
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in output.worker_pids():  # in their own sessions: never leave one behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_serves_trains_and_stops_cleanly(up: tuple[subprocess.Popen[str], _Output, int, Path],
                                            demo_model_dir: Path) -> None:
    proc, output, port, data = up
    _wait_for("/readyz", lambda: proc.poll() is not None or _ready(port))
    assert proc.poll() is None, output.text()
    _wait_for("the worker", lambda: "celery@" in output.text() and " ready." in output.text())
    [worker_pid] = output.worker_pids()
    assert _alive(worker_pid)
    text = output.text()
    assert "AdapterForge worker starting: base model" in text and str(demo_model_dir) in text

    # a job sent through the embedded broker, as POST /jobs does, is trained by the worker
    from app.db import Database
    from app.queue import CeleryJobQueue
    from app.registry.datasets import create_dataset
    from app.registry.jobs import create_job, get_job, list_events
    from app.settings import Settings
    from app.storage import LocalArtifactStore

    settings = Settings(data_dir=data, base_model=str(demo_model_dir))
    db, store = Database(settings.resolved_database_url), LocalArtifactStore(settings.store_dir)
    line = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}
    ref = store.put_bytes((json.dumps(line) + "\n").encode() * 4)
    queue = CeleryJobQueue(settings)

    def submit(name: str, max_steps: int) -> str:
        spec = {"method": "lora", "config": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                "hyperparameters": {"max_steps": max_steps, "batch_size": 2, "max_seq_len": 32}}
        with db.session() as s:
            dataset_id = create_dataset(s, filename="d.jsonl", sha256=ref.sha256, size=ref.size, form="chat",
                                        summary={}).id
            job_id = create_job(s, type="train", adapter_name=name, spec=spec, dataset_id=dataset_id).id
        queue.enqueue(job_id, "train")
        return job_id

    def job(job_id: str) -> tuple[str, int, list[str]]:
        with db.session() as s:
            row = get_job(s, job_id)
            return row.status, row.step, [e.kind for e in list_events(s, job_id, limit=1000)]

    try:
        short = submit("hello", 2)
        _wait_for(f"job {short}", lambda: job(short)[0] in ("succeeded", "failed", "cancelled"))
        assert job(short)[0] == "succeeded", output.text()[-3000:]

        # Ctrl-C while a job trains: the worker hands the job back (it resumes on the next start)
        long = submit("long", 1_000_000)
        _wait_for(f"job {long} training", lambda: job(long)[1] > 0)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT) == 0, output.text()[-3000:]
        status, _, kinds = job(long)
        assert status == "running" and kinds[-1] == "interrupted", kinds
    finally:
        queue.close()
        db.dispose()
    assert not _alive(worker_pid)
    assert "worker stopped" in output.text()
    # one Ctrl-C is a graceful shutdown (uvicorn took it for a second one: requests cut, no app shutdown)
    assert "Application shutdown complete" in output.text() and "CancelledError" not in output.text(), \
        output.text()[-3000:]


def test_supervisor_restarts_a_dead_worker_and_stops_it() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    supervisor = WorkerSupervisor(sleeper, stop_timeout=10, poll=0.05)
    supervisor.start()
    pids: list[int] = []
    try:
        first = supervisor.pid
        assert first is not None
        pids.append(first)
        os.kill(first, signal.SIGKILL)
        second = _wait_for("a new worker", lambda: supervisor.pid != first and supervisor.pid, timeout=30)
        assert isinstance(second, int)
        pids.append(second)
        assert _alive(second)
    finally:
        supervisor.stop()
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_up_refuses_an_unmigrated_server_database(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Only the embedded SQLite database is migrated automatically; another one must be migrated first."""
    from adapterforge.cli import main

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # `up` sets the root level from the settings
    monkeypatch.setenv("ADAPTERFORGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ADAPTERFORGE_DATABASE_URL", db_url)
    assert main(["up", "--port", str(_free_port())]) == 1
    assert "run `adapterforge db upgrade`" in caplog.text
    assert "worker started" not in caplog.text
