"""App test fixtures: a fresh database per test on SQLite and, where reachable, PostgreSQL.

PostgreSQL tests skip with the reason when the server is not reachable, except in CI (``CI`` set),
where they fail: CI must exercise the real database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine
from app.registry.migrate import upgrade

PG_URL = os.environ.get("ADAPTERFORGE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_available() -> str | None:
    try:
        engine = create_engine(PG_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any connection failure means: not available here
        return f"PostgreSQL not reachable at {PG_URL}: {exc.__class__.__name__}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'af.db'}"
        return
    reason = _postgres_available()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI requires PostgreSQL: {reason}")
        pytest.skip(reason)
    with postgres_schema("t") as url:
        yield url


@contextmanager
def postgres_schema(prefix: str) -> Iterator[str]:
    """A fresh, empty schema in the test PostgreSQL database, dropped afterwards; yields its URL."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a freshly migrated database (pool large enough for the concurrency tests)."""
    upgrade(db_url)
    engine = make_engine(db_url, pool_size=25)  # the app's engine: SQLite's WAL and busy timeout too
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


class RecordingQueue:
    """A job queue that records what the API enqueued (API tests run no worker)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.fail = False

    def enqueue(self, job_id: str, job_type: str) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.sent.append((job_id, job_type))

    def ping(self) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo base model, built once per test session."""
    from adapters_core.tiny_models import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(scope="session")
def base_host(demo_model_dir: Path) -> Any:
    """The API's view of the demo base model (tokenizer + meta architecture), shared by API tests."""
    from app.base_model import BaseModelHost
    from app.settings import Settings

    return BaseModelHost.load(Settings(base_model=str(demo_model_dir)))


@pytest.fixture
def api_settings(db_url: str, tmp_path: Path, demo_model_dir: Path) -> Any:
    from app.settings import Settings

    upgrade(db_url)
    # inference has its own tests (test_api_generate.py, ...): the rest of the API needs no resident model
    return Settings(data_dir=tmp_path / "data", database_url=db_url, base_model=str(demo_model_dir),
                    reconcile_interval_seconds=0, max_upload_bytes=8 * 1024 * 1024, serving_enabled=False)


@pytest.fixture
def client(api_settings: Any, base_host: Any) -> Iterator[Any]:
    """A TestClient on a fresh database (SQLite and PostgreSQL); ``client.queue`` records enqueues."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    queue = RecordingQueue()
    app = create_app(api_settings, queue=queue, base_model=base_host)
    with TestClient(app) as test_client:
        test_client.queue = queue  # type: ignore[attr-defined]
        test_client.settings = api_settings  # type: ignore[attr-defined]
        yield test_client
