"""`/datasets`: multipart JSONL uploads validated line by line, listing, get, delete.

Every refused upload is checked to leave nothing behind: no store object, no temp file, no row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.registry.models import Dataset, Job, JobEvent
from app.settings import Settings


def chat_line(question: str = "What is 2+2?", answer: str = "4") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def jsonl(*rows: Any) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


CHAT = jsonl(chat_line(), chat_line("Capital of France?", "Paris"), chat_line("Colour of the sky?", "Blue"))


def upload(client: TestClient, data: bytes = CHAT, filename: str = "train.jsonl", **fields: Any) -> Any:
    return client.post("/datasets", files={"file": (filename, data, "application/jsonl")},
                       data={k: str(v) for k, v in fields.items()})


def make_dataset(client: TestClient, data: bytes = CHAT) -> str:
    response = upload(client, data)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _count(client: TestClient, model: Any) -> int:
    with client.app.state.services.db.sessions() as session:  # type: ignore[attr-defined]
        return int(session.execute(select(func.count()).select_from(model)).scalar_one())


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def snapshot(client: TestClient) -> Callable[[], None]:
    """Capture what a request could store; the returned check asserts none of it changed."""
    settings: Settings = client.settings  # type: ignore[attr-defined]
    before = (_files(settings.store_dir), _count(client, Dataset), _count(client, Job), _count(client, JobEvent),
              list(client.queue.sent))  # type: ignore[attr-defined]

    def unchanged() -> None:
        after = (_files(settings.store_dir), _count(client, Dataset), _count(client, Job), _count(client, JobEvent),
                 list(client.queue.sent))  # type: ignore[attr-defined]
        assert after == before

    return unchanged


def assert_error(response: Any, status: int, code: str, param: str | None = None, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param", "type"}
    assert body["error"]["code"] == code
    assert body["error"]["param"] == param
    for word in words:
        assert word in body["error"]["message"]


# ------------------------------------------------------------------------------------------ upload


def test_upload_validates_stores_and_registers(client: TestClient) -> None:
    response = upload(client)
    assert response.status_code == 201, response.text
    ds = response.json()
    assert ds["id"].startswith("ds_") and ds["object"] == "dataset"
    assert ds["filename"] == "train.jsonl" and ds["form"] == "chat" and ds["size"] == len(CHAT)
    assert ds["sha256"] == hashlib.sha256(CHAT).hexdigest()
    stats = ds["summary"]["summary"]
    assert stats["examples"] == 3 and stats["total_tokens"] > 0 and stats["max_seq_len"] == 1024
    assert ds["summary"]["warnings"] == [] and ds["summary"]["warnings_total"] == 0
    store: Path = client.settings.store_dir  # type: ignore[attr-defined]
    assert (store / "objects" / ds["sha256"][:2] / ds["sha256"][2:]).read_bytes() == CHAT
    assert not list((store / "tmp").iterdir())
    assert client.get(f"/datasets/{ds['id']}").json() == ds
    assert client.get("/datasets").json() == {"data": [ds], "has_more": False, "next_cursor": None}


def test_upload_counts_tokens_against_max_seq_len_and_keeps_warnings(client: TestClient) -> None:
    long = chat_line("word " * 200, "fine")
    extra = {**chat_line(), "id": 7}  # unknown key: a warning, not an error
    ds = upload(client, jsonl(long, extra, chat_line()), max_seq_len=64).json()
    assert ds["summary"]["summary"]["max_seq_len"] == 64
    assert ds["summary"]["summary"]["over_length"] == 1 and ds["summary"]["summary"]["longest_line"] == 1
    warnings = {(w["line"], w["code"]) for w in ds["summary"]["warnings"]}
    assert warnings == {(1, "too_long"), (2, "unknown_key")}


def test_completion_and_text_forms(client: TestClient) -> None:
    completion = upload(client, jsonl({"prompt": "2+2=", "completion": "4"})).json()
    text = upload(client, jsonl({"text": "some text"}, {"text": "more"})).json()
    assert completion["form"] == "completion" and text["form"] == "text"
    assert text["summary"]["summary"]["examples"] == 2


def test_same_bytes_twice_are_two_datasets_over_one_object(client: TestClient) -> None:
    first, second = make_dataset(client), make_dataset(client)
    assert first != second
    objects = _files(client.settings.store_dir / "objects")  # type: ignore[attr-defined]
    assert len(objects) == 1


def test_errors_name_lines_and_fields_and_nothing_is_stored(client: TestClient) -> None:
    unchanged = snapshot(client)
    bad_role = {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    empty_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
    response = upload(client, jsonl(chat_line(), bad_role, chat_line(), b"{not json", empty_answer))
    assert_error(response, 422, "invalid_request", "file", "3 errors",
                 "line 2: messages[0].role: unknown role 'robot'", "line 4: invalid JSON",
                 "line 5: messages[1].content: must not be empty")
    unchanged()


def test_many_errors_are_summarised(client: TestClient) -> None:
    unchanged = snapshot(client)
    response = upload(client, jsonl(*[{"nope": i} for i in range(25)]))
    assert_error(response, 422, "invalid_request", "file", "25 errors", "line 1:", "line 10:", "(and 15 more)")
    assert "line 11:" not in response.json()["error"]["message"]
    unchanged()


@pytest.mark.parametrize(("data", "words"), [
    (b"", ("file: no examples",)),
    (b"\n\n", ("no examples",)),
    (jsonl(chat_line(), {"text": "plain"}), ("line 2", "a file must use one form")),
    (b"\xff\xfe\n", ("line 1: not valid UTF-8",)),
    (jsonl([1, 2]), ("line 1: must be a JSON object",)),
    (jsonl({"prompt": "only a prompt"}), ("line 1: completion: missing",)),
])
def test_invalid_files(client: TestClient, data: bytes, words: tuple[str, ...]) -> None:
    unchanged = snapshot(client)
    assert_error(upload(client, data), 422, "invalid_request", "file", *words)
    unchanged()


def test_upload_must_be_multipart(client: TestClient) -> None:
    unchanged = snapshot(client)
    assert_error(client.post("/datasets", json={"file": "x"}), 415, "unsupported_media_type", None, "multipart/form-data")
    assert_error(client.post("/datasets", content=CHAT, headers={"Content-Type": "application/jsonl"}),
                 415, "unsupported_media_type")
    assert_error(client.post("/datasets", content=CHAT), 415, "unsupported_media_type")
    assert_error(client.post("/datasets", content=b"x", headers={"Content-Type": "multipart/form-data"}),
                 400, "bad_request", None, "boundary")
    unchanged()


def test_malformed_multipart_body(client: TestClient) -> None:
    unchanged = snapshot(client)
    headers = {"Content-Type": "multipart/form-data; boundary=XYZ"}
    garbage = client.post("/datasets", content=b"--XYZ\r\nContent-Disposition: form-data; name=\"file\"; "
                          b"filename=\"a.jsonl\"\r\n\r\npartial data, never closed", headers=headers)
    assert_error(garbage, 400, "bad_request", None, "truncated")
    assert_error(client.post("/datasets", content=b"junk", headers=headers), 400, "bad_request", None, "malformed")
    closed_without_file = b"--XYZ\r\nContent-Disposition: form-data; name=\"max_seq_len\"\r\n\r\n64\r\n--XYZ--\r\n"
    assert_error(client.post("/datasets", content=closed_without_file, headers=headers), 422, "invalid_request",
                 "file", "no file")
    unchanged()


def multipart(*parts: tuple[str, str | None, bytes]) -> dict[str, Any]:
    """Request kwargs for a hand-built multipart body of ``(name, filename or None, content)`` parts."""
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--XYZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"
    return {"content": body + b"--XYZ--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=XYZ"}}


@pytest.mark.parametrize(("parts", "param", "word"), [
    ([("max_seq_len", None, b"64")], "file", "no file"),
    ([("file", None, CHAT)], "file", "must be a file upload"),
    ([("file", "a.jsonl", CHAT), ("file", "b.jsonl", CHAT)], "file", "exactly one file"),
    ([("file", "a.jsonl", CHAT), ("purpose", None, b"fine-tune")], "purpose", "unexpected form field"),
    ([("file", "a.jsonl", CHAT), ("other", "b.jsonl", CHAT)], "other", "unexpected form field"),
    ([("max_seq_len", "n.txt", b"64"), ("file", "a.jsonl", CHAT)], "max_seq_len", "unexpected form field"),
    ([("file", "a.jsonl", CHAT), ("max_seq_len", None, b"abc")], "max_seq_len", "integer"),
    ([("file", "a.jsonl", CHAT), ("max_seq_len", None, b"0")], "max_seq_len", "integer >= 1"),
    ([("file", "a.jsonl", CHAT), ("max_seq_len", None, b"1" * 100)], "max_seq_len", "too long"),
])
def test_bad_form_fields(client: TestClient, parts: list[tuple[str, str | None, bytes]], param: str,
                         word: str) -> None:
    unchanged = snapshot(client)
    assert_error(client.post("/datasets", **multipart(*parts)), 422, "invalid_request", param, word)
    unchanged()
    assert not list((client.settings.store_dir / "tmp").iterdir())  # type: ignore[attr-defined]


def test_form_field_max_seq_len_is_read_from_a_hand_built_body(client: TestClient) -> None:
    response = client.post("/datasets", **multipart(("max_seq_len", None, b"32"), ("file", "a.jsonl", CHAT)))
    assert response.status_code == 201, response.text
    assert response.json()["summary"]["summary"]["max_seq_len"] == 32


def test_filename_is_reduced_to_a_base_name(client: TestClient) -> None:
    ds = client.post("/datasets", **multipart(("file", "../..\\dir/evil\x07name.jsonl", CHAT))).json()
    assert ds["filename"] == "evilname.jsonl"
    assert client.post("/datasets", **multipart(("file", "", CHAT))).json()["filename"] == "dataset.jsonl"


def test_oversize_upload_is_refused_and_nothing_kept(api_settings: Settings, base_host: Any) -> None:
    from tests.app.conftest import RecordingQueue

    settings = api_settings.model_copy(update={"max_upload_bytes": 1024})
    with TestClient(create_app(settings, queue=RecordingQueue(), base_model=base_host)) as c:
        c.settings = settings  # type: ignore[attr-defined]
        c.queue = RecordingQueue()  # type: ignore[attr-defined]
        unchanged = snapshot(c)
        lines = jsonl(*[chat_line(f"question {i}", f"answer {i}") for i in range(40)])
        assert 1024 < len(lines) < (1 << 20)  # passes the Content-Length check, refused while streaming
        assert_error(upload(c, lines), 413, "payload_too_large", "file", "1024 bytes")
        huge = b"x" * (2 << 20)  # refused from Content-Length before reading the body
        assert_error(upload(c, huge), 413, "payload_too_large", "file")
        unchanged()
        assert not list((settings.store_dir / "tmp").iterdir())
        assert upload(c, jsonl(chat_line())).status_code == 201  # under the limit still works


# ------------------------------------------------------------------------------------------ list, get, delete


def test_list_pages_newest_first(client: TestClient) -> None:
    ids = [make_dataset(client, jsonl(chat_line(f"q{i}", f"a{i}"))) for i in range(5)]
    first = client.get("/datasets", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True and first["next_cursor"] == ids[3]
    second = client.get("/datasets", params={"limit": 2, "after": first["next_cursor"]}).json()
    third = client.get("/datasets", params={"limit": 2, "after": second["next_cursor"]}).json()
    assert [d["id"] for d in second["data"] + third["data"]] == ids[::-1][2:]
    assert third["has_more"] is False and third["next_cursor"] is None
    assert len(client.get("/datasets").json()["data"]) == 5


@pytest.mark.parametrize(("params", "param"), [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "many"}, "limit"),
    ({"after": "ds_nope"}, "after"),
])
def test_list_rejects_bad_parameters(client: TestClient, params: dict[str, Any], param: str) -> None:
    assert_error(client.get("/datasets", params=params), 422, "invalid_request", param)


def test_unknown_dataset_is_404(client: TestClient) -> None:
    assert_error(client.get("/datasets/ds_nope"), 404, "not_found", "dataset_id", "ds_nope")
    assert_error(client.delete("/datasets/ds_nope"), 404, "not_found", "dataset_id")


def test_delete_hides_the_dataset(client: TestClient) -> None:
    keep, gone = make_dataset(client), make_dataset(client)
    response = client.delete(f"/datasets/{gone}")
    assert response.status_code == 200
    assert response.json()["id"] == gone and response.json()["deleted"] is True
    assert_error(client.get(f"/datasets/{gone}"), 404, "not_found", "dataset_id")
    assert [d["id"] for d in client.get("/datasets").json()["data"]] == [keep]
    assert_error(client.delete(f"/datasets/{gone}"), 404, "not_found", "dataset_id")


def test_delete_refused_while_a_queued_job_uses_it(client: TestClient) -> None:
    ds = make_dataset(client)
    job = client.post("/jobs", json={"type": "train", "adapter": {"name": "bot"}, "dataset_id": ds})
    assert job.status_code == 201, job.text
    assert_error(client.delete(f"/datasets/{ds}"), 409, "conflict", None, job.json()["id"])
    assert client.get(f"/datasets/{ds}").status_code == 200
    assert client.post(f"/jobs/{job.json()['id']}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"/datasets/{ds}").status_code == 200


def test_openapi_documents_every_dataset_field(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    upload_op = spec["paths"]["/datasets"]["post"]
    assert upload_op["summary"] and "multipart/form-data" in upload_op["requestBody"]["content"]
    for name in ("DatasetOut", "DatasetList", "DeletedDatasetOut"):
        for field, schema in spec["components"]["schemas"][name]["properties"].items():
            assert schema.get("description"), f"{name}.{field} has no description"


@pytest.mark.parametrize("value", ["0", "-5", "abc", "\u00b2", "\u0661\u0662"])  # superscript two, Arabic-Indic 12
def test_max_seq_len_must_be_a_plain_positive_integer(client: TestClient, value: str) -> None:
    response = upload(client, max_seq_len=value)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "max_seq_len"
    assert value in response.json()["error"]["message"]


@pytest.mark.parametrize("line", [b'{"text": "a", "\\ud800": 1}', b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"],
                         ids=["lone-surrogate-key", "nested-too-deeply"])
def test_lines_json_cannot_hold_are_refused_and_the_listing_still_works(client: TestClient, line: bytes) -> None:
    response = upload(client, b'{"text": "fine"}\n' + line + b"\n")
    assert response.status_code == 422, response.text
    assert "line 2" in response.text
    listing = client.get("/datasets")
    assert listing.status_code == 200 and listing.json()["data"] == []


def test_a_form_field_given_twice_is_refused(client: TestClient) -> None:
    response = client.post("/datasets", files=[("file", ("train.jsonl", CHAT, "application/jsonl")),
                                               ("max_seq_len", (None, "8")), ("max_seq_len", (None, "4096"))])
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "max_seq_len" and "twice" in response.json()["error"]["message"]
    assert client.get("/datasets").json()["data"] == []
