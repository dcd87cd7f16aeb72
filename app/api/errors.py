"""One error shape for every route: ``{"error": {"code", "message", "param"}}`` with the right status.

Routes raise :class:`ApiError` (or one of the domain errors mapped in :func:`install_error_handlers`);
request validation failures become 422 naming the offending field, malformed JSON 400, unknown
routes 404, wrong methods 405. Nothing a client sends may turn into a 500.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_core.errors import AdapterError, ConfigError
from app.registry.adapters import InvalidName, MethodConflict, NotFound
from app.registry.datasets import DatasetNotFound
from app.registry.jobs import JobConflict, JobNotFound
from app.serving.errors import ServingError
from app.storage import ArtifactTooLarge

logger = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    499: "client_closed_request",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answered to the client as ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _STATUS_CODES.get(status, "error")
        self.message = message
        self.param = param
        self.headers = headers


class FieldError(ValueError):
    """Raised by a request model's own checks about one field: the 422 names ``field`` as its ``param``, and
    the message (which should name the field too) is answered as it is."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def error_type(status: int) -> str:
    """OpenAI's ``type`` of an error answer with this HTTP status (its clients read it)."""
    if status >= 500:
        return "server_error"
    return "rate_limit_error" if status == 429 else "invalid_request_error"


def error_body(code: str, message: str, param: str | None = None, status: int = 400) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "param": param, "type": error_type(status)}}


def serving_error_code(exc: ServingError) -> str:
    """The ``code`` a serving error answers with (JSON or in a stream): a failure of ours is ``internal_error``."""
    return exc.code if exc.status < 500 or exc.code != "error" else "internal_error"


def serving_error_body(exc: ServingError) -> dict[str, Any]:
    return error_body(serving_error_code(exc), str(exc), exc.param, exc.status)


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message, param, status), status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    """What went wrong."""

    code: str = Field(description="Stable machine-readable code, e.g. `invalid_request`, `not_found`, `conflict`.")
    message: str = Field(description="Human-readable explanation naming the problem (and the line, for data).")
    param: str | None = Field(default=None, description="The offending field or parameter, e.g. `adapter.config.r`.")
    type: str = Field(description="OpenAI's error type, by status: `invalid_request_error` (4xx), "
                      "`rate_limit_error` (429), `server_error` (5xx).")


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail = Field(description="The error.")


def use_error_schema_for_validation(schema: dict[str, Any]) -> dict[str, Any]:
    """Make the OpenAPI document say what 422 answers really look like (our error shape, not
    FastAPI's default ``HTTPValidationError``)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    for name, model in (("ErrorDetail", ErrorDetail), ("ErrorResponse", ErrorResponse)):
        components[name] = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components[name].pop("$defs", None)
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            for status, response in operation.get("responses", {}).items():
                if status.isdigit() and int(status) >= 400:
                    for media in response.get("content", {}).values():
                        media["schema"] = ref
    return schema


def error_doc(code: str, description: str, status: int = 400, *, retry_after: bool = False) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for an error answer (``retry_after``: it carries a ``Retry-After`` header)."""
    doc: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"example": error_body(code, "...", status=status)}}}
    if retry_after:
        doc["headers"] = {"Retry-After": {"description": "Seconds to wait before trying again.",
                                          "schema": {"type": "integer"}}}
    return doc


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: error_doc(code, code.replace("_", " "), status)
    for status, code in _STATUS_CODES.items() if status in (400, 404, 409, 413, 415, 422)
}


_LOCATIONS = ("body", "query", "path", "header", "form", "cookie")
# pydantic names the member of a union it tried in ``loc`` (``prompt.str``, ``messages.list[ChatMessage].0``)
_UNION_MEMBER = re.compile(r"(str|int|float|bool|bytes|none|dict|list|set|tuple|literal|function-\w+|tagged-union"
                           r"|is-instance|nullable|chain|json-or-python|lax-or-strict)(\[.*\])?", re.IGNORECASE)


def _loc_to_param(loc: Sequence[Any]) -> str | None:
    """``("body", "adapter", "config", "r")`` → ``"adapter.config.r"``, without pydantic's union-member tags."""
    parts = [str(p) for p in loc if p not in _LOCATIONS and not (isinstance(p, str) and _UNION_MEMBER.fullmatch(p))]
    return ".".join(parts) or None


def _describe(err: dict[str, Any]) -> tuple[str | None, str]:
    """The field one validation error is about, and a message for it."""
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return cause.field, str(cause)  # (its message names the field)
    where = _loc_to_param(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif isinstance(cause, ValueError):
        msg = str(cause)  # without pydantic's "Value error, " prefix
    else:
        msg = err.get("msg", "invalid")
    return where, f"{where or 'body'}: {msg}"


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors: list[dict[str, Any]] = [dict(e) for e in exc.errors()]
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        ctx: dict[str, Any] = first.get("ctx") or {}
        detail = ctx.get("error", first.get("msg"))
        return error_response(400, "invalid_json", f"request body is not valid JSON: {detail}")
    param = _describe(first)[0]
    messages = [_describe(err)[1] for err in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return error_response(422, "invalid_request", "; ".join(messages) + more, param)


def _non_json_body(request: Request, exc: RequestValidationError) -> str | None:
    """The media type of a body that was refused as a whole because it was not sent as JSON (``curl -d``
    sends ``application/x-www-form-urlencoded``), else ``None``."""
    errors = exc.errors()
    if not errors or tuple(errors[0].get("loc") or ()) != ("body",):
        return None
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not media or media == "application/json" or media.endswith("+json"):
        return None
    return media


def install_error_handlers(app: FastAPI) -> None:
    """Map every error a route can raise to the one JSON error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        media = _non_json_body(request, exc)
        if media is not None:  # (FastAPI hands such a body to the route as bytes: "should be a valid dictionary")
            return error_response(415, "unsupported_media_type", f"the body was sent as {media!r}: send it as JSON, "
                                  "with `Content-Type: application/json`")
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return error_response(404, "not_found", str(exc), exc.param)

    @app.exception_handler(InvalidName)
    async def _invalid_name(_: Request, exc: InvalidName) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc), exc.param)

    @app.exception_handler(MethodConflict)
    async def _method_conflict(_: Request, exc: MethodConflict) -> JSONResponse:
        return error_response(409, "conflict", str(exc), exc.param)

    @app.exception_handler(JobNotFound)
    async def _job_not_found(_: Request, exc: JobNotFound) -> JSONResponse:
        return error_response(404, "not_found", str(exc), "job_id")

    @app.exception_handler(DatasetNotFound)
    async def _dataset_not_found(_: Request, exc: DatasetNotFound) -> JSONResponse:
        return error_response(404, "not_found", str(exc), "dataset_id")

    @app.exception_handler(JobConflict)
    async def _conflict(_: Request, exc: JobConflict) -> JSONResponse:
        return error_response(409, "conflict", str(exc))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        logger.error("database unavailable: %s", exc.__class__.__name__, exc_info=exc)  # (the log has the detail)
        return error_response(503, "unavailable", "the database is unavailable; try again later",
                              headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:  # (Starlette logs and re-raises it after)
        return error_response(500, "internal_error", "internal server error (the server's log has the details)")

    @app.exception_handler(ArtifactTooLarge)
    async def _too_large(_: Request, exc: ArtifactTooLarge) -> JSONResponse:
        return error_response(413, "payload_too_large", str(exc))

    @app.exception_handler(ServingError)
    async def _serving(_: Request, exc: ServingError) -> JSONResponse:
        if exc.status >= 500:
            logger.error("serving error: %s", exc)
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
        return error_response(exc.status, serving_error_code(exc), str(exc), exc.param, headers)

    @app.exception_handler(ConfigError)
    async def _config(_: Request, exc: ConfigError) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc), getattr(exc, "field", None))

    @app.exception_handler(AdapterError)
    async def _adapter(_: Request, exc: AdapterError) -> JSONResponse:
        return error_response(422, "invalid_adapter", str(exc))
