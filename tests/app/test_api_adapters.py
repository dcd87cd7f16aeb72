"""`/adapters`: validated uploads, browsing, downloads loadable by HF PEFT, aliases, soft deletes.

Every refused upload is checked for its status, error code and param, and for leaving nothing behind:
no stored object, no adapter or version row, no work folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save
from sqlalchemy import create_engine, func, select

from app.main import create_app
from app.registry.adapters import VersionSpec, create_version
from app.registry.models import Adapter, AdapterVersion
from tests.app.conftest import RecordingQueue
from tests.conftest import load_model

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------------------- helpers
def make_adapter(base_dir: Path, out: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A LoRA adapter saved by our engine for the model in ``base_dir``; never the identity."""
    from adapters_core import AdapterModel, LoraConfig

    torch.manual_seed(seed)
    am = AdapterModel(load_model(base_dir))
    kw: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    am.add_adapter("a", LoraConfig(**(kw | overrides)))
    return am.save_adapter(out, "a")


@pytest.fixture(scope="module")
def adapter_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(demo_model_dir, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture(scope="module")
def wide_adapter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter for a tiny Llama with hidden size 64: every shape differs from the demo model's."""
    from adapters_core.tiny_models import TinyLlamaSpec, build_tiny_llama

    base = build_tiny_llama(tmp_path_factory.mktemp("wide-llama"), TinyLlamaSpec(hidden_size=64))
    return make_adapter(base, tmp_path_factory.mktemp("wide-adapter") / "a")


def files_of(folder: Path, *names: str) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in (names or (CONFIG, WEIGHTS))}


def upload(client: TestClient, name: str | None, files: dict[str, bytes]) -> Any:
    """A multipart POST (even with no file) of ``name`` and ``files``."""
    parts: list[tuple[str, tuple[str | None, Any]]] = [("name", (None, name))] if name is not None else []
    parts += [("files", (n, b)) for n, b in files.items()]
    return client.post("/adapters", files=parts)


def tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def stored_objects(client: TestClient) -> list[str]:
    root = client.settings.store_dir / "objects"  # type: ignore[attr-defined]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def registry_counts(client: TestClient) -> tuple[int, int]:
    """(adapters, adapter versions) rows in the app's database."""
    engine = create_engine(client.settings.resolved_database_url)  # type: ignore[attr-defined]
    try:
        with engine.connect() as conn:
            adapters = conn.execute(select(func.count()).select_from(Adapter)).scalar_one()
            versions = conn.execute(select(func.count()).select_from(AdapterVersion)).scalar_one()
    finally:
        engine.dispose()
    return adapters, versions


def work_folders(client: TestClient) -> list[Path]:
    uploads = client.settings.data_dir / "uploads"  # type: ignore[attr-defined]
    return list(uploads.iterdir()) if uploads.exists() else []


def assert_error(response: Any, status: int, code: str, param: str | None, needle: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert needle.lower() in error["message"].lower(), error["message"]


def logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 7, 42, 99, 5, 3, 250, 17], [4, 4, 8, 15, 16, 23, 42, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------- happy paths
def test_upload_browse_download_and_the_download_loads_in_peft(
    client: TestClient, adapter_dir: Path, demo_model_dir: Path, base_host: Any, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft")
    from adapters_core import AdapterModel

    sent = files_of(adapter_dir, CONFIG, WEIGHTS, "README.md")  # README (as save_pretrained writes it) is not kept
    first = upload(client, "support-bot", sent)
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["name"], body["version"], body["ref"], body["method"]) == ("support-bot", 1, "support-bot@1", "lora")
    assert body["files"] == {n: {"sha256": hashlib.sha256(sent[n]).hexdigest(), "size": len(sent[n])} for n in (CONFIG, WEIGHTS)}
    assert body["size"] == len(sent[CONFIG]) + len(sent[WEIGHTS])
    assert body["config"] == json.loads(sent[CONFIG])
    assert body["base_model"] == base_host.name
    assert body["lineage"] == {"job_id": None, "dataset_id": None, "parents": []}
    assert (body["metrics"], body["aliases"]) == ({}, [])
    assert upload(client, "support-bot", sent).json()["version"] == 2

    listed = client.get("/adapters").json()
    assert (listed["has_more"], listed["next_cursor"]) == (False, None)
    [item] = listed["data"]
    assert {k: item[k] for k in ("name", "object", "method", "latest_version", "version_count", "aliases")} == {
        "name": "support-bot", "object": "adapter", "method": "lora", "latest_version": 2, "version_count": 2,
        "aliases": {},
    }
    detail = client.get("/adapters/support-bot").json()
    assert detail["latest"]["ref"] == "support-bot@2" and detail["version_count"] == 2
    versions = client.get("/adapters/support-bot/versions").json()
    assert [v["version"] for v in versions["data"]] == [2, 1]
    one = client.get("/adapters/support-bot/versions/1").json()
    assert one == {**body, "created_at": one["created_at"]}

    download = client.get("/adapters/support-bot/versions/1/download")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/gzip"
    assert download.headers["content-disposition"] == 'attachment; filename="support-bot-v1.tar.gz"'
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tf:
        assert sorted(tf.getnames()) == ["support-bot-v1", f"support-bot-v1/{CONFIG}", f"support-bot-v1/{WEIGHTS}"]
        tf.extractall(tmp_path / "tgz", filter="data")
    folder = tmp_path / "tgz" / "support-bot-v1"
    assert files_of(folder) == files_of(adapter_dir)

    as_zip = client.get("/adapters/support-bot/versions/1/download", params={"format": "zip"})
    assert as_zip.headers["content-disposition"] == 'attachment; filename="support-bot-v1.zip"'
    with zipfile.ZipFile(io.BytesIO(as_zip.content)) as zf:
        assert zf.testzip() is None
        assert {n: zf.read(f"support-bot-v1/{n}") for n in (CONFIG, WEIGHTS)} == files_of(adapter_dir)

    reference = logits(peft.PeftModel.from_pretrained(load_model(demo_model_dir), folder).eval())
    engine = AdapterModel(load_model(demo_model_dir))
    engine.load_adapter(folder, "downloaded")
    ours = logits(engine)
    base = logits(load_model(demo_model_dir))
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)
    assert (reference - base).abs().max() > 1e-3  # the adapter changes the output: the comparison can fail


@pytest.mark.parametrize(
    ("filename", "maker", "prefix"),
    [("a.tar.gz", tar_gz, ""), ("a.tgz", tar_gz, "my-adapter/"), ("a.zip", zip_of, ""), ("a.zip", zip_of, "x/")],
)
def test_archive_uploads(client: TestClient, adapter_dir: Path, filename: str, maker: Any, prefix: str) -> None:
    members = {f"{prefix}{n}": b for n, b in files_of(adapter_dir, CONFIG, WEIGHTS, "README.md").items()}
    response = upload(client, "packed", {filename: maker(members)})
    assert response.status_code == 201, response.text
    assert response.json()["files"][WEIGHTS]["sha256"] == hashlib.sha256(files_of(adapter_dir)[WEIGHTS]).hexdigest()
    assert sorted(response.json()["files"]) == [CONFIG, WEIGHTS]
    assert work_folders(client) == []


def test_version_numbers_are_consecutive_and_never_reused(client: TestClient, adapter_dir: Path) -> None:
    sent = files_of(adapter_dir)
    assert [upload(client, "bot", sent).json()["version"] for _ in range(3)] == [1, 2, 3]
    assert len(stored_objects(client)) == 2  # the same bytes are stored once
    deleted = client.delete("/adapters/bot/versions/3")
    assert deleted.status_code == 200 and deleted.json() == {"object": "adapter.version", "id": "bot@3", "deleted": True}
    assert_error(client.get("/adapters/bot/versions/3"), 404, "not_found", "version")
    assert upload(client, "bot", sent).json()["version"] == 4
    assert client.delete("/adapters/bot/versions/2").status_code == 200
    assert [v["version"] for v in client.get("/adapters/bot/versions").json()["data"]] == [4, 1]
    summary = client.get("/adapters/bot").json()
    assert (summary["latest_version"], summary["version_count"]) == (4, 2)

    client.put("/adapters/bot/aliases/prod", json={"version": 4})
    gone = client.delete("/adapters/bot")
    assert gone.status_code == 200 and gone.json() == {"object": "adapter", "id": "bot", "deleted": True}
    assert_error(client.get("/adapters/bot"), 404, "not_found", "name")
    assert_error(client.get("/adapters/bot/versions/1"), 404, "not_found", "name")
    assert client.get("/adapters").json()["data"] == []
    again = upload(client, "bot", sent).json()
    assert again["version"] == 5 and again["aliases"] == []
    assert client.get("/adapters/bot").json()["aliases"] == {}
    assert [v["version"] for v in client.get("/adapters/bot/versions").json()["data"]] == [5]


def test_aliases_move_and_disappear_with_their_version(client: TestClient, adapter_dir: Path) -> None:
    sent = files_of(adapter_dir)
    for _ in range(2):
        upload(client, "bot", sent)
    made = client.put("/adapters/bot/aliases/prod", json={"version": 1})
    assert made.status_code == 201, made.text  # created
    assert {k: made.json()[k] for k in ("name", "alias", "version", "ref")} == {
        "name": "bot", "alias": "prod", "version": 1, "ref": "bot@prod"}
    moved = client.put("/adapters/bot/aliases/prod", json={"version": 2})
    assert moved.status_code == 200 and moved.json()["version"] == 2
    assert_error(client.put("/adapters/bot/aliases/Latest", json={"version": 1}), 422, "invalid_request", "alias",
                 "reserved")  # `bot` alone is the latest version
    client.put("/adapters/bot/aliases/canary", json={"version": 1})
    assert client.get("/adapters/bot").json()["aliases"] == {"canary": 1, "prod": 2}
    assert client.get("/adapters/bot/versions/2").json()["aliases"] == ["prod"]
    assert client.get("/adapters").json()["data"][0]["aliases"] == {"canary": 1, "prod": 2}

    assert client.delete("/adapters/bot/aliases/canary").json() == {"object": "adapter.alias", "id": "bot@canary",
                                                                   "deleted": True}
    assert_error(client.delete("/adapters/bot/aliases/canary"), 404, "not_found", "alias")
    client.delete("/adapters/bot/versions/2")
    assert client.get("/adapters/bot").json()["aliases"] == {}

    assert_error(client.put("/adapters/bot/aliases/prod", json={"version": 2}), 404, "not_found", "version")
    assert_error(client.put("/adapters/bot/aliases/prod", json={"version": 9}), 404, "not_found", "version")
    assert_error(client.put("/adapters/nobody/aliases/prod", json={"version": 1}), 404, "not_found", "name")
    assert_error(client.put("/adapters/bot/aliases/9lives", json={"version": 1}), 422, "invalid_request", "alias")
    assert_error(client.put("/adapters/bot/aliases/bad alias", json={"version": 1}), 422, "invalid_request", "alias")
    assert_error(client.put("/adapters/bot/aliases/prod", json={"version": 1, "extra": 1}), 422, "invalid_request",
                 "extra", "unknown field")
    assert_error(client.put("/adapters/bot/aliases/prod", json={"version": "one"}), 422, "invalid_request", "version")
    for wrong_type in ("1", True, 1.0):  # never converted to version 1
        assert_error(client.put("/adapters/bot/aliases/prod", json={"version": wrong_type}), 422, "invalid_request",
                     "version")
    assert client.get("/adapters/bot").json()["aliases"] == {}


def test_list_filters_and_cursor_pagination(client: TestClient, adapter_dir: Path) -> None:
    sent = files_of(adapter_dir)
    names = ["alpha", "Beta-one", "beta_two", "delta", "gamma"]
    for name in names:
        assert upload(client, name, sent).status_code == 201

    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"after": cursor} if cursor else {})
        page = client.get("/adapters", params=params).json()
        seen += [a["name"] for a in page["data"]]
        pages += 1
        assert page["has_more"] == (page["next_cursor"] is not None)
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert pages == 3 and sorted(seen) == sorted(names) and len(set(seen)) == len(names)

    assert sorted(a["name"] for a in client.get("/adapters", params={"q": "BETA"}).json()["data"]) == ["Beta-one", "beta_two"]
    assert [a["name"] for a in client.get("/adapters", params={"q": "_"}).json()["data"]] == ["beta_two"]
    assert len(client.get("/adapters", params={"method": "LoRA"}).json()["data"]) == 5
    assert client.get("/adapters", params={"method": "ia3"}).json()["data"] == []
    assert_error(client.get("/adapters", params={"after": "not-a-cursor"}), 422, "invalid_request", "after")
    assert_error(client.get("/adapters", params={"limit": 0}), 422, "invalid_request", "limit")
    assert_error(client.get("/adapters", params={"limit": 101}), 422, "invalid_request", "limit")

    for _ in range(2):
        upload(client, "alpha", sent)
    first = client.get("/adapters/alpha/versions", params={"limit": 2}).json()
    assert [v["version"] for v in first["data"]] == [3, 2] and first["has_more"]
    rest = client.get("/adapters/alpha/versions", params={"limit": 2, "after": first["next_cursor"]}).json()
    assert [v["version"] for v in rest["data"]] == [1] and not rest["has_more"] and rest["next_cursor"] is None


def test_unknown_names_versions_and_bad_path_segments(client: TestClient, adapter_dir: Path) -> None:
    upload(client, "bot", files_of(adapter_dir))
    assert_error(client.get("/adapters/nobody"), 404, "not_found", "name")
    assert_error(client.get("/adapters/nobody/versions"), 404, "not_found", "name")
    assert_error(client.get("/adapters/bot/versions/7"), 404, "not_found", "version")
    assert_error(client.get("/adapters/bot/versions/7/download"), 404, "not_found", "version")
    assert_error(client.delete("/adapters/bot/versions/7"), 404, "not_found", "version")
    assert_error(client.delete("/adapters/nobody"), 404, "not_found", "name")
    assert_error(client.get("/adapters/bot/versions/latest"), 422, "invalid_request", "version")
    assert_error(client.delete("/adapters/bot/versions/1.5"), 422, "invalid_request", "version")
    assert_error(client.get("/adapters/bot/versions/1/download", params={"format": "rar"}), 422, "invalid_request",
                 "format")


def test_a_version_of_another_method_needs_another_name(client: TestClient, adapter_dir: Path) -> None:
    engine = create_engine(client.settings.resolved_database_url)  # type: ignore[attr-defined]
    with engine.begin() as conn:
        from sqlalchemy.orm import Session

        with Session(conn) as session:
            create_version(session, "vectors", VersionSpec(method="ia3", config={}, files={}, size=0))
            session.commit()
    engine.dispose()
    before = stored_objects(client)
    assert_error(upload(client, "vectors", files_of(adapter_dir)), 409, "conflict", "name", "ia3")
    assert stored_objects(client) == before and registry_counts(client) == (1, 1)
    client.delete("/adapters/vectors")
    assert upload(client, "vectors", files_of(adapter_dir)).json()["method"] == "lora"


# ------------------------------------------------------------------------------------- bad uploads
def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors, metadata={"format": "pt"})


def _with_config(folder: Path, **changes: Any) -> dict[str, bytes]:
    config = json.loads((folder / CONFIG).read_text()) | changes
    return {CONFIG: json.dumps(config).encode(), WEIGHTS: (folder / WEIGHTS).read_bytes()}


def _nan_weights(folder: Path) -> dict[str, bytes]:
    tensors = _tensors(folder)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    return {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: _safetensors_bytes(tensors)}


def _weights_as(folder: Path, dtype: torch.dtype) -> dict[str, bytes]:
    tensors = {k: (v * 100).to(dtype) for k, v in _tensors(folder).items()}
    return {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: _safetensors_bytes(tensors)}


def _config_text(folder: Path, key: str, raw_value: str) -> dict[str, bytes]:
    """The folder's files with ``key`` set to ``raw_value`` written as is into the config's JSON text."""
    text = (folder / CONFIG).read_text().rstrip().removesuffix("}") + f', "{key}": {raw_value}}}'
    return {CONFIG: text.encode(), WEIGHTS: (folder / WEIGHTS).read_bytes()}


def _header_text(folder: Path, raw: bytes) -> dict[str, bytes]:
    return {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: struct.pack("<Q", len(raw)) + raw}


def _header_beyond_file(folder: Path) -> dict[str, bytes]:
    return {CONFIG: (folder / CONFIG).read_bytes(), WEIGHTS: struct.pack("<Q", 10**9) + b'{"a": 1}'}


def _bad_offsets() -> bytes:
    header = json.dumps({"x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * 8


BAD_UPLOADS: dict[str, tuple[Any, int, str, str | None, str]] = {
    # case: (files from the good adapter folder and the wide one, status, code, param, in the message)
    "pickle weights": (lambda a, w: {CONFIG: files_of(a)[CONFIG], "adapter_model.bin": b"\x80\x04junk"},
                       415, "unsupported_media_type", "files", "only safetensors"),
    "pickle .pt": (lambda a, w: files_of(a) | {"optimizer.pt": b"\x80\x04"}, 415, "unsupported_media_type", "files",
                   "pickle"),
    "pickle in archive": (lambda a, w: {"a.tar.gz": tar_gz({CONFIG: files_of(a)[CONFIG], "adapter_model.bin": b"x"})},
                          415, "unsupported_media_type", "files", "only safetensors"),
    "shape mismatch": (lambda a, w: files_of(w), 422, "invalid_adapter", "files", "shape"),
    "target module missing": (lambda a, w: _with_config(a, target_modules=["c_attn"]), 422, "invalid_adapter", "files",
                              "c_attn"),
    "NaN weights": (lambda a, w: _nan_weights(a), 422, "invalid_adapter", "files", "nan"),
    "garbage safetensors": (lambda a, w: {CONFIG: files_of(a)[CONFIG], WEIGHTS: b"\x07" * 300}, 422, "invalid_adapter",
                            "files", "not a valid safetensors"),
    "header beyond file": (lambda a, w: _header_beyond_file(a), 422, "invalid_adapter", "files", "header length"),
    "safetensors header not JSON": (lambda a, w: {CONFIG: files_of(a)[CONFIG], WEIGHTS: struct.pack("<Q", 4) + b"{{{{"},
                                    422, "invalid_adapter", "files", "header is not JSON"),
    "safetensors offsets wrong": (lambda a, w: {CONFIG: files_of(a)[CONFIG], WEIGHTS: _bad_offsets()}, 422,
                                  "invalid_adapter", "files", "do not hold F32 [2, 2]"),
    "integer weights": (lambda a, w: _weights_as(a, torch.int32), 422, "invalid_adapter", "files", "floating point"),
    "bool weights": (lambda a, w: _weights_as(a, torch.bool), 422, "invalid_adapter", "files", "floating point"),
    "config NaN alpha": (lambda a, w: _config_text(a, "lora_alpha", "NaN"), 422, "invalid_request", "lora_alpha",
                         "NaN"),
    "config Infinity in an unknown key": (lambda a, w: _config_text(a, "future", '{"x": [-Infinity]}'), 422,
                                          "invalid_request", "future", "Infinity"),
    "config number past float range": (lambda a, w: _config_text(a, "future", "[1e999]"), 422, "invalid_request",
                                       "future", "1e999"),
    "config nested too deeply": (lambda a, w: _config_text(a, "deep", "[" * 100_000 + "]" * 100_000), 422,
                                 "invalid_request", "files", "nested too deeply"),
    "config integer too long": (lambda a, w: _config_text(a, "r", "1" * 5000), 422, "invalid_request", "files",
                                "not valid JSON"),
    "safetensors header nested too deeply": (lambda a, w: _header_text(a, b"[" * 100_000 + b"]" * 100_000), 422,
                                             "invalid_adapter", "files", "nested too deeply"),
    "safetensors header NaN": (lambda a, w: _header_text(a, b'{"__metadata__": NaN}'), 422, "invalid_adapter",
                               "files", "NaN"),
    "malformed config": (lambda a, w: {CONFIG: b'{"peft_type": "LORA",', WEIGHTS: files_of(a)[WEIGHTS]}, 422,
                         "invalid_request", "files", "not valid JSON"),
    "unknown peft_type": (lambda a, w: _with_config(a, peft_type="SUPERLORA"), 422, "invalid_request", "peft_type",
                          "SUPERLORA"),
    "bad config field": (lambda a, w: _with_config(a, r=-3), 422, "invalid_request", "r", ""),
    "unexpected file": (lambda a, w: files_of(a) | {"notes.txt": b"hi"}, 422, "invalid_request", "files", "notes.txt"),
    "missing weights": (lambda a, w: {CONFIG: files_of(a)[CONFIG]}, 422, "invalid_request", "files", WEIGHTS),
    "no files": (lambda a, w: {}, 422, "invalid_request", "files", "no files"),
    "archive and files": (lambda a, w: files_of(a) | {"a.zip": zip_of(files_of(a))}, 422, "invalid_request", "files",
                          "one archive"),
    "tar traversal": (lambda a, w: {"a.tar.gz": tar_gz({"../../evil.json": b"x"} | files_of(a))}, 422,
                      "invalid_request", "files", "outside"),
    "zip traversal": (lambda a, w: {"a.zip": zip_of({"../../../etc/adapter_config.json": files_of(a)[CONFIG]})}, 422,
                      "invalid_request", "files", "outside"),
    "not an archive": (lambda a, w: {"a.tgz": b"garbage"}, 422, "invalid_request", "files", "not a"),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_refused_and_leave_nothing_behind(
    client: TestClient, adapter_dir: Path, wide_adapter_dir: Path, case: str
) -> None:
    build, status, code, param, needle = BAD_UPLOADS[case]
    response = upload(client, "bot", build(adapter_dir, wide_adapter_dir))
    assert_error(response, status, code, param, needle)
    assert str(client.settings.data_dir) not in response.json()["error"]["message"]  # type: ignore[attr-defined]
    assert stored_objects(client) == []
    assert registry_counts(client) == (0, 0)
    assert work_folders(client) == []


def test_a_refused_upload_leaves_the_existing_versions_alone(
    client: TestClient, adapter_dir: Path, wide_adapter_dir: Path
) -> None:
    upload(client, "bot", files_of(adapter_dir))
    before = stored_objects(client)
    assert upload(client, "bot", files_of(wide_adapter_dir)).status_code == 422
    assert stored_objects(client) == before and registry_counts(client) == (1, 1)
    assert upload(client, "bot", files_of(adapter_dir)).json()["version"] == 2


@pytest.mark.parametrize(
    ("name", "param", "needle"),
    [(None, "name", "required"), ("", "name", "required"), ("../evil", "name", "invalid adapter name"),
     ("has space", "name", "invalid adapter name"), ("-dash", "name", "invalid adapter name"),
     ("base", "name", "reserved")],  # the OpenAI routes' `model="base"` is the base model
)
def test_upload_needs_a_valid_name(client: TestClient, adapter_dir: Path, name: str | None, param: str,
                                   needle: str) -> None:
    assert_error(upload(client, name, files_of(adapter_dir)), 422, "invalid_request", param, needle)
    assert stored_objects(client) == [] and registry_counts(client) == (0, 0) and work_folders(client) == []


def test_upload_refuses_the_base_models_own_name(client: TestClient, adapter_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain base model name (``gpt2``, the demo model's) is what `model=` of the OpenAI routes gives the base."""
    from app.base_model import BaseModelHost

    monkeypatch.setattr(BaseModelHost, "name", property(lambda self: "plain-base"))
    assert_error(upload(client, "plain-base", files_of(adapter_dir)), 422, "invalid_request", "name", "base model")
    assert stored_objects(client) == [] and registry_counts(client) == (0, 0) and work_folders(client) == []


def test_upload_naming_a_module_to_save_the_base_model_lacks_names_the_field(client: TestClient, adapter_dir: Path,
                                                                              tmp_path: Path) -> None:
    edited = tmp_path / "edited"
    edited.mkdir()
    config = json.loads((adapter_dir / CONFIG).read_text()) | {"modules_to_save": ["missing_head"]}
    (edited / CONFIG).write_text(json.dumps(config))
    (edited / WEIGHTS).write_bytes((adapter_dir / WEIGHTS).read_bytes())
    assert_error(upload(client, "bot", files_of(edited)), 422, "invalid_request", "modules_to_save", "missing_head")
    assert stored_objects(client) == [] and registry_counts(client) == (0, 0) and work_folders(client) == []


def test_upload_must_be_multipart_with_the_documented_fields(client: TestClient, adapter_dir: Path) -> None:
    assert_error(client.post("/adapters", json={"name": "bot"}), 415, "unsupported_media_type", None, "multipart")
    assert_error(client.post("/adapters", content=b"x"), 415, "unsupported_media_type", None, "multipart")
    assert_error(client.post("/adapters", content=b"x", headers={"content-type": "multipart/form-data"}), 400,
                 "bad_request", None, "boundary")
    wrong_field = client.post("/adapters", data={"name": "bot"}, files=[("file", (CONFIG, b"{}"))])
    assert_error(wrong_field, 422, "invalid_request", "file", "files")
    extra_field = client.post("/adapters", data={"name": "bot", "method": "lora"},
                              files=[("files", (n, b)) for n, b in files_of(adapter_dir).items()])
    assert_error(extra_field, 422, "invalid_request", "method", "unexpected form field")
    assert stored_objects(client) == [] and registry_counts(client) == (0, 0) and work_folders(client) == []


def test_oversize_uploads_are_refused_early(api_settings: Any, base_host: Any, adapter_dir: Path) -> None:
    settings = api_settings.model_copy(update={"max_upload_bytes": 4096})
    with TestClient(create_app(settings, queue=RecordingQueue(), base_model=base_host)) as small:
        small.settings = settings  # type: ignore[attr-defined]
        sent = files_of(adapter_dir)
        assert len(sent[WEIGHTS]) > 4096
        assert_error(upload(small, "bot", sent), 413, "payload_too_large", None, "4096")

        # without a Content-Length the body is counted as it arrives (and reading stops at the limit)
        boundary = "xyz"
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbot\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{WEIGHTS}"\r\n\r\n').encode()

        def chunked() -> Iterator[bytes]:
            yield head
            for _ in range(100):
                yield b"\0" * 1024

        response = small.post("/adapters", content=chunked(),
                              headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert_error(response, 413, "payload_too_large", None, "4096")
        assert stored_objects(small) == [] and registry_counts(small) == (0, 0) and work_folders(small) == []


def test_a_download_whose_files_left_the_store_says_so(client: TestClient, adapter_dir: Path) -> None:
    sha = upload(client, "bot", files_of(adapter_dir)).json()["files"][WEIGHTS]["sha256"]
    (client.settings.store_dir / "objects" / sha[:2] / sha[2:]).unlink()  # type: ignore[attr-defined]
    assert_error(client.get("/adapters/bot/versions/1/download"), 500, "internal_error", None, WEIGHTS)
    assert_error(client.get("/adapters/bot/versions", params={"after": "bm90LWEtdmVyc2lvbg"}), 422, "invalid_request",
                 "after", "cursor")


def test_every_adapter_route_is_documented(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operations = [(path, method, op) for path, ops in spec["paths"].items() if path.startswith("/adapters")
                  for method, op in ops.items()]
    assert len(operations) == 10
    for path, method, op in operations:
        assert op.get("summary") and op.get("description"), (method, path)
    upload_body = spec["paths"]["/adapters"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload_body["required"] == ["name", "files"]


def test_numbers_beyond_sql_integers_are_422_not_500(client: TestClient, adapter_dir: Path) -> None:
    upload(client, "bot", files_of(adapter_dir))
    huge = 2**40
    for response in (
        client.get(f"/adapters/bot/versions/{huge}"),
        client.put("/adapters/bot/aliases/prod", json={"version": huge}),
        client.delete(f"/adapters/bot/versions/{huge}"),
        client.get("/jobs/job_x/events", params={"after": huge}),
        client.get("/jobs/job_x/events", headers={"Accept": "text/event-stream", "Last-Event-ID": str(huge)}),
    ):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] in ("version", "after", "Last-Event-ID")


def test_a_download_holds_every_file_the_version_lists(client: TestClient, adapter_dir: Path) -> None:
    """A trained version lists the README.md the trainer wrote (counted in its size); the download left it out."""
    from sqlalchemy.orm import Session

    from app.storage import LocalArtifactStore

    store = LocalArtifactStore(client.settings.store_dir)  # type: ignore[attr-defined]
    files = {}
    for filename in ("adapter_config.json", WEIGHTS):
        ref = store.put_bytes((adapter_dir / filename).read_bytes())
        files[filename] = {"sha256": ref.sha256, "size": ref.size}
    readme = store.put_bytes(b"# trained by AdapterForge\n")
    files["README.md"] = {"sha256": readme.sha256, "size": readme.size}
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    engine = create_engine(client.settings.resolved_database_url)  # type: ignore[attr-defined]
    with engine.begin() as conn, Session(conn) as session:
        create_version(session, "trained", VersionSpec(method="lora", config=config, files=files,
                                                       size=sum(f["size"] for f in files.values())))
        session.commit()
    engine.dispose()
    listed = client.get("/adapters/trained").json()
    response = client.get("/adapters/trained/versions/1/download")
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        assert tar.extractfile("trained-v1/README.md").read() == b"# trained by AdapterForge\n"  # type: ignore[union-attr]
    assert names == ["trained-v1/README.md", "trained-v1/adapter_config.json", f"trained-v1/{WEIGHTS}"], names
    assert "README.md" in json.dumps(listed)
