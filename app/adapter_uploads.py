"""Adapter uploads: a ``multipart/form-data`` body in, a checked PEFT folder and stored files out.

The steps, each refusing with an :class:`UploadRejected` (status, message, param) before anything is
stored:

1. :func:`receive_form` streams the body into a work folder: 415 unless it is multipart, 413 as soon
   as it passes the size limit (reading stops there), 415 as soon as a part's file name says pickle.
2. :func:`adapter_folder` turns the received files into one folder holding ``adapter_config.json`` and
   ``adapter_model.safetensors``: the two files themselves, or one ``.tar.gz``/``.tgz``/``.zip`` of the
   folder (unpacked safely); unexpected or missing files are named (422).
3. :func:`read_config` and :func:`check_safetensors_header` check the config JSON and the weights
   header without trusting either; :func:`check_against_base` test-loads the folder on the base
   model's architecture (keys, shapes, targets, NaN/Inf).
4. :func:`store_adapter_files` puts the two files in the content-addressed store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from adapters_core.config import CONFIG_NAME, config_from_dict
from adapters_core.errors import AdapterError, ConfigError, UnsafeCheckpointError
from adapters_core.peft_format import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME, base_rewriting_init
from app.storage import LocalArtifactStore, iter_file
from app.uploads import UnsafeArchive, extract_adapter_archive

logger = logging.getLogger(__name__)

NAME_FIELD = "name"
FILES_FIELD = "files"
README_NAME = "README.md"  # written by PEFT's save_pretrained; accepted and not kept
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")
MAX_FILE_PARTS = 8
MAX_TEXT_FIELD_BYTES = 4096
MAX_CONFIG_BYTES = 1 << 20
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

# bytes per element of each safetensors dtype
_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


class UploadRejected(Exception):
    """The upload is refused; ``status`` is the HTTP answer and ``param`` the offending input."""

    status = 422
    code = "invalid_request"

    def __init__(self, message: str, param: str | None = FILES_FIELD) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class MalformedBody(UploadRejected):
    """The body is not parseable multipart (400)."""

    status = 400
    code = "bad_request"


class UploadTooLarge(UploadRejected):
    """The body is over the size limit (413)."""

    status = 413
    code = "payload_too_large"


class UnsupportedUpload(UploadRejected):
    """Not multipart, or pickle weights (415)."""

    status = 415
    code = "unsupported_media_type"


class InvalidAdapter(UploadRejected):
    """The files are not a valid adapter for this base model (422)."""

    code = "invalid_adapter"


def _pickle_refusal(filename: str) -> UnsupportedUpload:
    return UnsupportedUpload(
        f"{filename!r} is a pickle file, which can run arbitrary code when loaded: only safetensors weights are "
        f"accepted. Convert it (e.g. save with safe_serialization=True) and upload {WEIGHTS_NAME}"
    )


def is_pickle_name(filename: str) -> bool:
    return filename.lower().endswith(PICKLE_SUFFIXES)


def is_archive_name(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


# ----------------------------------------------------------------------------------- 1. receiving
@dataclass
class ReceivedFile:
    """A file part: the base name the client gave and where its bytes are."""

    filename: str
    path: Path
    size: int = 0


@dataclass
class ReceivedForm:
    """The text fields and files of the body."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[ReceivedFile] = field(default_factory=list)


def _client_filename(raw: bytes) -> str:
    """The last path component of a part's filename (clients may send ``folder/file``)."""
    text = raw.decode("utf-8", "replace").replace("\\", "/")
    name = PurePosixPath(text).name
    if not name or name in (".", "..") or any(ord(c) < 32 for c in name) or len(name) > 255:
        raise UploadRejected(f"file name {text!r} is not acceptable")
    return name


class _FormCollector:
    """python-multipart callbacks writing file parts to ``folder`` (names of our own) and keeping text fields."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.form = ReceivedForm()
        self.pending: list[tuple[IO[bytes], bytes]] = []
        self._headers: dict[bytes, bytes] = {}
        self._header_name = b""
        self._header_value = b""
        self._field: str | None = None
        self._text = bytearray()
        self._file: ReceivedFile | None = None
        self._out: IO[bytes] | None = None
        self._open: list[IO[bytes]] = []

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._field, self._file, self._out = {}, None, None, None
        self._text = bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise MalformedBody("a multipart part has no Content-Disposition name", param=None)
        self._field = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            if self._field == FILES_FIELD:
                raise UploadRejected(f"field {FILES_FIELD!r} must hold file uploads, not text")
            if self._field != NAME_FIELD:
                raise UploadRejected(
                    f"unexpected form field {self._field!r}: send {NAME_FIELD!r} and {FILES_FIELD!r}", param=self._field
                )
            if self._field in self.form.fields:
                raise UploadRejected(f"form field {self._field!r} is given more than once", param=self._field)
            return
        if self._field != FILES_FIELD:
            raise UploadRejected(
                f"unexpected file field {self._field!r}: send files in the field {FILES_FIELD!r}", param=self._field
            )
        filename = _client_filename(options[b"filename"])
        if is_pickle_name(filename):
            raise _pickle_refusal(filename)
        if len(self.form.files) >= MAX_FILE_PARTS:
            raise UploadRejected(f"too many files: at most {MAX_FILE_PARTS} are accepted")
        self._file = ReceivedFile(filename, self.folder / f"part-{len(self.form.files)}")
        self._out = self._file.path.open("wb")
        self._open.append(self._out)
        self.form.files.append(self._file)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None and self._out is not None:
            self._file.size += end - start
            self.pending.append((self._out, data[start:end]))
            return
        self._text += data[start:end]
        if len(self._text) > MAX_TEXT_FIELD_BYTES:
            raise UploadRejected(f"form field {self._field!r} is too long", param=self._field)

    def _part_end(self) -> None:
        if self._file is None and self._field is not None:
            self.form.fields[self._field] = self._text.decode("utf-8", "replace").strip()

    def flush(self) -> None:
        """Write the pending file bytes (called off the event loop)."""
        for out, data in self.pending:
            out.write(data)
        self.pending.clear()

    def close(self) -> None:
        for out in self._open:
            out.close()


async def receive_form(
    content_type: str | None, chunks: AsyncIterator[bytes], folder: Path, *, max_bytes: int
) -> ReceivedForm:
    """Stream a ``multipart/form-data`` body into ``folder``; stops reading once it passes ``max_bytes``."""
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        shown = media_type.decode("latin-1") or "none"
        raise UnsupportedUpload(
            f"Content-Type {shown!r} is not accepted: send multipart/form-data with a {NAME_FIELD!r} field and "
            f"files in {FILES_FIELD!r}",
            param=None,
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise MalformedBody("multipart body without a boundary", param=None)
    collector = _FormCollector(folder)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise UploadTooLarge(f"upload is larger than the limit of {max_bytes} bytes", param=None)
            parser.write(chunk)
            if collector.pending:
                await asyncio.to_thread(collector.flush)
        parser.finalize()
    except FormParserError as exc:
        raise MalformedBody(f"malformed multipart body: {exc}", param=None) from exc
    finally:
        collector.close()
    return collector.form


# ------------------------------------------------------------------------------ 2. the folder
def adapter_folder(form: ReceivedForm, work: Path, *, max_bytes: int) -> Path:
    """The folder holding the adapter's two files, from loose files or one archive."""
    files = form.files
    if not files:
        raise UploadRejected(
            f"no files: send {CONFIG_NAME} and {WEIGHTS_NAME}, or one .tar.gz/.zip of the adapter folder, "
            f"in the field {FILES_FIELD!r}"
        )
    folder = work / "adapter"
    archives = [f for f in files if is_archive_name(f.filename)]
    if archives:
        if len(files) > 1:
            others = ", ".join(sorted(f.filename for f in files if f is not archives[0]))
            raise UploadRejected(f"send one archive on its own, or the adapter files without one; also got: {others}")
        archive = archives[0]
        try:
            extract_adapter_archive(archive.path, folder, max_bytes=max_bytes)
        except UnsafeArchive as exc:
            raise UploadRejected(f"{archive.filename}: {exc}") from exc
        if (folder / PICKLE_WEIGHTS_NAME).exists():
            raise _pickle_refusal(f"{archive.filename}/{PICKLE_WEIGHTS_NAME}")
        if not (folder / WEIGHTS_NAME).exists():
            raise UploadRejected(f"{archive.filename} has no {WEIGHTS_NAME} next to its {CONFIG_NAME}")
        return folder
    names = [f.filename for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    unexpected = sorted(set(names) - {CONFIG_NAME, WEIGHTS_NAME, README_NAME})
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if n not in names]
    problems = []
    if unexpected:
        problems.append("unexpected files: " + ", ".join(unexpected))
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if repeated:
        problems.append("sent more than once: " + ", ".join(repeated))
    if problems:
        raise UploadRejected(
            "; ".join(problems) + f" (send {CONFIG_NAME} and {WEIGHTS_NAME}, or one .tar.gz/.zip of the adapter folder)"
        )
    folder.mkdir()
    for f in files:
        if f.filename != README_NAME:
            os.replace(f.path, folder / f.filename)
    return folder


# ---------------------------------------------------------------------------------- 3. checks
class _NonFiniteConstant:
    """``NaN``, ``Infinity``, ``-Infinity`` (which JSON has not; Python's parser accepts them) or a number past
    float's range (``1e999``, which it reads as infinity)."""

    def __init__(self, text: str) -> None:
        self.text = text


class JSONRefused(ValueError):
    """Text that is not strict JSON; ``key``: the top-level key holding a NaN/Infinity, if that is why."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _finite_float(text: str) -> float | _NonFiniteConstant:
    value = float(text)
    return value if math.isfinite(value) else _NonFiniteConstant(text)  # 1e999: past float's range


def _first_non_finite(value: Any) -> _NonFiniteConstant | None:
    if isinstance(value, _NonFiniteConstant):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for item in items:
        found = _first_non_finite(item)
        if found is not None:
            return found
    return None


def parse_strict_json(raw: bytes) -> Any:
    """``raw`` (UTF-8 JSON) parsed, or :class:`JSONRefused` saying why: not UTF-8, not JSON, nested too
    deeply, an integer too long for Python's parser, or a ``NaN``/``Infinity`` (which strict JSON, a
    PostgreSQL ``json`` column and every scale refuse)."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_NonFiniteConstant, parse_float=_finite_float)
    except RecursionError:
        raise JSONRefused("it is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, or an integer over the digit limit
        raise JSONRefused(str(exc)) from exc
    if isinstance(data, dict):
        for key, value in data.items():
            found = _first_non_finite(value)
            if found is not None:
                raise JSONRefused(f"{key}: {found.text} is not a finite JSON number", key=key)
    else:
        found = _first_non_finite(data)
        if found is not None:
            raise JSONRefused(f"{found.text} is not a finite JSON number")
    return data


def read_config(folder: Path) -> dict[str, Any]:
    """The uploaded ``adapter_config.json`` as a dict, checked to name a method this engine knows."""
    path = folder / CONFIG_NAME
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UploadRejected(f"{CONFIG_NAME} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = parse_strict_json(path.read_bytes())
    except JSONRefused as exc:
        raise UploadRejected(f"{CONFIG_NAME} is not valid JSON: {exc}", param=exc.key or FILES_FIELD) from exc
    if not isinstance(data, dict):
        raise UploadRejected(f"{CONFIG_NAME} must hold a JSON object, not {type(data).__name__}")
    try:
        config_from_dict(dict(data))
    except ConfigError as exc:
        raise UploadRejected(f"{CONFIG_NAME}: {exc}", param=exc.field or FILES_FIELD) from exc
    except (TypeError, ValueError) as exc:  # a field of the wrong type reaching a config's __post_init__
        raise UploadRejected(f"{CONFIG_NAME}: {exc}") from exc
    return data


def _bad_weights(reason: str) -> InvalidAdapter:
    return InvalidAdapter(f"{WEIGHTS_NAME} is not a valid safetensors file: {reason}")


def check_safetensors_header(path: Path) -> None:
    """Check the safetensors header of ``path`` against the file: length, JSON, dtypes, shapes, offsets."""
    size = path.stat().st_size
    if size < 8:
        raise _bad_weights(f"{size} bytes is too short")
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len == 0 or header_len > min(size - 8, MAX_SAFETENSORS_HEADER):
            raise _bad_weights(f"header length {header_len} does not fit a file of {size} bytes")
        raw = f.read(header_len)
    try:
        header = parse_strict_json(raw)
    except JSONRefused as exc:
        raise _bad_weights(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _bad_weights("header is not a JSON object")
    data_len = size - 8 - header_len
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise _bad_weights("__metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict):
            raise _bad_weights(f"entry {key!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _DTYPE_SIZES:
            raise _bad_weights(f"tensor {key!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _bad_weights(f"tensor {key!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise _bad_weights(f"tensor {key!r} has offsets {offsets!r} outside the {data_len} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise _bad_weights(f"tensor {key!r}: {offsets[1] - offsets[0]} bytes do not hold {dtype} {shape}")
        spans.append((offsets[0], offsets[1]))
    if not spans:
        raise _bad_weights("it holds no tensors")
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise _bad_weights("tensor data overlaps or leaves gaps")
        position = end
    if position != data_len:
        raise _bad_weights(f"tensors cover {position} of {data_len} data bytes")


class AdapterChecker(Protocol):
    """What the checks need of the base model host (:class:`app.base_model.BaseModelHost`)."""

    def check_adapter(self, directory: str | Path) -> Any: ...


def check_against_base(host: AdapterChecker, folder: Path) -> None:
    """Test-load ``folder`` on the base model (``host.check_adapter``); engine errors become 422s."""
    def clean(exc: BaseException) -> str:  # the work folder is the server's business, not the client's
        return str(exc).replace(f"{folder}{os.sep}", "").replace(str(folder), "the adapter folder")

    try:
        host.check_adapter(folder)
    except UnsafeCheckpointError as exc:
        raise UnsupportedUpload(clean(exc)) from exc
    except ConfigError as exc:
        raise UploadRejected(f"{CONFIG_NAME}: {clean(exc)}", param=exc.field or FILES_FIELD) from exc
    except AdapterError as exc:
        raise InvalidAdapter(clean(exc)) from exc
    except Exception as exc:  # anything else a hostile file provokes is still the file's fault
        logger.warning("adapter upload failed its test load", exc_info=True)
        raise InvalidAdapter(f"the adapter could not be loaded: {exc.__class__.__name__}: {clean(exc)}") from exc


@dataclass(frozen=True)
class CheckedAdapter:
    """An uploaded adapter that passed every check: its folder, config as uploaded, and method."""

    folder: Path
    config: dict[str, Any]
    method: str


def check_upload(form: ReceivedForm, work: Path, host: AdapterChecker, *, max_bytes: int) -> CheckedAdapter:
    """Steps 2 and 3: the folder, its config and weights header, then the test load (blocking)."""
    folder = adapter_folder(form, work, max_bytes=max_bytes)
    config = read_config(folder)
    init = base_rewriting_init(config)
    if init is not None:  # stored, it could never be served (and would become the name's latest version)
        raise UploadRejected(
            f"{CONFIG_NAME}: init_lora_weights={init!r} rewrote the base weights this adapter applies to; convert "
            "it to a plain LoRA (PEFT's path_initial_model_for_weight_conversion) and upload that",
            param="init_lora_weights",
        )
    check_safetensors_header(folder / WEIGHTS_NAME)
    check_against_base(host, folder)
    return CheckedAdapter(folder, config, str(config["peft_type"]).lower())


# ----------------------------------------------------------------------------------- 4. storing
def store_adapter_files(store: LocalArtifactStore, folder: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """Put the two adapter files in the store; their ``{name: {sha256, size}}`` and total size."""
    files: dict[str, dict[str, Any]] = {}
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        with (folder / name).open("rb") as f:
            ref = store.put(iter_file(f))
        files[name] = {"sha256": ref.sha256, "size": ref.size}
    return files, sum(f["size"] for f in files.values())
