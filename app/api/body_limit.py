"""A size limit on request bodies (``ADAPTERFORGE_MAX_REQUEST_BYTES``), as a pure ASGI middleware.

FastAPI reads a JSON body whole before any route code runs, so without a limit one request of a
gigabyte of JSON would be read, parsed and tokenized before anything could refuse it. Here a body
over the limit is answered 413 ``payload_too_large`` as soon as that is known: at once from its
``Content-Length``, else while it arrives, without reading past the limit. The multipart uploads
(``POST /datasets``, ``POST /adapters``) stream their files to disk under their own, larger limit
(``ADAPTERFORGE_MAX_UPLOAD_BYTES``) and are left alone.

A body within the limit is handed on as it came, and the app's later ``receive`` calls (a streaming
route waiting for the client to leave) reach the server's own.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from app.api.errors import error_body

UPLOAD_ROUTES = frozenset({("POST", "/datasets"), ("POST", "/adapters")})


def _route_path(scope: dict[str, Any]) -> str:
    """The request's path as the app's routes see it: without the server's ``--root-path`` prefix (uvicorn puts it
    in ``path``) and a trailing slash (``/datasets/``, which the app redirects)."""
    path = str(scope.get("path") or "")
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


class BodyLimitMiddleware:
    """413 for a request body over ``max_bytes`` (the routes in ``exempt`` stream theirs and check it themselves)."""

    def __init__(self, app: Any, max_bytes: int, exempt: Collection[tuple[str, str]] = UPLOAD_ROUTES) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = frozenset(exempt)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope.get("method"), _route_path(scope)) in self.exempt:
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        messages: list[dict[str, Any]] = []
        size = 0
        while True:  # the body, up to the limit (FastAPI would read it whole anyway)
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client left: the app sees that as it would have
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(error_body(
            "payload_too_large",
            f"the request body exceeds this server's limit of {self.max_bytes} bytes (ADAPTERFORGE_MAX_REQUEST_BYTES)",
            status=413,
        )).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
