"""Worker tests reuse the app tests' databases (SQLite and PostgreSQL) and the demo base model, and
run torch on one thread like the training tests."""

from __future__ import annotations

from tests.app.conftest import db_url, demo_model_dir, sessions
from tests.core.training.conftest import _one_thread

__all__ = ["_one_thread", "db_url", "demo_model_dir", "sessions"]
