"""Worker tests reuse the app tests' databases (SQLite and PostgreSQL) and the demo base model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.app.conftest import db_url, demo_model_dir, sessions

__all__ = ["db_url", "demo_model_dir", "sessions"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Training runs on one thread: two-core CI machines are shared with other test work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
