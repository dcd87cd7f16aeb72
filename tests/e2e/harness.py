"""Real processes for end-to-end tests: the API (uvicorn), Celery workers, a private Redis server.

Each process logs to a file under the test's tmp dir; :meth:`Processes.logs` returns the tails for
assertion messages, so a failing e2e test says what the service printed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str] = lambda: "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what`` (with the logs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")


class Processes:
    """Starts and stops the service's processes for one test."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"

    def _start(self, key: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{key}.log").open("ab")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[key] = proc
        return proc

    def start_api(self) -> None:
        self._start("api", [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app",
                            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "info"])

    def start_up(self) -> None:
        """The embedded default: ``adapterforge up`` (API + one solo worker)."""
        self._start("up", [sys.executable, "-m", "adapterforge.cli", "up", "--host", "127.0.0.1",
                           "--port", str(self.port)])

    def start_worker(self, key: str = "worker") -> subprocess.Popen[bytes]:
        return self._start(key, [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu",
                                 "-P", "solo", "-c", "1", "--loglevel", "INFO", "-n", f"{key}@%h"])

    def wait_ready(self, timeout: float = 180) -> None:
        def ready() -> bool:
            for key, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{key} exited with {proc.returncode}\n{self.logs()}")
            try:
                return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, "the API to become ready", self.logs)

    def kill(self, key: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(key)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self.procs.clear()

    def logs(self, tail: int = 4000) -> str:
        out = []
        for log in sorted(self.tmp.glob("*.log")):
            out.append(f"----- {log.name} -----\n{log.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)


class RedisServer:
    """A private ``redis-server`` with no persistence (a restart loses every queued message)."""

    def __init__(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed")
        self.binary, self.tmp = binary, tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.tmp / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)], stdout=log, stderr=subprocess.STDOUT,
        )
        import redis

        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 20, "redis-server to start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _pings(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:
        return False
