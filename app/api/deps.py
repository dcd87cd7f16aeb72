"""FastAPI dependencies: the per-app services kept on ``app.state`` and a database session per request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.base_model import BaseModelHost
from app.db import Database
from app.metrics import ApiMetrics
from app.queue import JobQueue
from app.serving.host import ServingHost
from app.settings import Settings
from app.storage import LocalArtifactStore


@dataclass
class Services:
    """Everything a route may need; built once per app in the lifespan."""

    settings: Settings
    db: Database
    store: LocalArtifactStore
    queue: JobQueue
    base_model: BaseModelHost
    metrics: ApiMetrics
    serving: ServingHost | None = None
    started_at: float = field(default_factory=time.time)


async def get_services(request: Request) -> Services:
    """The app's services (async: FastAPI would run a plain function in its thread pool, a thread hop
    per request for an attribute read)."""
    services: Services = request.app.state.services
    return services


def get_session(services: Annotated[Services, Depends(get_services)]) -> Iterator[Session]:
    """A session per request; the route commits what it means to keep."""
    with services.db.sessions() as session:
        yield session


ServicesDep = Annotated[Services, Depends(get_services)]
SessionDep = Annotated[Session, Depends(get_session)]
