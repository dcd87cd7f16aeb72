"""Adapter registry queries: versions, aliases, references (``name``, ``name@3``, ``name@prod``).

Version numbers come from ``adapters.next_version`` read under the adapter row's lock
(:mod:`app.registry.locks`: a row lock on PostgreSQL, the write lock on SQLite), so concurrent creations of
one name get distinct consecutive numbers.
Deleted versions keep their numbers: nothing is ever renumbered or reused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.digits import is_ascii_number
from app.registry.locks import lock_rows
from app.registry.models import MAX_DB_INT, Adapter, AdapterVersion, Alias, is_id_text, utcnow

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
ALIAS_RE = re.compile(r"[A-Za-z][A-Za-z0-9_\-]{0,63}")


class RegistryError(Exception):
    """Base of registry errors; ``param`` names the offending input."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidName(RegistryError):
    """A name, alias or reference is malformed."""


class NotFound(RegistryError):
    """No such adapter, version or alias."""


@dataclass(frozen=True)
class VersionSpec:
    """What a new version records besides its number."""

    method: str
    config: dict[str, Any]
    files: dict[str, Any]
    size: int
    base_model: str | None = None
    job_id: str | None = None
    dataset_id: str | None = None
    parents: tuple[str, ...] = ()
    metrics: dict[str, Any] | None = None


RESERVED_NAMES = frozenset({"base"})  # the OpenAI routes' name of the base model (``model="base"``)


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise InvalidName(
            f"invalid adapter name {name!r}: 1-128 letters, digits, '_', '-', '.', starting with a letter or digit",
            param="name",
        )


def check_new_name(name: str) -> None:
    """:func:`check_name` for a name a new adapter would take: reserved names are refused too."""
    check_name(name)
    if name in RESERVED_NAMES:
        raise InvalidName(f"the adapter name {name!r} is reserved: `model={name!r}` names the base model", param="name")


def _lock_adapter_row(session: Session, name: str) -> None:
    """Lock the adapter row of ``name`` (if any) for this transaction, before anything about it is read."""
    lock_rows(session, Adapter.next_version, Adapter.name == name)


def _locked_adapter(session: Session, name: str, method: str) -> Adapter:
    """The adapter row for ``name``, locked for this transaction (:func:`_lock_adapter_row`), created if
    missing."""
    _lock_adapter_row(session, name)
    stmt = select(Adapter).where(Adapter.name == name).with_for_update().execution_options(populate_existing=True)
    for _ in range(5):
        adapter = session.execute(stmt).scalar_one_or_none()
        if adapter is not None:
            return adapter
        try:
            with session.begin_nested():
                session.add(Adapter(name=name, method=method))
        except IntegrityError:  # another transaction created it first: lock theirs
            continue
    raise RegistryError(f"could not create or lock adapter {name!r}", param="name")


def create_version(session: Session, name: str, spec: VersionSpec) -> AdapterVersion:
    """Register the next version of ``name`` (creating the adapter on first use). Caller commits."""
    check_new_name(name)
    adapter = _locked_adapter(session, name, spec.method)
    if adapter.deleted_at is not None:  # a fresh adapter under the old name (its version numbers go on)
        adapter.deleted_at = None
        adapter.created_at = utcnow()
    version = AdapterVersion(
        adapter_id=adapter.id,
        version=adapter.next_version,
        method=spec.method,
        config=spec.config,
        files=spec.files,
        size=spec.size,
        base_model=spec.base_model,
        job_id=spec.job_id,
        dataset_id=spec.dataset_id,
        parents=list(spec.parents),
        metrics=spec.metrics or {},
    )
    adapter.next_version += 1
    session.add(version)
    session.flush()
    return version


def get_adapter(session: Session, name: str) -> Adapter:
    adapter = session.execute(
        select(Adapter).where(Adapter.name == name, Adapter.deleted_at.is_(None))
    ).scalar_one_or_none() if is_id_text(name) else None  # (PostgreSQL refuses NUL in a query)
    if adapter is None:
        raise NotFound(f"no adapter named {name!r}", param="name")
    return adapter


def get_version(session: Session, name: str, version: int) -> AdapterVersion:
    adapter = get_adapter(session, name)
    if not 0 <= version <= MAX_DB_INT:  # no such row, and PostgreSQL would refuse the number itself
        raise NotFound(f"adapter {name!r} has no version {version}", param="version")
    found = session.execute(
        select(AdapterVersion).where(
            AdapterVersion.adapter_id == adapter.id,
            AdapterVersion.version == version,
            AdapterVersion.deleted_at.is_(None),
        )
    ).scalar_one_or_none()
    if found is None:
        raise NotFound(f"adapter {name!r} has no version {version}", param="version")
    return found


def latest_version(session: Session, name: str) -> AdapterVersion:
    adapter = get_adapter(session, name)
    found = session.execute(
        select(AdapterVersion)
        .where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.deleted_at.is_(None))
        .order_by(AdapterVersion.version.desc())
        .limit(1)
    ).scalar_one_or_none()
    if found is None:
        raise NotFound(f"adapter {name!r} has no versions", param="name")
    return found


def find_alias(session: Session, name: str, alias: str) -> Alias | None:
    """The alias row of live adapter ``name`` (:class:`NotFound` without one), or None."""
    adapter = get_adapter(session, name)
    return session.get(Alias, (adapter.id, alias)) if ALIAS_RE.fullmatch(alias) else None


def set_alias(session: Session, name: str, alias: str, version: int) -> Alias:
    """Point ``alias`` of ``name`` at ``version`` (creating or moving it)."""
    if not ALIAS_RE.fullmatch(alias) or is_ascii_number(alias):
        raise InvalidName(f"invalid alias {alias!r}: a letter, then letters, digits, '_' or '-'", param="alias")
    if alias.lower() == "latest":  # `name@latest` pointing anywhere but where `name` does would mislead
        raise InvalidName("the alias 'latest' is reserved: the adapter's name alone means its latest version",
                          param="alias")
    target = get_version(session, name, version)
    row = session.get(Alias, (target.adapter_id, alias))
    if row is None:
        row = Alias(adapter_id=target.adapter_id, alias=alias, version_id=target.id)
        session.add(row)
    else:
        row.version_id = target.id
        row.updated_at = utcnow()
    session.flush()
    return row


def delete_alias(session: Session, name: str, alias: str) -> None:
    row = find_alias(session, name, alias)  # (PostgreSQL refuses NUL: no lookup of what no alias is spelled)
    if row is None:
        raise NotFound(f"adapter {name!r} has no alias {alias!r}", param="alias")
    session.delete(row)
    session.flush()


def delete_version(session: Session, name: str, version: int) -> str:
    """Soft-delete a version; aliases pointing at it are removed. Its number is never reused. Returns its id."""
    target = get_version(session, name, version)
    target.deleted_at = utcnow()
    for row in session.execute(select(Alias).where(Alias.version_id == target.id)).scalars():
        session.delete(row)
    session.flush()
    return target.id


def resolve_ref(session: Session, ref: str) -> AdapterVersion:
    """``name`` (latest version), ``name@3`` (a version) or ``name@prod`` (an alias)."""
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep:
        return latest_version(session, name)
    if is_ascii_number(selector):
        return get_version(session, name, int(selector))
    adapter = get_adapter(session, name)
    row = session.get(Alias, (adapter.id, selector)) if ALIAS_RE.fullmatch(selector) else None
    if row is None:
        raise NotFound(f"adapter {name!r} has no alias {selector!r}", param="adapter")
    version = session.get(AdapterVersion, row.version_id)
    if version is None or version.deleted_at is not None:
        raise NotFound(f"alias {ref!r} points at a deleted version", param="adapter")
    return version


def resolve_ref_id(session: Session, ref: str) -> tuple[str, int]:
    """``(id, number)`` of the live version ``ref`` names, as :func:`resolve_ref` resolves it, in one
    query of two columns (the serving hot path: a version's other fields never change, so callers
    can keep them by id). Raises what :func:`resolve_ref` raises."""
    name, sep, selector = ref.partition("@")
    check_name(name)
    query = (select(AdapterVersion.id, AdapterVersion.version)
             .join(Adapter, Adapter.id == AdapterVersion.adapter_id)
             .where(Adapter.name == name, Adapter.deleted_at.is_(None), AdapterVersion.deleted_at.is_(None)))
    if not sep:
        query = query.order_by(AdapterVersion.version.desc()).limit(1)
    elif is_ascii_number(selector):
        if int(selector) > MAX_DB_INT:
            return _resolved(resolve_ref(session, ref))  # the error get_version gives
        query = query.where(AdapterVersion.version == int(selector))
    elif not ALIAS_RE.fullmatch(selector):  # no alias is spelled so (NUL would be a database error)
        return _resolved(resolve_ref(session, ref))
    else:
        query = query.join(Alias, (Alias.version_id == AdapterVersion.id) & (Alias.adapter_id == Adapter.id)).where(
            Alias.alias == selector)
    row = session.execute(query).one_or_none()
    if row is None:  # the precise error (or, had a write landed in between, the version)
        return _resolved(resolve_ref(session, ref))
    return str(row.id), int(row.version)


def _resolved(version: AdapterVersion) -> tuple[str, int]:
    return version.id, version.version


# ----------------------------------------------------------------- listing, method checks, whole-adapter delete
class MethodConflict(RegistryError):
    """A new version's method differs from the method of the live adapter it would join."""


@dataclass(frozen=True)
class AdapterSummary:
    """An adapter as listed: its live versions counted, its latest number and its aliases."""

    id: str
    name: str
    method: str
    latest_version: int | None
    version_count: int
    aliases: dict[str, int]
    created_at: datetime
    updated_at: datetime


def _summaries(session: Session, rows: Sequence[Row[str, str, str, datetime]]) -> list[AdapterSummary]:
    """Summaries of a page of ``(id, name, method, created_at)`` rows: two queries, whatever the page size."""
    ids = [row.id for row in rows]
    if not ids:
        return []
    counts = {
        row.adapter_id: row
        for row in session.execute(
            select(
                AdapterVersion.adapter_id,
                func.max(AdapterVersion.version).label("latest"),
                func.count().label("n"),
                func.max(AdapterVersion.created_at).label("updated_at"),
            )
            .where(AdapterVersion.adapter_id.in_(ids), AdapterVersion.deleted_at.is_(None))
            .group_by(AdapterVersion.adapter_id)
        )
    }
    # the version number by primary-key lookup per alias (a join lets PostgreSQL hash the whole versions table)
    number = (
        select(AdapterVersion.version)
        .where(AdapterVersion.id == Alias.version_id, AdapterVersion.deleted_at.is_(None))
        .scalar_subquery()
    )
    aliases: dict[str, dict[str, int]] = {i: {} for i in ids}
    for adapter_id, alias, version in session.execute(
        select(Alias.adapter_id, Alias.alias, number).where(Alias.adapter_id.in_(ids)).order_by(Alias.alias)
    ):
        if version is not None:
            aliases[adapter_id][alias] = version
    out = []
    for row in rows:
        agg = counts.get(row.id)
        out.append(AdapterSummary(
            id=row.id,
            name=row.name,
            method=row.method,
            latest_version=agg.latest if agg else None,
            version_count=agg.n if agg else 0,
            aliases=aliases[row.id],
            created_at=row.created_at,
            updated_at=agg.updated_at if agg else row.created_at,
        ))
    return out


_LIVE_ADAPTERS = select(Adapter.id, Adapter.name, Adapter.method, Adapter.created_at).where(Adapter.deleted_at.is_(None))


def list_adapters(
    session: Session,
    *,
    limit: int = 20,
    after: str | None = None,
    method: str | None = None,
    q: str | None = None,
) -> tuple[list[AdapterSummary], bool]:
    """A page of live adapters in name order after the name ``after``, and whether more follow.

    ``method`` filters on the adapter's method (case-insensitive), ``q`` keeps names containing it
    (case-insensitive). Three queries per page whatever its size: the page (walking the unique
    index on ``name``), version counts of the page's adapters, and their aliases.
    """
    if not all(is_id_text(text) for text in (after or "", method or "", q or "")):
        return [], False  # no name or method holds NUL or a lone surrogate (and the databases cannot look)
    stmt = _LIVE_ADAPTERS
    if after is not None:
        stmt = stmt.where(Adapter.name > after)
    if method:
        stmt = stmt.where(Adapter.method == method.lower())
    if q:
        stmt = stmt.where(Adapter.name.icontains(q, autoescape=True))
    rows = session.execute(stmt.order_by(Adapter.name).limit(limit + 1)).all()
    return _summaries(session, rows[:limit]), len(rows) > limit


def adapter_summary(session: Session, name: str) -> AdapterSummary:
    """The summary of one live adapter; :class:`NotFound` if there is none."""
    rows = session.execute(_LIVE_ADAPTERS.where(Adapter.name == name)).all() if is_id_text(name) else []
    if not rows:
        raise NotFound(f"no adapter named {name!r}", param="name")
    return _summaries(session, rows)[0]


def list_versions(
    session: Session, name: str, *, limit: int = 20, before: int | None = None
) -> tuple[list[AdapterVersion], bool]:
    """Live versions of ``name``, newest first, numbered below ``before``; and whether more follow."""
    adapter = get_adapter(session, name)
    stmt = select(AdapterVersion).where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.deleted_at.is_(None))
    if before is not None:
        stmt = stmt.where(AdapterVersion.version < before)
    found = list(session.execute(stmt.order_by(AdapterVersion.version.desc()).limit(limit + 1)).scalars())
    return found[:limit], len(found) > limit


def version_aliases(session: Session, version_ids: Sequence[str]) -> dict[str, list[str]]:
    """The aliases pointing at each of ``version_ids`` (sorted; absent ids map to nothing)."""
    out: dict[str, list[str]] = {}
    if not version_ids:
        return out
    for version_id, alias in session.execute(
        select(Alias.version_id, Alias.alias).where(Alias.version_id.in_(list(version_ids))).order_by(Alias.alias)
    ):
        out.setdefault(version_id, []).append(alias)
    return out


def check_method(session: Session, name: str, method: str) -> None:
    """Make sure a version of ``method`` may join ``name``; raises :class:`MethodConflict` if not.

    An adapter keeps one method while it has live versions. One that was deleted (or whose
    versions all were) takes the new method. Locks the adapter row for the transaction
    (:func:`_lock_adapter_row`), so call it in the transaction that then calls :func:`create_version`.
    """
    _lock_adapter_row(session, name)
    adapter = session.execute(select(Adapter).where(Adapter.name == name).with_for_update()
                              .execution_options(populate_existing=True)).scalar_one_or_none()
    if adapter is None or adapter.method == method:
        return
    live = session.execute(
        select(AdapterVersion.id)
        .where(AdapterVersion.adapter_id == adapter.id, AdapterVersion.deleted_at.is_(None))
        .limit(1)
    ).first()
    if adapter.deleted_at is not None or live is None:
        adapter.method = method
        session.flush()
        return
    raise MethodConflict(
        f"adapter {name!r} holds {adapter.method} versions; a {method} adapter needs another name "
        f"(or delete {name!r} first)",
        param="name",
    )


def delete_adapter(session: Session, name: str) -> list[str]:
    """Soft-delete ``name``: all its versions and aliases. Its version numbers are never reused.
    Returns the ids of the versions it deleted."""
    adapter = get_adapter(session, name)
    now = utcnow()
    live = (AdapterVersion.adapter_id == adapter.id, AdapterVersion.deleted_at.is_(None))
    ids = list(session.execute(select(AdapterVersion.id).where(*live)).scalars())
    session.execute(update(AdapterVersion).where(*live).values(deleted_at=now))
    session.execute(delete(Alias).where(Alias.adapter_id == adapter.id))
    adapter.deleted_at = now
    session.flush()
    return ids
