"""Alembic migrations: the initial revision builds exactly the models' schema, on SQLite and Postgres."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from app.registry.migrate import alembic_config, current_revision, head_revision, schema_is_current, upgrade
from app.registry.models import Base


def test_upgrade_builds_the_models_schema(db_url: str) -> None:
    assert not schema_is_current(db_url)
    upgrade(db_url)
    assert current_revision(db_url) == head_revision() and schema_is_current(db_url)
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        tables = set(inspect(engine).get_table_names())
        assert {"datasets", "jobs", "job_events", "adapters", "adapter_versions", "aliases"} <= tables
    finally:
        engine.dispose()


def test_downgrade_removes_everything(db_url: str) -> None:
    from alembic import command

    upgrade(db_url)
    command.downgrade(alembic_config(db_url), "base")
    engine = create_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_cli_db_upgrade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterforge.cli import main

    monkeypatch.setenv("ADAPTERFORGE_DATA_DIR", str(tmp_path / "data"))
    assert main(["db", "upgrade"]) == 0
    url = f"sqlite:///{tmp_path / 'data' / 'adapterforge.db'}"
    assert schema_is_current(url)


def test_a_ctrl_c_during_an_upgrade_takes_effect_once_it_is_done(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Alembic runs SQLite's DDL outside transactions: a Ctrl-C half-way through the first start left tables
    without a recorded revision, and a database no later `adapterforge db upgrade` could bring current."""
    import os
    import signal

    from alembic import command

    from app.registry import migrate

    real = command.upgrade

    def interrupted(config: Any, revision: str) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the first migration runs
        real(config, revision)

    monkeypatch.setattr(command, "upgrade", interrupted)
    url = f"sqlite:///{tmp_path / 'af.db'}"
    with pytest.raises(KeyboardInterrupt):
        migrate.upgrade(url)
    assert migrate.current_revision(url) == migrate.head_revision()  # complete, then interrupted
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
