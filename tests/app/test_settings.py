"""Settings: embedded defaults under DATA_DIR, env prefix, URL checks that name the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_embedded_defaults_live_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERFORGE_DATA_DIR", str(tmp_path))
    s = Settings()
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'adapterforge.db'}"
    assert s.uses_filesystem_broker and s.broker_dir == tmp_path / "broker"
    assert s.store_dir == tmp_path / "store" and s.base_model is None


def test_production_urls_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERFORGE_DATABASE_URL", "postgresql+psycopg://u@db:5432/af")
    monkeypatch.setenv("ADAPTERFORGE_BROKER_URL", "redis://redis:6379/0")
    monkeypatch.setenv("ADAPTERFORGE_API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("ADAPTERFORGE_PORT", "9000")
    s = Settings()
    assert s.resolved_database_url == "postgresql+psycopg://u@db:5432/af"
    assert not s.uses_filesystem_broker
    assert s.api_keys == ["k1", "k2"] and s.port == 9000


def test_postgres_scheme_is_normalised() -> None:
    assert Settings(database_url="postgres://u@h/db").database_url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("database_url", "mysql://u@h/db", "database URL scheme"),
        ("broker_url", "kafka://h", "broker URL scheme"),
        ("port", 0, "port"),
        ("max_upload_bytes", -1, "max_upload_bytes"),
        ("cpu_kernels", "fast", "cpu_kernels"),
        ("gpu_kernels", "fast", "gpu_kernels"),
        ("adapter_dtype", "bfloat16", "adapter_dtype"),
    ],
)
def test_bad_values_name_the_field(field: str, value: object, needle: str) -> None:
    with pytest.raises(ValidationError) as err:
        Settings(**{field: value})
    assert needle in str(err.value)


def test_a_misspelt_variable_is_refused_naming_the_setting_it_resembles(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ADAPTERFORGE_API_KEY`` (no S) would otherwise leave the server without authentication, silently."""
    monkeypatch.setenv("ADAPTERFORGE_API_KEY", "secret")
    with pytest.raises(ValidationError, match=r"ADAPTERFORGE_API_KEY is not a setting \(did you mean ADAPTERFORGE_API_KEYS"):
        Settings()
    monkeypatch.delenv("ADAPTERFORGE_API_KEY")
    monkeypatch.setenv("ADAPTERFORGE_SUPERVISOR_PID", "1")  # not settings, known: `adapterforge up`, tests, benches
    monkeypatch.setenv("ADAPTERFORGE_TEST_POSTGRES", "postgresql+psycopg://x@y/z")
    monkeypatch.setenv("ADAPTERFORGE_API_KEYS", '["k"]')
    assert Settings().api_keys == ["k"]
