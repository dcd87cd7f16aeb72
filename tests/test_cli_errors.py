"""The CLI's answers to bad settings, flags and paths: one clear line and a non-zero exit, no traceback."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest

from adapterforge.cli import main


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in ("ADAPTERFORGE_DATABASE_URL", "ADAPTERFORGE_BROKER_URL", "ADAPTERFORGE_BASE_MODEL",
                "ADAPTERFORGE_API_KEYS", "ADAPTERFORGE_LOG_LEVEL", "ADAPTERFORGE_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ADAPTERFORGE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _run(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(argv)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert all(r.exc_info is None for r in errors), "a traceback was logged"
    return code, "\n".join(r.getMessage() for r in errors)


@pytest.mark.parametrize(
    ("argv", "env", "needles"),
    [
        (["up", "--port", "99999"], {}, ["--port", "99999"]),
        (["store", "gc"], {"ADAPTERFORGE_API_KEYS": "notjson"}, ["ADAPTERFORGE_API_KEYS"]),
        (["store", "gc"], {"ADAPTERFORGE_LOG_LEVEL": "loud"}, ["ADAPTERFORGE_LOG_LEVEL", "LOUD", "DEBUG"]),
        (["worker"], {"ADAPTERFORGE_BROKER_URL": "bogus://x"}, ["ADAPTERFORGE_BROKER_URL", "bogus://x"]),
        (["store", "gc"], {"ADAPTERFORGE_DATABASE_URL": "mysql://admin:s3cret@db/af"},
         ["ADAPTERFORGE_DATABASE_URL", "mysql://admin:***@db/af"]),
    ],
    ids=["port-too-big", "api-keys-not-json", "log-level", "broker-url", "database-url"],
)
def test_bad_settings_and_flags_are_named(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture, argv: list[str], env: dict[str, str],
                                          needles: list[str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, message = _run(argv, caplog)
    assert code == 2, message
    for needle in needles:
        assert needle in message, message
    assert "s3cret" not in message


@pytest.mark.parametrize(("env", "needle"), [
    ({"ADAPTERFORGE_MAX_BATCH_TOKEN": "1"}, "ADAPTERFORGE_MAX_BATCH_TOKEN is not a setting (did you mean "
                                            "ADAPTERFORGE_MAX_BATCH_TOKENS?)"),
    ({"ADAPTERFORGE_ADAPTER_SLOTS": "1", "ADAPTERFORGE_PINNED_ADAPTERS": '["a"]'}, "pin fewer than adapter_slots"),
])
def test_checks_of_several_settings_name_the_problem_and_print_no_secret(
        data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, env: dict[str, str],
        needle: str) -> None:
    """A check over the settings together has every setting as its input: printed, it showed the API keys and
    the database password."""
    monkeypatch.setenv("ADAPTERFORGE_DATABASE_URL", "postgresql+psycopg://admin:s3cret@127.0.0.1:1/af")
    monkeypatch.setenv("ADAPTERFORGE_API_KEYS", '["key-s3cret"]')
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code, message = _run(["store", "gc"], caplog)
    assert code == 2 and needle in message, message
    assert "s3cret" not in message and "ADAPTERFORGE_?" not in message, message


def test_log_level_is_case_insensitive(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("ADAPTERFORGE_LOG_LEVEL", "debug")
    assert _run(["db", "upgrade"], caplog) == (0, "")


def test_store_gc_without_a_database_says_what_to_run(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    code, message = _run(["store", "gc"], caplog)  # no data directory at all
    assert code == 1 and "adapterforge db upgrade" in message, message
    data_dir.mkdir(parents=True)
    code, message = _run(["store", "gc"], caplog)  # a directory, no schema
    assert code == 1 and "adapterforge db upgrade" in message, message


@pytest.mark.parametrize("url", ["bogus://x", "postgresql+psycopg://user:secret@127.0.0.1:1/x"])
def test_db_upgrade_on_a_bad_url_names_it_without_its_password(data_dir: Path, caplog: pytest.LogCaptureFixture,
                                                               url: str) -> None:
    code, message = _run(["db", "upgrade", "--url", url], caplog)
    assert code == 1 and "cannot" in message, message
    assert "secret" not in message


@pytest.mark.parametrize("url", ["postgresql+psycopg://user:secret@127.0.0.1:1/x", "sqlite:////nonexistent/dir/x.db"])
def test_up_on_an_unusable_database_says_so_in_one_line(data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture, url: str) -> None:
    monkeypatch.setenv("ADAPTERFORGE_DATABASE_URL", url)
    code, message = _run(["up", "--port", "8123"], caplog)
    assert code == 1 and "cannot use the database" in message, message
    assert "secret" not in message


def test_demo_model_into_a_file_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "a-file"
    target.write_text("x")
    code, message = _run(["demo-model", str(target)], caplog)
    assert code == 1 and str(target) in message, message


def test_up_with_a_missing_local_base_model_says_so(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "models" / "my-model"
    monkeypatch.setenv("ADAPTERFORGE_BASE_MODEL", str(missing))
    code, message = _run(["up", "--port", "8123"], caplog)
    assert code == 1 and str(missing) in message and "ADAPTERFORGE_BASE_MODEL" in message, message


def test_up_on_a_port_in_use_says_so_before_starting_anything(data_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, message = _run(["up", "--host", "127.0.0.1", "--port", str(port)], caplog)
    assert code == 1 and str(port) in message and "--port" in message, message
    assert not data_dir.exists()  # no database, no demo model, no worker


@pytest.mark.parametrize("argv", [["up", "--port", "0"], ["worker", "--concurrency", "0"],
                                  ["store", "gc", "--older-than", "-5"],
                                  ["store", "gc", "--older-than", "nan"]])
def test_flags_out_of_range_are_usage_errors(data_dir: Path, argv: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert argv[-2] in capsys.readouterr().err
