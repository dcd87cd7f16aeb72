"""Ids, cursors, filters and references holding text no database can hold (NUL, which PostgreSQL's text
refuses, or a lone UTF-16 surrogate, which no encoding holds) are simply not found: 404 or an empty page,
never a 500, on PostgreSQL as on SQLite."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient


@pytest.mark.parametrize("bad", ["\x00", "ds_\x00", "\ud800"], ids=["nul", "nul-suffix", "surrogate"])
def test_lookups_of_unstorable_ids_are_not_found(client: TestClient, bad: str) -> None:
    answers: dict[str, Any] = {
        "GET /datasets/{bad}": client.get(f"/datasets/{quote(bad)}") if "\ud800" not in bad else None,
        "GET /jobs/{bad}": client.get(f"/jobs/{quote(bad)}") if "\ud800" not in bad else None,
        "GET /jobs/{bad}/events": client.get(f"/jobs/{quote(bad)}/events") if "\ud800" not in bad else None,
        "GET /jobs?adapter_name": client.get("/jobs", params={"adapter_name": bad.replace("\ud800", "\x00")}),
        "GET /jobs?after": client.get("/jobs", params={"after": bad.replace("\ud800", "\x00")}),
        "GET /datasets?after": client.get("/datasets", params={"after": bad.replace("\ud800", "\x00")}),
        "POST /jobs dataset_id": client.post("/jobs", headers={"content-type": "application/json"},
                                             content=json.dumps({"type": "train", "dataset_id": bad,
                                                                 "adapter": {"name": "bot", "method": "lora"}})),
    }
    for what, response in answers.items():
        if response is None:
            continue
        assert response.status_code in (200, 404, 422), f"{what}: {response.status_code} {response.text}"
        if response.status_code == 200:
            assert response.json()["data"] == [], what
