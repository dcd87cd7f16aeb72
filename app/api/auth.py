"""API keys (``ADAPTERFORGE_API_KEYS``), checked before routing, as a pure ASGI middleware.

Every request but the probes (``/healthz``, ``/readyz``) needs ``Authorization: Bearer <key>``, the API's
pages and schema (``/docs``, ``/redoc``, ``/openapi.json``) included. Checked before routing, a request
without the key gets its 401 before any body is read or parsed (a route's dependencies would run only
after FastAPI had parsed a JSON body: a 400 for malformed JSON to anyone). The token is compared as the
bytes the client sent (UTF-8 keys match what curl sends), in constant time, against each key.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from typing import Any

from app.api.errors import error_body

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class ApiKeyMiddleware:
    """401 (the JSON error shape, ``WWW-Authenticate: Bearer``) unless the request carries one of ``keys``."""

    def __init__(self, app: Any, keys: Sequence[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if not self.keys or scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self._allowed(dict(scope.get("headers") or []).get(b"authorization", b"")):
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body("unauthorized", "missing or invalid API key: send `Authorization: Bearer <key>`",
                                     status=401)).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})

    def _allowed(self, header: bytes) -> bool:
        scheme, _, token = header.strip().partition(b" ")
        token = token.strip(b" ")  # (RFC 7235: one or more spaces after the scheme)
        if scheme.lower() != b"bearer" or not token:
            return False
        return any(secrets.compare_digest(token, key) for key in self.keys)
