"""Locking rows before reading them on SQLite, as ``SELECT ... FOR UPDATE`` does on PostgreSQL.

SQLite ignores ``FOR UPDATE``, and its Python driver starts a transaction only at the first write, so
two SQLite transactions could both read a row, both decide, and then both write (two uploads took the
same version number; two workers could claim one job). On SQLite, :func:`lock_rows` runs a no-op
``UPDATE`` of the rows first, which takes the database's write lock (waiting out the busy timeout):
what the transaction reads next is the last committed state, and no other writer can change it before
the commit. Reads after it must refresh objects the session already holds (``populate_existing``).
On PostgreSQL it does nothing: ``FOR UPDATE`` locks the rows, and an extra ``UPDATE`` first would take a
weaker row lock ahead of the strong one, which deadlocks against a transaction that holds a key-share
lock on the row (inserting rows that reference it) and then updates it (the worker finishing a job
while a cancel arrives)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import InstrumentedAttribute, Session


def lock_rows(session: Session, column: InstrumentedAttribute[Any], *criteria: Any) -> None:
    """On SQLite, take the write lock for this transaction before the rows of ``column``'s table matching
    ``criteria`` (none may match) are read; elsewhere nothing (the caller's ``FOR UPDATE`` locks them)."""
    if session.get_bind().dialect.name != "sqlite":
        return
    table = column.class_
    session.execute(update(table).where(*criteria).values({column.key: column}),
                    execution_options={"synchronize_session": False})


__all__ = ["lock_rows"]
