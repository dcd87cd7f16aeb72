"""Adapter versions, aliases and references in the registry (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.registry.adapters import (
    InvalidName,
    NotFound,
    VersionSpec,
    check_method,
    create_version,
    delete_adapter,
    delete_alias,
    delete_version,
    resolve_ref,
    resolve_ref_id,
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
    [("../etc", InvalidName, "name"), ("a\n", InvalidName, "name"), ("nope", NotFound, "name"), ("a@9", NotFound, "version"),
     ("a@missing", NotFound, "adapter"), ("a@99999999999", NotFound, "version"),
     ("a@\u00b2", NotFound, "adapter"),  # superscript two: str.isdigit() says yes, int() refuses it
     ("a@\u0661", NotFound, "adapter"), ("a@\x00", NotFound, "adapter"), ("a@pr\x00d", NotFound, "adapter")],  # Arabic-Indic one: int() reads it as 1; not a version here
)
def test_bad_refs_name_the_problem(sessions: sessionmaker[Session], ref: str, error: type, param: str) -> None:
    with sessions.begin() as s:
        create_version(s, "a", SPEC)
    with sessions.begin() as s, pytest.raises(error) as err:
        resolve_ref(s, ref)
    assert err.value.param == param


def test_the_one_query_resolution_agrees_with_resolve_ref(sessions: sessionmaker[Session]) -> None:
    """What serving resolves per request (``resolve_ref_id``) names the same version as ``resolve_ref``,
    and fails with the same error, through versions, aliases, moves and deletions."""
    with sessions.begin() as s:
        for _ in range(3):
            create_version(s, "a", SPEC)
        create_version(s, "b", SPEC)
        set_alias(s, "a", "prod", 1)
        set_alias(s, "b", "prod", 1)
        set_alias(s, "a", "canary", 3)
    refs = ["a", "a@1", "a@2", "a@3", "a@4", "a@0", "a@99999999999", "a@prod", "a@canary", "a@missing", "b", "b@prod", "nope",
            "nope@1", "nope@prod", "../etc", "a@", "a@\u00b2", "a@\u0661", "a@\x00"]

    def outcome(fn: object, s: Session, ref: str) -> tuple[str, object, str | None]:
        try:
            found = fn(s, ref)  # type: ignore[operator]
        except (NotFound, InvalidName) as exc:
            return type(exc).__name__, str(exc), exc.param
        return "ok", found if isinstance(found, tuple) else (found.id, found.version), None

    def agree() -> None:
        with sessions.begin() as s:
            for ref in refs:
                assert outcome(resolve_ref_id, s, ref) == outcome(resolve_ref, s, ref), ref

    agree()
    with sessions.begin() as s:
        assert resolve_ref_id(s, "a@canary")[1] == 3
        set_alias(s, "a", "prod", 2)  # moved
        delete_version(s, "a", 3)  # the latest, and canary's target
    with sessions.begin() as s:
        assert resolve_ref_id(s, "a")[1] == 2 and resolve_ref_id(s, "a@prod")[1] == 2
    agree()
    with sessions.begin() as s:
        delete_adapter(s, "b")
    agree()
    with sessions.begin() as s:
        create_version(s, "b", SPEC)  # a new adapter under the old name: numbers go on
    agree()


def test_alias_rules(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        create_version(s, "a", SPEC)
        with pytest.raises(InvalidName):
            set_alias(s, "a", "42", 1)  # would read as a version number
        with pytest.raises(NotFound):
            delete_alias(s, "a", "prod")


def test_concurrent_uploads_get_distinct_consecutive_versions(sessions: sessionmaker[Session]) -> None:
    barrier = threading.Barrier(20)
    got: list[int] = []
    errors: list[BaseException] = []

    def upload(checked_first: bool) -> None:
        try:
            barrier.wait()
            with sessions.begin() as s:
                if checked_first:  # as the upload route does: the method check, then the version
                    check_method(s, "hot", SPEC.method)
                got.append(create_version(s, "hot", SPEC).version)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(i % 2 == 0,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(got) == list(range(1, 21))


def test_a_trailing_newline_is_not_part_of_a_valid_name_or_alias(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s, pytest.raises(InvalidName):
        create_version(s, "bot\n", SPEC)
    with sessions.begin() as s:
        create_version(s, "bot", SPEC)
    with sessions.begin() as s, pytest.raises(InvalidName):
        set_alias(s, "bot", "prod\n", 1)
