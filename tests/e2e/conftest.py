"""E2E fixtures: a private PostgreSQL schema and Redis server; the demo model shared with the app tests.

Outside CI these skip with the reason when PostgreSQL or ``redis-server`` is missing; in CI (``CI``
set) they fail instead: CI must exercise the real production stack.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.conftest import _postgres_available, demo_model_dir, postgres_schema  # noqa: F401  (fixture re-export)
from tests.e2e.harness import RedisServer


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI requires it: {reason}")
    pytest.skip(reason)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the test PostgreSQL database (migrated by the code under test)."""
    reason = _postgres_available()
    if reason:
        _unavailable(reason)
    with postgres_schema("e2e") as url:
        yield url


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path)
    except FileNotFoundError as exc:
        _unavailable(str(exc))
    server.start()
    yield server
    server.stop()
