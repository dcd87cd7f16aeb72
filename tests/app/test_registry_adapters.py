"""Adapter versions, aliases and references in the registry (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.registry.adapters import (
    InvalidName,
    NotFound,
    VersionSpec,
    create_version,
    delete_alias,
    delete_version,
    resolve_ref,
    set_alias,
)

SPEC = VersionSpec(method="lora", config={"r": 8}, files={"adapter_model.safetensors": {"sha256": "0" * 64}}, size=10)


def test_versions_count_up_and_refs_resolve(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        v1 = create_version(s, "support-bot", SPEC)
        v2 = create_version(s, "support-bot", SPEC)
        other = create_version(s, "other", SPEC)
    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    with sessions.begin() as s:
        assert resolve_ref(s, "support-bot").id == v2.id
        assert resolve_ref(s, "support-bot@1").id == v1.id
        set_alias(s, "support-bot", "prod", 1)
        assert resolve_ref(s, "support-bot@prod").id == v1.id
        set_alias(s, "support-bot", "prod", 2)  # moving an alias
        assert resolve_ref(s, "support-bot@prod").id == v2.id


def test_deleted_versions_keep_their_numbers_and_drop_aliases(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        create_version(s, "a", SPEC)
        create_version(s, "a", SPEC)
        set_alias(s, "a", "prod", 2)
        delete_version(s, "a", 2)
    with sessions.begin() as s:
        assert resolve_ref(s, "a").version == 1
        with pytest.raises(NotFound):
            resolve_ref(s, "a@2")
        with pytest.raises(NotFound):
            resolve_ref(s, "a@prod")
        assert create_version(s, "a", SPEC).version == 3  # never reused


@pytest.mark.parametrize(
    ("ref", "error", "param"),
    [("../etc", InvalidName, "name"), ("nope", NotFound, "name"), ("a@9", NotFound, "version"),
     ("a@missing", NotFound, "adapter")],
)
def test_bad_refs_name_the_problem(sessions: sessionmaker[Session], ref: str, error: type, param: str) -> None:
    with sessions.begin() as s:
        create_version(s, "a", SPEC)
    with sessions.begin() as s, pytest.raises(error) as err:
        resolve_ref(s, ref)
    assert err.value.param == param


def test_alias_rules(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        create_version(s, "a", SPEC)
        with pytest.raises(InvalidName):
            set_alias(s, "a", "42", 1)  # would read as a version number
        with pytest.raises(NotFound):
            delete_alias(s, "a", "prod")


def test_concurrent_uploads_get_distinct_consecutive_versions(sessions: sessionmaker[Session], db_url: str) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("row locks are PostgreSQL's; SQLite serialises writers (covered above)")
    barrier = threading.Barrier(20)
    got: list[int] = []
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            barrier.wait()
            with sessions.begin() as s:
                got.append(create_version(s, "hot", SPEC).version)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(got) == list(range(1, 21))
