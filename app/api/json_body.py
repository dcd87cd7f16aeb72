"""Refuse JSON request bodies that give one key twice.

Python's ``json`` (what FastAPI parses bodies with) keeps the last value of a repeated key without a
word, so ``{"epochs": 1, "epochs": 50}`` would train for 50 epochs. The app-wide dependency here parses
the body the route already read once more, noting repeats, and answers 422 naming the key. Routes that
stream their body themselves (the multipart uploads) declare no body field and are left alone.
"""

from __future__ import annotations

import json

from fastapi import Request
from fastapi.routing import APIRoute

from adapters_core.json_objects import RepeatedKey, object_without_repeats
from app.api.errors import ApiError


async def reject_repeated_json_keys(request: Request) -> None:
    """422 naming a key that a JSON object of the request body gives more than once."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or route.body_field is None:
        return
    body = await request.body()  # read (and kept) already: FastAPI parsed it before solving dependencies
    if not body:
        return
    try:
        json.loads(body, object_pairs_hook=object_without_repeats)
    except RepeatedKey as exc:
        raise ApiError(422, f"the JSON body gives the key {exc.key!r} more than once (which value was meant?)",
                       param=exc.key) from None
    except (ValueError, RecursionError):  # not JSON at all: the route's own parsing has answered that
        return


__all__ = ["reject_repeated_json_keys"]
