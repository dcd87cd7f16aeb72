"""Locking rows before reading them, on PostgreSQL and SQLite alike.

``SELECT ... FOR UPDATE`` locks rows on PostgreSQL; SQLite ignores it, and its Python driver starts a
transaction only at the first write, so two SQLite transactions could both read a row, both decide,
and then both write (two uploads took the same version number; two workers could claim one job).
:func:`lock_rows` runs a no-op ``UPDATE`` of the rows first: on PostgreSQL it locks them as ``FOR
UPDATE`` would, on SQLite it takes the database's write lock (waiting out the busy timeout), so what
the transaction reads next is the last committed state and no other writer can change it before the
commit. Reads after it must refresh objects the session already holds (``populate_existing``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import InstrumentedAttribute, Session


def lock_rows(session: Session, column: InstrumentedAttribute[Any], *criteria: Any) -> None:
    """Lock the rows of ``column``'s table matching ``criteria`` (none may match) for this transaction."""
    table = column.class_
    session.execute(update(table).where(*criteria).values({column.key: column}),
                    execution_options={"synchronize_session": False})


__all__ = ["lock_rows"]
