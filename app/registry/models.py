"""SQLAlchemy 2.0 models of the registry: the source of truth for datasets, jobs and adapters.

Ids are prefixed random strings (``ds_``, ``job_``, ``ad_``, ``av_``). Version numbers of an
adapter are allocated from ``adapters.next_version`` under a row lock, so concurrent uploads of one
name get distinct consecutive numbers and numbers are never reused (deletes are soft).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MAX_DB_INT = 2**31 - 1  # SQL INTEGER: larger version numbers, cursors or ids can exist nowhere


def new_id(prefix: str) -> str:
    """A short random id such as ``job_3f9a0c1b2d4e5f60718293a4``."""
    return f"{prefix}_{secrets.token_hex(12)}"


def is_id_text(value: str) -> bool:
    """Whether ``value`` could be stored and looked up at all: no NUL (PostgreSQL's text refuses it) and
    no lone UTF-16 surrogate (no encoding holds it). Lookups answer "not found" for anything else
    without asking the database, which would raise instead."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """A timestamp the registry wrote (always UTC), aware: SQLite hands them back naive."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Dataset(Base):
    """An uploaded JSONL file (content-addressed in the artifact store) and its validation summary."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ds"))
    filename: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    form: Mapped[str] = mapped_column(String(16))
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """A train or merge job; the worker holds a lease on it while running."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    type: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    adapter_name: Mapped[str] = mapped_column(String(128), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    validation_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    eta_seconds: Mapped[float | None]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    result_version_id: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.id", use_alter=True, name="fk_jobs_result_version_id"))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class JobEvent(Base):
    """Something that happened to a job (progress, checkpoint, resume, error), in order."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Adapter(Base):
    """A named adapter; its versions hold the files."""

    __tablename__ = "adapters"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ad"))
    name: Mapped[str] = mapped_column(String(128), unique=True)
    method: Mapped[str] = mapped_column(String(32), index=True)
    next_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AdapterVersion(Base):
    """One immutable version: PEFT files in the store, config, lineage and metrics."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version", name="uq_adapter_versions_adapter_version"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("av"))
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    files: Mapped[dict[str, Any]] = mapped_column(default=dict)
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    base_model: Mapped[str | None] = mapped_column(String(512))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"))
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"))
    parents: Mapped[list[Any]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Alias(Base):
    """A movable pointer such as ``prod`` from an adapter name to one of its versions."""

    __tablename__ = "aliases"

    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[str] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
