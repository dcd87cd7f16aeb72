"""Refuse query parameters a route does not take.

FastAPI drops unknown query parameters without a word, so a typo changes what a request means:
``/generate?adaptor=qa`` would be answered by the base model, ``/adapters?limt=5`` with a page of 50.
The app-wide dependency here answers 422 naming the parameter (and the ones the route takes) instead.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app.api.errors import ApiError


def accepted_query_params(dependant: Dependant) -> frozenset[str]:
    """The query parameter names (aliases) a route's dependency tree declares."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= accepted_query_params(sub)
    return frozenset(names)


async def reject_unknown_query_params(request: Request) -> None:
    """422 for a query parameter the matched route does not declare."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    accepted = accepted_query_params(route.dependant)  # a walk of a few nodes: microseconds
    unknown = sorted(set(request.query_params.keys()) - accepted)
    if unknown:
        takes = ", ".join(f"`{name}`" for name in sorted(accepted)) or "none"
        raise ApiError(422, f"unknown query parameter `{unknown[0]}` for {request.method} {route.path} "
                            f"(it takes: {takes})", param=unknown[0])
