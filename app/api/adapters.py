"""`/adapters` routes: upload, browse, download, aliases, soft delete.

Uploads are checked end to end before anything is stored (:mod:`app.adapter_uploads`); versions are
numbered by the registry and never reused. Downloads stream the stored PEFT files as a ``.tar.gz``
(or ``.zip``) of one folder, ``<name>-v<N>/``, loadable by ``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import shutil
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session
from starlette.requests import ClientDisconnect

from adapters_core.config import CONFIG_NAME
from adapters_core.peft_format import WEIGHTS_NAME
from app.adapter_uploads import (
    NAME_FIELD,
    CheckedAdapter,
    ReceivedForm,
    UploadRejected,
    UploadTooLarge,
    check_upload,
    receive_form,
    store_adapter_files,
)
from app.api.deps import Services, ServicesDep, SessionDep
from app.api.errors import ERROR_RESPONSES, ApiError
from app.digits import is_ascii_number
from app.registry import adapters as registry
from app.registry.models import MAX_DB_INT, AdapterVersion, as_utc, is_id_text
from app.storage import ArtifactNotFound, iter_file

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/adapters", tags=["adapters"])

# ----------------------------------------------------------------------------------- response shapes
NameParam = Annotated[str, PathParam(description="Adapter name, e.g. `support-bot`.")]
VersionParam = Annotated[int, PathParam(ge=1, le=MAX_DB_INT, description="Version number (1, 2, ...).")]
AliasParam = Annotated[str, PathParam(description="Alias, e.g. `prod`: a letter, then letters, digits, `_`, `-`.")]
LimitQuery = Annotated[int, Query(ge=1, le=100, description="Page size, 1-100.")]
AfterQuery = Annotated[str | None, Query(max_length=512, description="`next_cursor` of the previous page.")]


class FileOut(BaseModel):
    """A stored file: content address and size."""

    model_config = ConfigDict(extra="allow")

    sha256: str = Field(description="sha256 of the bytes (the store's object id).")
    size: int | None = Field(default=None, description="Size in bytes.")


class LineageOut(BaseModel):
    """Where a version came from."""

    job_id: str | None = Field(description="The train/merge job that produced it; null for uploads.")
    dataset_id: str | None = Field(description="The training dataset, for trained versions.")
    parents: list[Any] = Field(description="Source versions (`name@N`) of merges.")


class AdapterVersionOut(BaseModel):
    """One immutable version of an adapter."""

    id: str = Field(description="Version id (`av_...`).")
    object: Literal["adapter.version"] = Field(default="adapter.version", description="Always `adapter.version`.")
    name: str = Field(description="Adapter name.")
    version: int = Field(description="Version number (1, 2, ...; never reused).")
    ref: str = Field(description="`name@N`, usable wherever an adapter reference is accepted.")
    method: str = Field(description="PEFT method, lower-case (`lora`, ...).")
    config: dict[str, Any] = Field(description="`adapter_config.json` as stored.")
    files: dict[str, FileOut] = Field(description="File name → sha256 and size.")
    size: int = Field(description="Total bytes of the files.")
    base_model: str | None = Field(description="The base model the version was checked against or trained on.")
    lineage: LineageOut = Field(description="Where the version came from: job and dataset, or merge parents.")
    metrics: dict[str, Any] = Field(description="Training metrics (trained versions); `{}` for uploads.")
    aliases: list[str] = Field(description="Aliases pointing at this version.")
    created_at: datetime = Field(description="When the version was registered (UTC).")


class AdapterOut(BaseModel):
    """A named adapter, summarised over its live versions."""

    id: str = Field(description="Adapter id (`ad_...`).")
    object: Literal["adapter"] = Field(default="adapter", description="Always `adapter`.")
    name: str = Field(description="Adapter name (unique).")
    method: str = Field(description="PEFT method of its versions, lower-case.")
    latest_version: int | None = Field(description="Highest live version number; null when none is left.")
    version_count: int = Field(description="Number of live (not deleted) versions.")
    aliases: dict[str, int] = Field(description="Alias → version number.")
    created_at: datetime = Field(description="When the adapter's first version was registered (UTC).")
    updated_at: datetime = Field(description="When its newest live version was created.")


class AdapterDetailOut(AdapterOut):
    """An adapter and its latest version."""

    latest: AdapterVersionOut | None = Field(description="The latest live version; null when none is left.")


class AdapterList(BaseModel):
    data: list[AdapterOut] = Field(description="This page of adapters, in name order.")
    has_more: bool = Field(description="Whether another page follows.")
    next_cursor: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


class AdapterVersionList(BaseModel):
    data: list[AdapterVersionOut] = Field(description="This page of versions, newest first.")
    has_more: bool = Field(description="Whether another page follows.")
    next_cursor: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


class AliasIn(BaseModel):
    """Where an alias should point."""

    model_config = ConfigDict(extra="forbid", strict=True)  # `"2"` or `true` is not a version number

    version: int = Field(ge=1, le=MAX_DB_INT, description="Version number the alias points at.")


class AliasOut(BaseModel):
    object: Literal["adapter.alias"] = Field(default="adapter.alias", description="Always `adapter.alias`.")
    name: str = Field(description="Adapter name.")
    alias: str = Field(description="The alias, e.g. `prod`.")
    version: int = Field(description="Version number it points at.")
    ref: str = Field(description="`name@alias`.")
    updated_at: datetime = Field(description="When the alias was last set or moved (UTC).")


class DeletedOut(BaseModel):
    object: str = Field(description="`adapter`, `adapter.version` or `adapter.alias`.")
    id: str = Field(description="What was deleted: `name`, `name@N` or `name@alias`.")
    deleted: bool = Field(default=True, description="Always true.")


def _version_out(name: str, v: AdapterVersion, aliases: list[str]) -> AdapterVersionOut:
    return AdapterVersionOut(
        id=v.id, name=name, version=v.version, ref=f"{name}@{v.version}", method=v.method, config=v.config,
        files={k: FileOut.model_validate(f) for k, f in v.files.items()}, size=v.size, base_model=v.base_model,
        lineage=LineageOut(job_id=v.job_id, dataset_id=v.dataset_id, parents=list(v.parents)),
        metrics=v.metrics, aliases=aliases, created_at=as_utc(v.created_at),
    )


def _version_detail(session: Session, name: str, v: AdapterVersion) -> AdapterVersionOut:
    return _version_out(name, v, registry.version_aliases(session, [v.id]).get(v.id, []))


def _adapter_out(s: registry.AdapterSummary) -> dict[str, Any]:
    return {
        "id": s.id, "name": s.name, "method": s.method, "latest_version": s.latest_version,
        "version_count": s.version_count, "aliases": s.aliases, "created_at": as_utc(s.created_at),
        "updated_at": as_utc(s.updated_at),
    }


def _encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, kind: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    prefix, _, value = raw.partition(":")
    if prefix != kind or not value or not is_id_text(value):
        raise ApiError(422, "invalid cursor: pass the `next_cursor` of the previous page", param="after")
    return value


# ------------------------------------------------------------------------------------------ upload
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "files"],
                    "properties": {
                        "name": {"type": "string", "description": "Adapter name; the upload becomes its next version."},
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": f"`{CONFIG_NAME}` and `{WEIGHTS_NAME}` (a `README.md` is accepted and "
                            "not kept), or exactly one `.tar.gz`/`.tgz`/`.zip` of the adapter folder.",
                        },
                    },
                }
            }
        },
    }
}


def _register(services: Services, session: Session, name: str, checked: CheckedAdapter) -> AdapterVersionOut:
    """Store the checked files and record the next version of ``name`` (blocking; one transaction)."""
    try:
        registry.check_method(session, name, checked.method)  # refuse before anything is stored ...
        session.rollback()  # ... without holding the adapter's row lock while the files are copied
        files, size = store_adapter_files(services.store, checked.folder)
        registry.check_method(session, name, checked.method)  # again, under the lock create_version keeps
    except registry.MethodConflict as exc:
        raise ApiError(409, str(exc), param=exc.param) from exc
    version = registry.create_version(session, name, registry.VersionSpec(
        method=checked.method, config=checked.config, files=files, size=size, base_model=services.base_model.name,
    ))
    session.commit()
    logger.info("adapter %s@%d uploaded (%s, %d bytes)", name, version.version, checked.method, size)
    return _version_out(name, version, [])


@router.post(
    "",
    status_code=201,
    response_model=AdapterVersionOut,
    summary="Upload an adapter version",
    description=(
        "Multipart form: `name` and `files` — `adapter_config.json` + `adapter_model.safetensors` (HF PEFT format), "
        "or one `.tar.gz`/`.tgz`/`.zip` of that folder. Everything is checked before anything is stored: the body "
        "size (413 past the server's limit), pickle weights (415: safetensors only), the file set, the config, the "
        "safetensors header, then a test load on the base model's architecture (every key, shape and target "
        "module; NaN/Inf refused) — 422 naming the problem. Creates the next version of `name` (the adapter is "
        "created on first upload) and answers 201 with it. An adapter keeps one method: a version of another "
        "method answers 409."
    ),
    responses={k: v for k, v in ERROR_RESPONSES.items() if k in (400, 409, 413, 415, 422)},
    openapi_extra=_UPLOAD_BODY,
)
async def upload_adapter(request: Request, services: ServicesDep, session: SessionDep) -> AdapterVersionOut:
    limit = services.settings.max_upload_bytes
    uploads = services.settings.data_dir / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="adapter-", dir=uploads))
    try:
        declared = request.headers.get("content-length", "")
        if is_ascii_number(declared) and int(declared) > limit:
            raise UploadTooLarge(f"upload is larger than the limit of {limit} bytes", param=None)
        try:
            form: ReceivedForm = await receive_form(request.headers.get("content-type"), request.stream(), work,
                                                    max_bytes=limit)
        except ClientDisconnect as exc:
            raise UploadRejected("the client disconnected before the upload was complete", param=None) from exc
        name = form.fields.get(NAME_FIELD)
        if not name:
            raise UploadRejected(f"the form field {NAME_FIELD!r} (the adapter name) is required", param=NAME_FIELD)
        registry.check_new_name(name)
        if name == services.base_model.name:
            raise UploadRejected(f"the adapter name {name!r} is the base model's own name, which `model=` of the "
                                 "OpenAI routes gives the base model: choose another", param=NAME_FIELD)
        checked = await asyncio.to_thread(check_upload, form, work, services.base_model, max_bytes=limit)
        return await asyncio.to_thread(_register, services, session, name, checked)
    except UploadRejected as exc:
        logger.info("adapter upload refused (%d): %s", exc.status, exc.message)
        raise ApiError(exc.status, exc.message, code=exc.code, param=exc.param) from exc
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


# ------------------------------------------------------------------------------------------ browse
@router.get(
    "",
    response_model=AdapterList,
    summary="List adapters",
    description="Live adapters in name order, a page at a time: `limit` (1-100, default 20) and `after` (the "
    "previous page's `next_cursor`). `method` keeps adapters of one PEFT method, `q` those whose name contains "
    "it (case-insensitive).",
    responses={422: ERROR_RESPONSES[422]},
)
def list_adapters(
    session: SessionDep,
    limit: LimitQuery = 20,
    after: AfterQuery = None,
    method: Annotated[str | None, Query(max_length=32, description="PEFT method, e.g. `lora`.")] = None,
    q: Annotated[str | None, Query(max_length=128, description="Substring of the name, case-insensitive.")] = None,
) -> AdapterList:
    start = _decode_cursor(after, "n") if after else None
    found, has_more = registry.list_adapters(session, limit=limit, after=start, method=method, q=q)
    return AdapterList(
        data=[AdapterOut(**_adapter_out(s)) for s in found],
        has_more=has_more,
        next_cursor=_encode_cursor(f"n:{found[-1].name}") if has_more and found else None,
    )


@router.get(
    "/{name}",
    response_model=AdapterDetailOut,
    summary="Get an adapter",
    description="The adapter's summary (method, latest version number, live version count, aliases) and its "
    "latest version in full.",
    responses={404: ERROR_RESPONSES[404]},
)
def get_adapter(name: NameParam, session: SessionDep) -> AdapterDetailOut:
    summary = registry.adapter_summary(session, name)
    latest = None
    if summary.latest_version is not None:
        latest = _version_detail(session, name, registry.get_version(session, name, summary.latest_version))
    return AdapterDetailOut(**_adapter_out(summary), latest=latest)


@router.get(
    "/{name}/versions",
    response_model=AdapterVersionList,
    summary="List an adapter's versions",
    description="Live versions, newest first, a page at a time (`limit`, `after`). Deleted versions are not "
    "listed; their numbers stay taken.",
    responses={404: ERROR_RESPONSES[404], 422: ERROR_RESPONSES[422]},
)
def list_versions(name: NameParam, session: SessionDep, limit: LimitQuery = 20,
                  after: AfterQuery = None) -> AdapterVersionList:
    before = None
    if after:
        value = _decode_cursor(after, "v")
        if not is_ascii_number(value) or int(value) > MAX_DB_INT:
            raise ApiError(422, "invalid cursor: pass the `next_cursor` of the previous page", param="after")
        before = int(value)
    found, has_more = registry.list_versions(session, name, limit=limit, before=before)
    aliases = registry.version_aliases(session, [v.id for v in found])
    return AdapterVersionList(
        data=[_version_out(name, v, aliases.get(v.id, [])) for v in found],
        has_more=has_more,
        next_cursor=_encode_cursor(f"v:{found[-1].version}") if has_more and found else None,
    )


@router.get(
    "/{name}/versions/{version}",
    response_model=AdapterVersionOut,
    summary="Get a version",
    description="One version: method, config, files (sha256, size), base model, lineage (job, dataset, parent "
    "versions), metrics and the aliases pointing at it.",
    responses={404: ERROR_RESPONSES[404], 422: ERROR_RESPONSES[422]},
)
def get_version(name: NameParam, version: VersionParam, session: SessionDep) -> AdapterVersionOut:
    return _version_detail(session, name, registry.get_version(session, name, version))


@router.get(
    "/{name}/versions/{version}/download",
    summary="Download a version",
    description="The version's HF PEFT folder (`adapter_config.json` + `adapter_model.safetensors`, and every other "
    "file the version lists, e.g. a trained version's `README.md`, inside `<name>-v<N>/`) as a `.tar.gz` (default) "
    "or, with `format=zip`, a `.zip`, streamed from the store. "
    "`peft.PeftModel.from_pretrained(base, folder)` loads the unpacked folder.",
    response_class=StreamingResponse,
    responses={
        200: {"description": "the archive", "content": {"application/gzip": {}, "application/zip": {}}},
        404: ERROR_RESPONSES[404],
        422: ERROR_RESPONSES[422],
    },
)
def download_version(
    name: NameParam,
    version: VersionParam,
    services: ServicesDep,
    session: SessionDep,
    archive_format: Annotated[Literal["tar.gz", "zip"], Query(alias="format", description="`tar.gz` or `zip`.")] = "tar.gz",
) -> StreamingResponse:
    found = registry.get_version(session, name, version)
    members = []
    listed = sorted(f for f in found.files if f not in (CONFIG_NAME, WEIGHTS_NAME))  # (a trained version's README.md)
    for filename in (CONFIG_NAME, WEIGHTS_NAME, *listed):
        try:
            path: Path | None = services.store.path(str(found.files[filename]["sha256"]))
        except (ArtifactNotFound, KeyError, TypeError):
            path = None
        if path is None or not path.is_file():
            logger.error("%s@%d: %s is missing from the store", name, version, filename)
            raise ApiError(500, f"{name}@{version}: {filename} is missing from the artifact store",
                           code="internal_error")
        members.append((filename, path))
    folder = f"{name}-v{version}"
    mtime = as_utc(found.created_at).timestamp()
    stream: Iterator[bytes]
    if archive_format == "zip":
        stream, media_type = stream_zip(folder, members, mtime), "application/zip"
    else:
        stream, media_type = stream_tar_gz(folder, members, mtime), "application/gzip"
    return StreamingResponse(stream, media_type=media_type,
                             headers={"Content-Disposition": f'attachment; filename="{folder}.{archive_format}"'})


class _Sink:
    """A write-only, unseekable file: what ``zipfile`` writes lands here until the stream takes it."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def stream_tar_gz(folder: str, members: list[tuple[str, Path]], mtime: float) -> Iterator[bytes]:
    """``folder/`` holding ``members`` (arcname, path) as a gzipped tar, a chunk at a time."""
    gz = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip framing; level 1: float weights barely compress
    written = 0

    def entry(info: tarfile.TarInfo) -> bytes:
        nonlocal written
        info.mtime, info.uname, info.gname = int(mtime), "", ""
        header = info.tobuf(tarfile.PAX_FORMAT)
        written += len(header)
        return gz.compress(header)

    directory = tarfile.TarInfo(folder)
    directory.type, directory.mode = tarfile.DIRTYPE, 0o755
    yield entry(directory)
    for arcname, path in members:
        with path.open("rb") as src:
            info = tarfile.TarInfo(f"{folder}/{arcname}")
            info.size, info.mode = path.stat().st_size, 0o644
            yield entry(info)
            for chunk in iter_file(src):
                written += len(chunk)
                if out := gz.compress(chunk):
                    yield out
        pad = -written % tarfile.BLOCKSIZE
        written += pad
        yield gz.compress(b"\0" * pad)
    end = 2 * tarfile.BLOCKSIZE
    end += -(written + end) % tarfile.RECORDSIZE
    yield gz.compress(b"\0" * end) + gz.flush()


def stream_zip(folder: str, members: list[tuple[str, Path]], mtime: float) -> Iterator[bytes]:
    """``folder/`` holding ``members`` (arcname, path) as a zip written on the fly (data descriptors)."""
    sink = _Sink()
    stamp = time.gmtime(max(mtime, 315532800))[:6]  # zip dates start in 1980
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:  # type: ignore[call-overload]
        zf.writestr(zipfile.ZipInfo(f"{folder}/", date_time=stamp), b"")
        for arcname, path in members:
            info = zipfile.ZipInfo(f"{folder}/{arcname}", date_time=stamp)
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            info.file_size = path.stat().st_size
            with path.open("rb") as src, zf.open(info, "w") as dst:
                for chunk in iter_file(src):
                    dst.write(chunk)
                    if out := sink.take():
                        yield out
            yield sink.take()
    yield sink.take()


# ----------------------------------------------------------------------------------------- aliases
@router.put(
    "/{name}/aliases/{alias}",
    response_model=AliasOut,
    summary="Create or move an alias",
    description="Point `alias` (e.g. `prod`) at a live version; creates it (201) or moves it (200). `name@alias` "
    "then resolves to that version wherever a reference is accepted.",
    responses={201: {"description": "The alias was created.", "model": AliasOut},
               404: ERROR_RESPONSES[404], 422: ERROR_RESPONSES[422]},
)
def put_alias(name: NameParam, alias: AliasParam, body: AliasIn, session: SessionDep,
              response: Response) -> AliasOut:
    existed = registry.find_alias(session, name, alias) is not None
    row = registry.set_alias(session, name, alias, body.version)
    session.commit()
    if not existed:
        response.status_code = 201
    logger.info("alias %s@%s -> %d", name, alias, body.version)
    return AliasOut(name=name, alias=alias, version=body.version, ref=f"{name}@{alias}", updated_at=as_utc(row.updated_at))


@router.delete(
    "/{name}/aliases/{alias}",
    response_model=DeletedOut,
    summary="Delete an alias",
    description="Remove the alias; the version it pointed at is untouched.",
    responses={404: ERROR_RESPONSES[404]},
)
def delete_alias(name: NameParam, alias: AliasParam, session: SessionDep) -> DeletedOut:
    registry.delete_alias(session, name, alias)
    session.commit()
    return DeletedOut(object="adapter.alias", id=f"{name}@{alias}")


# ----------------------------------------------------------------------------------------- deletes
@router.delete(
    "/{name}/versions/{version}",
    response_model=DeletedOut,
    summary="Delete a version",
    description="Soft delete: the version disappears from lists and references, aliases pointing at it are "
    "removed, and its number is never reused (the next upload gets the next number). Inference stops serving "
    "it: it leaves the adapter cache once the generations already running with it finish.",
    responses={404: ERROR_RESPONSES[404], 422: ERROR_RESPONSES[422]},
)
def delete_version(name: NameParam, version: VersionParam, session: SessionDep, services: ServicesDep) -> DeletedOut:
    version_id = registry.delete_version(session, name, version)
    session.commit()
    if services.serving is not None:
        services.serving.evict([version_id])
    logger.info("adapter %s@%d deleted", name, version)
    return DeletedOut(object="adapter.version", id=f"{name}@{version}")


@router.delete(
    "/{name}",
    response_model=DeletedOut,
    summary="Delete an adapter",
    description="Soft-deletes the adapter with all its versions and aliases. Uploading the name again starts "
    "a fresh adapter whose version numbers continue after the deleted ones.",
    responses={404: ERROR_RESPONSES[404]},
)
def delete_adapter(name: NameParam, session: SessionDep, services: ServicesDep) -> DeletedOut:
    version_ids = registry.delete_adapter(session, name)
    session.commit()
    if services.serving is not None:
        services.serving.evict(version_ids)
    logger.info("adapter %s deleted", name)
    return DeletedOut(object="adapter", id=name)
