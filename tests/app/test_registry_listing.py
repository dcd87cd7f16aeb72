"""Registry listings (adapters, versions), method checks and whole-adapter deletes, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from app.registry.adapters import (
    MethodConflict,
    NotFound,
    VersionSpec,
    adapter_summary,
    check_method,
    create_version,
    delete_adapter,
    delete_version,
    list_adapters,
    list_versions,
    resolve_ref,
    set_alias,
    version_aliases,
)


def spec(method: str = "lora") -> VersionSpec:
    return VersionSpec(method=method, config={"r": 8}, files={}, size=10)


@contextmanager
def counting(session: Session) -> Iterator[list[str]]:
    """The SQL statements ``session`` runs inside the block."""
    statements: list[str] = []
    engine = session.get_bind()

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_summaries_count_live_versions_and_show_aliases(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        for _ in range(3):
            create_version(s, "bot", spec())
        create_version(s, "empty", spec())
        set_alias(s, "bot", "prod", 2)
        set_alias(s, "bot", "canary", 3)
        delete_version(s, "bot", 3)  # takes "canary" with it
        delete_version(s, "empty", 1)
        create_version(s, "gone", spec())
        delete_adapter(s, "gone")
    with sessions() as s:
        found, more = list_adapters(s)
        assert not more
        by_name = {a.name: a for a in found}
        assert sorted(by_name) == ["bot", "empty"]
        bot = by_name["bot"]
        assert (bot.method, bot.latest_version, bot.version_count, bot.aliases) == ("lora", 2, 2, {"prod": 2})
        assert bot.updated_at >= bot.created_at
        empty = by_name["empty"]
        assert (empty.latest_version, empty.version_count, empty.aliases) == (None, 0, {})
        assert adapter_summary(s, "bot") == bot
        with pytest.raises(NotFound):
            adapter_summary(s, "gone")


def test_pages_follow_the_name_order_and_filters_apply(sessions: sessionmaker[Session]) -> None:
    names = [f"adapter-{i:02d}" for i in range(7)] + ["Mixed_Case", "dot.name", "under_score"]
    with sessions.begin() as s:
        for name in names:
            create_version(s, name, spec("ia3" if name == "adapter-03" else "lora"))
    with sessions() as s:
        seen: list[str] = []
        after = None
        while True:
            page, more = list_adapters(s, limit=3, after=after)
            seen += [a.name for a in page]
            if not more:
                break
            after = page[-1].name
        assert sorted(seen) == sorted(names) and len(seen) == len(names)
        assert [a.name for a in list_adapters(s, method="IA3")[0]] == ["adapter-03"]
        assert len(list_adapters(s, method="lora", limit=100)[0]) == len(names) - 1
        assert [a.name for a in list_adapters(s, q="mixed_")[0]] == ["Mixed_Case"]
        assert sorted(a.name for a in list_adapters(s, q="_")[0]) == ["Mixed_Case", "under_score"]  # no wildcards
        assert list_adapters(s, q="%")[0] == []
        assert [a.name for a in list_adapters(s, q="T.N")[0]] == ["dot.name"]
        assert list_adapters(s, q="nothing")[0] == []


def test_a_page_costs_the_same_queries_whatever_its_size(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        for i in range(30):
            for _ in range(1 + i % 4):
                create_version(s, f"a{i:02d}", spec())
            set_alias(s, f"a{i:02d}", "prod", 1)
    with sessions() as s:
        with counting(s) as small:
            page, _ = list_adapters(s, limit=2)
        with counting(s) as large:
            whole, _ = list_adapters(s, limit=30)
        assert len(page) == 2 and len(whole) == 30
        assert len(small) == len(large) == 3
        assert [a.version_count for a in whole[:4]] == [1, 2, 3, 4]
        assert all(a.aliases == {"prod": 1} for a in whole)


def test_versions_newest_first_with_a_cursor(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        made = [create_version(s, "bot", spec()) for _ in range(5)]
        delete_version(s, "bot", 4)
        set_alias(s, "bot", "prod", 5)
        set_alias(s, "bot", "also", 5)
    with sessions() as s:
        first, more = list_versions(s, "bot", limit=2)
        assert [v.version for v in first] == [5, 3] and more
        rest, more = list_versions(s, "bot", limit=2, before=3)
        assert [v.version for v in rest] == [2, 1] and not more
        assert version_aliases(s, [made[4].id, made[0].id]) == {made[4].id: ["also", "prod"]}
        with pytest.raises(NotFound):
            list_versions(s, "nobody")


def test_deleting_an_adapter_removes_versions_and_aliases_and_keeps_numbers(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        create_version(s, "bot", spec())
        create_version(s, "bot", spec())
        set_alias(s, "bot", "prod", 2)
        delete_adapter(s, "bot")
    with sessions.begin() as s:
        for ref in ("bot", "bot@1", "bot@prod"):
            with pytest.raises(NotFound):
                resolve_ref(s, ref)
        with pytest.raises(NotFound):
            delete_adapter(s, "bot")
        again = create_version(s, "bot", spec())
    assert again.version == 3
    with sessions() as s:
        summary = adapter_summary(s, "bot")
        assert (summary.latest_version, summary.version_count, summary.aliases) == (3, 1, {})


def test_an_adapter_keeps_one_method_while_it_has_live_versions(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as s:
        check_method(s, "new", "ia3")  # no adapter yet: anything goes
        create_version(s, "bot", spec("lora"))
        check_method(s, "bot", "lora")
        with pytest.raises(MethodConflict, match="lora"):
            check_method(s, "bot", "ia3")
        delete_version(s, "bot", 1)
        check_method(s, "bot", "ia3")  # no live versions left: the adapter takes the new method
        create_version(s, "bot", spec("ia3"))
    with sessions.begin() as s:
        assert adapter_summary(s, "bot").method == "ia3"
        delete_adapter(s, "bot")
        check_method(s, "bot", "lora")
        create_version(s, "bot", spec("lora"))
    with sessions() as s:
        assert adapter_summary(s, "bot").method == "lora"
