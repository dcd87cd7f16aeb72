"""Adapter routes given text no adapter can hold (NUL), version numbers not written as digits, and an
adapter uploaded again after its deletion.

Runs on SQLite and PostgreSQL (the conftest's ``db_url``). The ``client`` fixture below answers a server
error as the 500 a real client gets, instead of raising it into the test.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.registry.adapters import VersionSpec, create_version
from tests.app.test_api_adapters import files_of, make_adapter, upload


@pytest.fixture(scope="module")
def adapter_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(demo_model_dir, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture
def client(api_settings: Any, base_host: Any) -> Iterator[TestClient]:
    from app.main import create_app
    from tests.app.conftest import RecordingQueue

    app = create_app(api_settings, queue=RecordingQueue(), base_model=base_host)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.settings = api_settings  # type: ignore[attr-defined]
        yield test_client


def cursor(text: str) -> str:
    """A cursor spelled the way the server spells them (urlsafe base64 without padding)."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def more_versions(client: TestClient, name: str, count: int) -> None:
    """``count`` more versions of ``name`` with the files of its version 1, straight through the registry."""
    first = client.get(f"/adapters/{name}/versions/1").json()
    engine = create_engine(client.settings.resolved_database_url)  # type: ignore[attr-defined]
    try:
        with Session(engine) as session:
            for _ in range(count):
                create_version(session, name, VersionSpec(method=first["method"], config=first["config"],
                                                          files=first["files"], size=first["size"]))
            session.commit()
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------------ NUL in user text
NUL_REQUESTS = {
    "GET /adapters/{name}": ("get", "/adapters/bot%00x", None),
    "GET /adapters/{name}/versions": ("get", "/adapters/bot%00x/versions", None),
    "GET /adapters/{name}/versions/1": ("get", "/adapters/bot%00x/versions/1", None),
    "GET download": ("get", "/adapters/bot%00x/versions/1/download", None),
    "DELETE /adapters/{name}": ("delete", "/adapters/bot%00x", None),
    "DELETE version": ("delete", "/adapters/bot%00x/versions/1", None),
    "PUT alias (NUL in alias)": ("put", "/adapters/bot/aliases/prod%00", {"version": 1}),
    "DELETE alias (NUL in alias)": ("delete", "/adapters/bot/aliases/prod%00", None),
    "GET /adapters?q=NUL": ("get", "/adapters?q=%00", None),
    "GET /adapters?method=NUL": ("get", "/adapters?method=lora%00", None),
    "GET /adapters?after=forged NUL cursor": ("get", f"/adapters?after={cursor('n:' + chr(0))}", None),
}


@pytest.mark.parametrize("case", list(NUL_REQUESTS))
def test_a_nul_character_in_a_name_alias_filter_or_cursor_is_a_4xx_not_a_500(
    client: TestClient, adapter_dir: Path, case: str
) -> None:
    """PostgreSQL refuses NUL in text (a 500 before): such a name or alias is not found, a filter with it
    matches nothing (SQLite's LIKE had matched every name), a cursor with it is invalid."""
    assert upload(client, "bot", files_of(adapter_dir)).status_code == 201
    method, url, body = NUL_REQUESTS[case]
    response = client.request(method, url, json=body)
    assert response.status_code < 500, f"{case}: {response.status_code} {response.text}"
    assert response.headers["content-type"] == "application/json"
    expected = {"GET /adapters?q=NUL": 200, "GET /adapters?method=NUL": 200,
                "GET /adapters?after=forged NUL cursor": 422, "PUT alias (NUL in alias)": 422}.get(case, 404)
    assert response.status_code == expected, f"{case}: {response.status_code} {response.text}"
    if expected == 200:  # a filter no name matches
        assert response.json()["data"] == []
    assert client.get("/adapters/bot/versions/1").status_code == 200  # nothing was deleted


# --------------------------------------------------------------------- version numbers in the path
@pytest.mark.parametrize("spelled", ["1_2", "12.0", "+12", " 12"])
def test_a_version_number_in_the_path_must_be_digits_not_read_leniently(
    client: TestClient, adapter_dir: Path, spelled: str
) -> None:
    """``DELETE /adapters/bot/versions/1_2`` deleted version 12: pydantic's lax int parsing reads ``1_2``
    (and ``12.0``, ``+12``, `` 12``) as 12. Digits only, as for query parameters."""
    assert upload(client, "bot", files_of(adapter_dir)).status_code == 201
    more_versions(client, "bot", 11)  # versions 1..12
    response = client.delete(f"/adapters/bot/versions/{spelled}")
    assert response.status_code == 422, f"{spelled!r} answered {response.status_code} {response.text}"
    assert response.json()["error"]["param"] == "version"
    assert client.get("/adapters/bot/versions/12").status_code == 200  # version 12 is still there
    assert client.get(f"/adapters/bot/versions/{spelled}").status_code == 422


# ------------------------------------------------------------------ an adapter uploaded again is fresh
def test_an_adapter_uploaded_again_after_its_deletion_reports_its_own_creation_time(
    client: TestClient, adapter_dir: Path
) -> None:
    """DELETE /adapters/{name}: "Uploading the name again starts a fresh adapter": its `created_at` ("when
    the adapter's first version was registered") is the new upload's, not the deleted adapter's."""
    sent = files_of(adapter_dir)
    upload(client, "bot", sent)
    first = client.get("/adapters/bot").json()
    assert client.delete("/adapters/bot").status_code == 200
    again = upload(client, "bot", sent).json()
    detail = client.get("/adapters/bot").json()
    [listed] = client.get("/adapters").json()["data"]
    version_made = datetime.fromisoformat(again["created_at"])
    for shown in (detail, listed):
        assert datetime.fromisoformat(shown["created_at"]) > datetime.fromisoformat(first["updated_at"]), (
            f"created_at {shown['created_at']} predates the deletion; the fresh adapter's only version is from "
            f"{version_made.isoformat()}")

