"""Adapter registry queries: versions, aliases, references (``name``, ``name@3``, ``name@prod``).

Version numbers come from ``adapters.next_version`` read under ``SELECT ... FOR UPDATE`` (PostgreSQL;
SQLite serialises writers), so concurrent creations of one name get distinct consecutive numbers.
Deleted versions keep their numbers: nothing is ever renumbered or reused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.registry.models import Adapter, AdapterVersion, Alias, utcnow

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")


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


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise InvalidName(
            f"invalid adapter name {name!r}: 1-128 letters, digits, '_', '-', '.', starting with a letter or digit",
            param="name",
        )


def _locked_adapter(session: Session, name: str, method: str) -> Adapter:
    """The adapter row for ``name``, locked for this transaction, created if missing."""
    stmt = select(Adapter).where(Adapter.name == name).with_for_update()
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
    check_name(name)
    adapter = _locked_adapter(session, name, spec.method)
    adapter.deleted_at = None
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
    ).scalar_one_or_none()
    if adapter is None:
        raise NotFound(f"no adapter named {name!r}", param="name")
    return adapter


def get_version(session: Session, name: str, version: int) -> AdapterVersion:
    adapter = get_adapter(session, name)
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


def set_alias(session: Session, name: str, alias: str, version: int) -> Alias:
    """Point ``alias`` of ``name`` at ``version`` (creating or moving it)."""
    if not ALIAS_RE.match(alias) or alias.isdigit():
        raise InvalidName(f"invalid alias {alias!r}: a letter, then letters, digits, '_' or '-'", param="alias")
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
    adapter = get_adapter(session, name)
    row = session.get(Alias, (adapter.id, alias))
    if row is None:
        raise NotFound(f"adapter {name!r} has no alias {alias!r}", param="alias")
    session.delete(row)
    session.flush()


def delete_version(session: Session, name: str, version: int) -> None:
    """Soft-delete a version; aliases pointing at it are removed. Its number is never reused."""
    target = get_version(session, name, version)
    target.deleted_at = utcnow()
    for row in session.execute(select(Alias).where(Alias.version_id == target.id)).scalars():
        session.delete(row)
    session.flush()


def resolve_ref(session: Session, ref: str) -> AdapterVersion:
    """``name`` (latest version), ``name@3`` (a version) or ``name@prod`` (an alias)."""
    name, sep, selector = ref.partition("@")
    check_name(name)
    if not sep:
        return latest_version(session, name)
    if selector.isdigit():
        return get_version(session, name, int(selector))
    adapter = get_adapter(session, name)
    row = session.get(Alias, (adapter.id, selector))
    if row is None:
        raise NotFound(f"adapter {name!r} has no alias {selector!r}", param="adapter")
    version = session.get(AdapterVersion, row.version_id)
    if version is None or version.deleted_at is not None:
        raise NotFound(f"alias {ref!r} points at a deleted version", param="adapter")
    return version
