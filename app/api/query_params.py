"""Refuse query parameters a route does not take.

FastAPI drops unknown query parameters without a word, so a typo changes what a request means:
``/generate?adaptor=qa`` would be answered by the base model, ``/adapters?limt=5`` with a page of 50.
The app-wide dependency here answers 422 naming the parameter (and the ones the route takes) instead.
A parameter that takes one value and is given several (``/generate?adapter=qa&adapter=base``) is
refused too: FastAPI would keep the last one and drop the others just as silently. An integer
parameter must be written as digits: pydantic's lax parsing would read ``1_0`` as 10 and ``2.0`` as 2;
so must an integer in the path (``DELETE /adapters/bot/versions/1_2`` would delete version 12).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import field_annotation_is_sequence
from fastapi.routing import APIRoute

from app.api.errors import ApiError
from app.digits import is_ascii_number


def integer_query_params(dependant: Dependant) -> set[str]:
    """The query parameter names (aliases) of a route's dependency tree that take an integer."""
    names = {field.alias for field in dependant.query_params if field.field_info.annotation is int}
    for sub in dependant.dependencies:
        names |= integer_query_params(sub)
    return names


def integer_path_params(dependant: Dependant) -> set[str]:
    """The path parameter names of a route's dependency tree that take an integer."""
    names = {field.alias for field in dependant.path_params if field.field_info.annotation is int}
    for sub in dependant.dependencies:
        names |= integer_path_params(sub)
    return names


def accepted_query_params(dependant: Dependant) -> dict[str, bool]:
    """The query parameter names (aliases) a route's dependency tree declares, each with whether it
    takes several values (a list-typed parameter, given once per value)."""
    names = {field.alias: field_annotation_is_sequence(field.field_info.annotation)
             for field in dependant.query_params}
    for sub in dependant.dependencies:
        names.update(accepted_query_params(sub))
    return names


async def reject_unknown_query_params(request: Request) -> None:
    """422 for a query parameter the matched route does not declare, or one it takes once given twice, and
    for an integer query or path parameter not written as digits."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    if request.path_params:
        for name in integer_path_params(route.dependant):
            value = request.path_params.get(name)
            if isinstance(value, str) and not is_ascii_number(value):
                raise ApiError(422, f"`{name}` in the path must be an integer (digits only), got {value!r}",
                               param=name)
    if not request.query_params:
        return
    accepted = accepted_query_params(route.dependant)  # a walk of a few nodes: microseconds
    given = request.query_params.multi_items()
    unknown = sorted({name for name, _ in given} - accepted.keys())
    if unknown:
        takes = ", ".join(f"`{name}`" for name in sorted(accepted)) or "none"
        raise ApiError(422, f"unknown query parameter `{unknown[0]}` for {request.method} {route.path} "
                            f"(it takes: {takes})", param=unknown[0])
    integers = integer_query_params(route.dependant)
    for name, value in given:  # pydantic would read "1_0" as 10, "2.0" as 2, " +2 " as 2
        if name in integers and not is_ascii_number(value.removeprefix("-")):
            raise ApiError(422, f"query parameter `{name}` must be an integer (digits only), got {value!r}", param=name)
    if len(given) > len(request.query_params):  # some name came more than once
        for name in request.query_params:
            count = len(request.query_params.getlist(name))
            if count > 1 and not accepted[name]:
                raise ApiError(422, f"query parameter `{name}` is given {count} times; {request.method} "
                                    f"{route.path} takes one value", param=name)
