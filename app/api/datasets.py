"""`/datasets` routes: upload a JSONL training file (validated line by line), list, get, delete.

An upload streams to a temp file under the artifact store (never held in memory, never past
``max_upload_bytes``), is validated and token-counted with the base model's tokenizer, and only
then stored content-addressed and registered. A rejected upload leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from pydantic import AfterValidator, BaseModel, Field
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from adapters_core.training.data import ValidationReport, validate_file
from adapters_core.training.hyperparameters import Hyperparameters
from app.api.deps import Services, ServicesDep, SessionDep
from app.api.errors import ERROR_RESPONSES, ApiError
from app.digits import is_ascii_number
from app.registry.datasets import DatasetNotFound, create_dataset, delete_dataset, get_dataset, list_datasets
from app.registry.models import Dataset, as_utc
from app.storage import iter_file

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/datasets", tags=["datasets"])
DatasetIdPath = Annotated[str, PathParam(description="Dataset id (`ds_...`).")]

DEFAULT_MAX_SEQ_LEN = Hyperparameters().max_seq_len
LISTED_ERRORS = 10  # validation problems named in a 422 message
STORED_WARNINGS = 100  # warnings kept in a dataset's summary (the total is kept too)
_FORM_OVERHEAD = 1 << 20  # multipart headers and small fields allowed on top of the file itself
_MAX_FIELD_BYTES = 64
# Fast tokenizers are not safe to call from several threads at once ("Already borrowed").
_TOKENIZER_LOCK = threading.Lock()


UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]


class DatasetOut(BaseModel):
    """An uploaded, validated JSONL dataset."""

    id: str = Field(description="Dataset id (use it as dataset_id in POST /jobs).")
    object: Literal["dataset"] = Field(default="dataset", description="Always `dataset`.")
    filename: str = Field(description="Name of the uploaded file.")
    sha256: str = Field(description="sha256 of the file's bytes (the store is content-addressed).")
    size: int = Field(description="Size in bytes.")
    form: str = Field(description="Example form of every line: chat (messages), completion (prompt/completion) or text.")
    summary: dict[str, Any] = Field(
        description="Validation report: `summary` (examples, total_tokens, max_tokens, longest_line, max_seq_len, "
                    "over_length, over_length_handling), `warnings` (line, field, code, message; the first "
                    f"{STORED_WARNINGS}, with `warnings_total`), `form`, `ok`.")
    created_at: UtcDatetime = Field(description="Upload time (UTC).")


class DeletedDatasetOut(DatasetOut):
    """A dataset that was just deleted."""

    deleted: Literal[True] = Field(default=True, description="Always true.")


class DatasetList(BaseModel):
    """One page of datasets, newest first."""

    data: list[DatasetOut] = Field(description="The datasets on this page.")
    has_more: bool = Field(description="Whether another page follows.")
    next_cursor: str | None = Field(description="Pass as `after` to get the next page; null on the last page.")


def dataset_out(ds: Dataset) -> DatasetOut:
    return DatasetOut(id=ds.id, filename=ds.filename, sha256=ds.sha256, size=ds.size, form=ds.form,
                      summary=ds.summary, created_at=ds.created_at)


# ------------------------------------------------------------------------------------------ upload parsing


@dataclass
class _Upload:
    """What the multipart body held: the file (in a temp file) and the form fields."""

    path: Path | None = None
    filename: str = "dataset.jsonl"
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


class _MultipartReader:
    """python-multipart callbacks that write field ``file`` to a temp file, refusing anything else
    (other files, unknown fields, oversize parts) as soon as its headers or bytes arrive."""

    FIELDS = ("max_seq_len",)

    def __init__(self, tmp_dir: Path, max_bytes: int) -> None:
        self.tmp_dir, self.max_bytes = tmp_dir, max_bytes
        self.upload = _Upload()
        self._out: BinaryIO | None = None
        self._field: str | None = None
        self._value = bytearray()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self.complete = False  # the closing boundary arrived

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._header_name.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._disposition, self._field = b"", None
        self._value.clear()

    def _header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if name == "file":
            if filename is None:
                raise ApiError(422, "field `file` must be a file upload (a part with a filename)", param="file")
            if self.upload.path is not None:
                raise ApiError(422, "send exactly one file in field `file`", param="file")
            fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="put-upload-", suffix=".jsonl")
            self.upload.path = Path(tmp)
            self.upload.filename = _clean_filename(filename.decode("utf-8", "replace"))
            self._out = os.fdopen(fd, "wb")
        elif name in self.FIELDS and filename is None:
            self._field = name
        else:
            raise ApiError(422, f"unexpected form field {name!r}: send the JSONL in `file` (and optionally "
                           f"{', '.join(self.FIELDS)})", param=name or None)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self.upload.size += end - start
            if self.upload.size > self.max_bytes:
                raise ApiError(413, f"the file exceeds the upload limit of {self.max_bytes} bytes", param="file")
            self._out.write(data[start:end])
        elif self._field is not None:
            self._value.extend(data[start:end])
            if len(self._value) > _MAX_FIELD_BYTES:
                raise ApiError(422, f"form field {self._field} is too long", param=self._field)

    def _part_end(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        elif self._field is not None:
            if self._field in self.upload.fields:  # which value was meant? (the last would win silently)
                raise ApiError(422, f"form field {self._field} is given twice", param=self._field)
            self.upload.fields[self._field] = self._value.decode("utf-8", "replace").strip()
            self._field = None

    def _end(self) -> None:
        self.complete = True

    def discard(self) -> None:
        """Remove the temp file (on any failure, and after the upload was stored)."""
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.upload.path is not None:
            self.upload.path.unlink(missing_ok=True)


def _clean_filename(name: str) -> str:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] or "dataset.jsonl"


async def _receive(request: Request, reader: _MultipartReader) -> _Upload:
    """Stream the multipart body through ``reader``; 415/400/413 for bodies that are not a usable form."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise ApiError(415, "send the dataset as multipart/form-data with the JSONL file in field `file`")
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data body without a boundary")
    declared = request.headers.get("content-length", "")
    if is_ascii_number(declared) and int(declared) > reader.max_bytes + _FORM_OVERHEAD:
        raise ApiError(413, f"the upload exceeds the limit of {reader.max_bytes} bytes", param="file")
    parser = MultipartParser(boundary, reader.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from exc
    if not reader.complete:
        raise ApiError(400, "the multipart body ended before its closing boundary (truncated upload?)")
    return reader.upload


def _max_seq_len(fields: dict[str, str]) -> int:
    raw = fields.get("max_seq_len", "")
    if not raw:
        return DEFAULT_MAX_SEQ_LEN
    if not is_ascii_number(raw) or int(raw) < 1:
        raise ApiError(422, f"max_seq_len must be an integer >= 1, got {raw!r}", param="max_seq_len")
    return int(raw)


def _problems(report: ValidationReport) -> str:
    errors = report.errors
    listed = "; ".join(str(issue) for issue in errors[:LISTED_ERRORS])
    more = f" (and {len(errors) - LISTED_ERRORS} more)" if len(errors) > LISTED_ERRORS else ""
    return f"the dataset has {len(errors)} error{'s' if len(errors) != 1 else ''}: {listed}{more}"


def _summary(report: ValidationReport) -> dict[str, Any]:
    out = report.to_dict()
    out["warnings_total"] = len(out["warnings"])
    out["warnings"] = out["warnings"][:STORED_WARNINGS]
    return out


def _validate_and_store(services: Services, upload: _Upload, max_seq_len: int) -> DatasetOut:
    """Blocking part of an upload: validate, store content-addressed, register (one commit)."""
    assert upload.path is not None
    with _TOKENIZER_LOCK:
        report = validate_file(upload.path, services.base_model.tokenizer, max_seq_len)
    if not report.ok:
        raise ApiError(422, _problems(report), param="file")
    with upload.path.open("rb") as f:
        ref = services.store.put(iter_file(f), max_bytes=services.settings.max_upload_bytes)
    with services.db.sessions() as session:
        ds = create_dataset(session, filename=upload.filename, sha256=ref.sha256, size=ref.size,
                            form=report.form or "", summary=_summary(report))
        session.commit()
        logger.info("dataset %s: %s (%d bytes, %d examples)", ds.id, ds.filename, ds.size, report.summary.examples,
                    extra={"dataset_id": ds.id})
        return dataset_out(ds)


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file"],
            "properties": {
                "file": {"type": "string", "format": "binary",
                         "description": "JSONL, one example per line: {\"messages\": [...]} (chat), "
                                        "{\"prompt\", \"completion\"} or {\"text\"}; the same form on every line."},
                "max_seq_len": {"type": "integer", "minimum": 1, "default": DEFAULT_MAX_SEQ_LEN,
                                "description": "Token length the examples are checked against (warnings name "
                                               "longer ones)."},
            },
        }}},
    }
}


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    summary="Upload a dataset",
    description="Multipart upload of one JSONL file in field `file`. Every line is validated; any error answers "
    "422 naming the first problems by line and field (e.g. `line 3: messages[1].content: ...`) and nothing is "
    "stored. 415 when the body is not multipart/form-data, 413 past the upload limit.",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k in (400, 413, 415, 422)},
    openapi_extra=_UPLOAD_BODY,
)
async def upload_dataset(request: Request, services: ServicesDep) -> DatasetOut:
    reader = _MultipartReader(services.store.root / "tmp", services.settings.max_upload_bytes)
    try:
        upload = await _receive(request, reader)
        if upload.path is None:
            raise ApiError(422, "no file: send the JSONL file in multipart field `file`", param="file")
        max_seq_len = _max_seq_len(upload.fields)
        return await asyncio.to_thread(_validate_and_store, services, upload, max_seq_len)
    finally:
        await asyncio.to_thread(reader.discard)


@router.get(
    "",
    response_model=DatasetList,
    summary="List datasets",
    description="Newest first, `limit` per page; pass the previous page's `next_cursor` as `after`.",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k == 422},
)
def get_datasets(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Datasets per page (1-100).")] = 20,
    after: Annotated[str | None, Query(description="Cursor: `next_cursor` of the previous page.")] = None,
) -> DatasetList:
    try:
        rows, has_more = list_datasets(session, limit=limit, after=after)
    except DatasetNotFound as exc:
        raise ApiError(422, f"unknown cursor {after!r}: use next_cursor of the previous page", param="after") from exc
    return DatasetList(data=[dataset_out(ds) for ds in rows], has_more=has_more,
                       next_cursor=rows[-1].id if has_more and rows else None)


@router.get(
    "/{dataset_id}",
    response_model=DatasetOut,
    summary="Get a dataset",
    description="The dataset and its validation summary; 404 if there is none (or it was deleted).",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k == 404},
)
def get_one_dataset(dataset_id: DatasetIdPath, session: SessionDep) -> DatasetOut:
    return dataset_out(get_dataset(session, dataset_id))


@router.delete(
    "/{dataset_id}",
    response_model=DeletedDatasetOut,
    summary="Delete a dataset",
    description="Soft delete: the dataset disappears from listings and cannot be used by new jobs; adapters "
    "trained on it keep their lineage. 409 while a queued or running job uses it.",
    responses={k: v for k, v in ERROR_RESPONSES.items() if k in (404, 409)},
)
def remove_dataset(dataset_id: DatasetIdPath, session: SessionDep) -> DeletedDatasetOut:
    ds = delete_dataset(session, dataset_id)
    session.commit()
    logger.info("dataset %s deleted", dataset_id, extra={"dataset_id": dataset_id})
    return DeletedDatasetOut(**dataset_out(ds).model_dump())
