"""Training JSONL reading and validation: forms, every error kind, token summary, entry points."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters_core.errors import AdapterError
from adapters_core.training.data import (
    FALLBACK_CHAT_TEMPLATE,
    DataError,
    DataIssue,
    ValidationReport,
    read_examples,
    token_summary,
    validate_file,
    validate_or_raise,
)
from adapters_core.training.examples import Example, Message

CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four.", "weight": 0},
        {"role": "user", "content": "And the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
}
COMPLETION = {"prompt": "What is two plus two?", "completion": " Four."}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows (dicts are JSON-encoded, strings written verbatim) one per line."""
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def by_line(report: ValidationReport) -> dict[int, list[DataIssue]]:
    out: dict[int, list[DataIssue]] = {}
    for issue in report.errors:
        out.setdefault(issue.line, []).append(issue)
    return out


# ----------------------------------------------------------------------------------------- forms


def test_chat_form(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", [CHAT, "", CHAT])
    examples, report = read_examples(path)
    assert report.ok and report.form == "chat" and report.summary.examples == 2
    assert [e.line for e in examples] == [1, 3]  # blank line skipped but counted
    assert examples[0].messages[0] == Message("system", "You are terse.", 1)
    assert examples[0].messages[2] == Message("assistant", "Four.", 0)
    assert examples[0].messages[4].weight == 1


def test_completion_form(tmp_path: Path) -> None:
    examples, report = read_examples(str(write_jsonl(tmp_path / "c.jsonl", [COMPLETION])))
    assert report.ok and report.form == "completion"
    assert examples == [Example(form="completion", line=1, prompt=COMPLETION["prompt"], completion=" Four.")]


def test_text_form(tmp_path: Path) -> None:
    examples, report = read_examples(write_jsonl(tmp_path / "t.jsonl", [TEXT, "   ", TEXT]))
    assert report.ok and report.form == "text"
    assert [(e.form, e.line, e.text) for e in examples] == [
        ("text", 1, TEXT["text"]),
        ("text", 3, TEXT["text"]),
    ]


def test_mixed_forms_refused_with_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", ["", CHAT, CHAT, COMPLETION, CHAT])
    examples, report = read_examples(path)
    assert report.form == "chat"
    [err] = report.errors
    assert (err.line, err.code) == (4, "mixed_forms")
    assert "completion" in err.message and "chat" in err.message and "line 2" in err.message
    assert [e.line for e in examples] == [2, 3, 5]


def test_bytes_and_iterable_inputs() -> None:
    data = (json.dumps(TEXT) + "\n\n" + json.dumps({"text": "Paris."}) + "\n").encode()
    examples, report = read_examples(b"\xef\xbb\xbf" + data)  # a UTF-8 BOM is tolerated
    assert report.ok and [(e.line, e.text) for e in examples] == [(1, TEXT["text"]), (3, "Paris.")]
    lines = (json.dumps(COMPLETION) + "\n", "\n", "not json\n")
    examples, report = read_examples(iter(lines))
    assert [e.line for e in examples] == [1]
    assert [(i.line, i.code) for i in report.errors] == [(3, "bad_json")]
    _, report = read_examples(b'{"text": "ok"}\n{"text": "\xff"}\n')
    assert [(i.line, i.code) for i in report.errors] == [(2, "bad_encoding")]


def test_empty_source() -> None:
    examples, report = read_examples([])
    assert examples == [] and [i.code for i in report.errors] == ["empty_file"]


# ----------------------------------------------------------------------------------------- errors


def msgs(*turns: Any, **extra: Any) -> dict[str, Any]:
    return {"messages": list(turns), **extra}


U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}

BAD_CHAT_LINES: list[tuple[Any, set[tuple[str | None, str]]]] = [
    (CHAT, set()),  # 1: valid
    ('{"messages": [', {(None, "bad_json")}),  # 2
    ("[1, 2]", {(None, "not_object")}),  # 3
    ({"foo": 1}, {(None, "unknown_form")}),  # 4
    (msgs(), {("messages", "bad_messages")}),  # 5
    ({"messages": "hi"}, {("messages", "bad_messages")}),  # 6
    (msgs(U, "oops", A), {("messages[1]", "not_object")}),  # 7
    (msgs(U, {"role": "tool", "content": "x"}, A), {("messages[1].role", "bad_role")}),  # 8
    (msgs(U, {"role": "assistant", "content": 5}), {("messages[1].content", "not_string")}),  # 9
    (msgs(U, {"role": "assistant", "content": "  \n"}), {("messages[1].content", "empty")}),  # 10
    (
        msgs(U, {"role": "assistant", "content": "x", "weight": 2}),
        {("messages[1].weight", "bad_weight")},
    ),  # 11
    (msgs({**U, "weight": 0}, A), {("messages[0].weight", "weight_not_allowed")}),  # 12
    (msgs(U, {"role": "user", "content": "again"}), {("messages", "no_assistant")}),  # 13
    (msgs(U, {"role": "system", "content": "late"}, A), {("messages[1].role", "system_not_first")}),  # 14
    (msgs({"content": "x"}, A), {("messages[0].role", "missing_key")}),  # 15
    (
        msgs(U, {"role": "assistant", "content": "x", "weight": True}),
        {("messages[1].weight", "bad_weight")},
    ),  # 16
    (msgs(U, {"role": "assistant"}), {("messages[1].content", "missing_key")}),  # 17
]


def test_every_chat_error_reported_with_line_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [row for row, _ in BAD_CHAT_LINES])
    examples, report = read_examples(path)
    assert [e.line for e in examples] == [1]
    found = by_line(report)
    for line, (_, expected) in enumerate(BAD_CHAT_LINES, start=1):
        got = {(i.field, i.code) for i in found.get(line, [])}
        assert got == expected, f"line {line}: {got} != {expected}"
    assert "got int" in found[9][0].message and "'tool'" in found[8][0].message
    assert "JSON" in found[2][0].message


def test_completion_and_text_field_errors(tmp_path: Path) -> None:
    rows = [
        COMPLETION,
        {"prompt": "p"},
        {"prompt": 3, "completion": ""},
        {"completion": "c", "prompt": None},
    ]
    _, report = read_examples(write_jsonl(tmp_path / "c.jsonl", rows))
    got = {(i.line, i.field, i.code) for i in report.errors}
    assert got == {
        (2, "completion", "missing_key"),
        (3, "prompt", "not_string"),
        (3, "completion", "empty"),
        (4, "prompt", "not_string"),
    }
    _, report = read_examples([json.dumps(TEXT), json.dumps({"text": ""}), json.dumps({"text": ["a"]})])
    assert {(i.line, i.field, i.code) for i in report.errors} == {
        (2, "text", "empty"),
        (3, "text", "not_string"),
    }


def test_unknown_keys_are_warnings(tmp_path: Path) -> None:
    rows = [
        {**TEXT, "id": 7, "source": "web"},
        msgs({**U, "name": "bob"}, A),
    ]
    examples, report = read_examples(write_jsonl(tmp_path / "w.jsonl", rows[:1]))
    assert report.ok and len(examples) == 1
    assert {(w.line, w.field, w.code) for w in report.warnings} == {
        (1, "id", "unknown_key"),
        (1, "source", "unknown_key"),
    }
    examples, report = read_examples([json.dumps(rows[1])])
    assert report.ok and len(examples) == 1
    assert [(w.line, w.field, w.code) for w in report.warnings] == [(1, "messages[0].name", "unknown_key")]


# ----------------------------------------------------------------------------------------- tokens


def test_token_summary_matches_tokenizer(tmp_path: Path, tokenizer: Any) -> None:
    short = {"messages": [U, A]}
    chat_examples, report = read_examples(write_jsonl(tmp_path / "chat.jsonl", [short, "", CHAT]))
    assert report.ok

    def chat_len(turns: list[dict[str, Any]]) -> int:
        rendered = "".join(f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in turns)
        return len(tokenizer.encode(rendered, add_special_tokens=False))

    expected = [chat_len(short["messages"]), chat_len(CHAT["messages"])]
    summary = token_summary(chat_examples, tokenizer, max_seq_len=None)
    assert summary.examples == 2 and summary.total_tokens == sum(expected)
    assert (summary.max_tokens, summary.longest_line) == (expected[1], 3)
    assert summary.over_length == 0 and summary.warnings == []

    eos = 1
    comp, _ = read_examples([json.dumps(COMPLETION)])
    n_comp = len(tokenizer.encode(COMPLETION["prompt"], add_special_tokens=False)) + len(
        tokenizer.encode(COMPLETION["completion"], add_special_tokens=False)
    )
    assert token_summary(comp, tokenizer, None).total_tokens == n_comp + eos
    text, _ = read_examples([json.dumps(TEXT)])
    assert (
        token_summary(text, tokenizer, None).total_tokens
        == len(tokenizer.encode(TEXT["text"], add_special_tokens=False)) + eos
    )


def test_fallback_chat_template_used_without_template(tokenizer: Any) -> None:
    import copy

    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    examples, _ = read_examples([json.dumps(CHAT)])
    with_template = token_summary(examples, tokenizer, None).total_tokens
    fallback = token_summary(examples, bare, None).total_tokens
    assert fallback == with_template  # the fallback renders the same ChatML layout
    assert "<|im_start|>" in FALLBACK_CHAT_TEMPLATE


def test_too_long_examples_reported(tmp_path: Path, tokenizer: Any) -> None:
    long_text = {"text": "The rain in Spain stays mainly in the plain. " * 10}
    path = write_jsonl(tmp_path / "long.jsonl", [TEXT, long_text, "", long_text])
    n_long = len(tokenizer.encode(long_text["text"], add_special_tokens=False)) + 1
    n_short = len(tokenizer.encode(TEXT["text"], add_special_tokens=False)) + 1
    limit = n_short + 1
    assert n_long > limit

    report = validate_file(path, tokenizer, max_seq_len=limit)
    assert report.ok and report.summary.over_length == 2
    assert report.summary.over_length_handling == "truncated"
    too_long = [w for w in report.warnings if w.code == "too_long"]
    assert [w.line for w in too_long] == [2, 4]
    assert f"{n_long} tokens" in too_long[0].message and f"truncated to {limit} tokens" in too_long[0].message

    summary = token_summary(read_examples(path)[0], tokenizer, limit, truncate=False)
    assert summary.over_length_handling == "dropped" and "dropped" in summary.warnings[0].message
    assert (summary.max_tokens, summary.longest_line) == (n_long, 2)


# ----------------------------------------------------------------------------------------- entry points


def test_data_error_message_format() -> None:
    lines = ["not json"] * 25 + [json.dumps(msgs(U))]
    with pytest.raises(DataError) as info:
        validate_or_raise(lines)
    err = info.value
    assert isinstance(err, AdapterError) and len(err.report.errors) == 26
    text = str(err).splitlines()
    assert text[0] == "training data has 26 errors:"
    assert text[1].startswith("  line 1: invalid JSON:")
    assert len(text) == 1 + 20 + 1 and text[-1] == "  ... and 6 more"

    with pytest.raises(DataError) as info:
        validate_or_raise([json.dumps(msgs(U, {"role": "bot", "content": "x"}))])
    assert str(info.value).splitlines()[1:] == [
        "  line 1: messages[1].role: unknown role 'bot'; allowed: system, user, assistant",
        "  line 1: messages: needs at least one assistant turn",
    ]


def test_validate_or_raise_returns_examples_and_summary(tokenizer: Any) -> None:
    examples, report = validate_or_raise([json.dumps(TEXT)], tokenizer, max_seq_len=2)
    assert len(examples) == 1 and report.summary.total_tokens is not None
    assert [w.code for w in report.warnings] == ["too_long"]


def test_validate_file_never_raises(tmp_path: Path, tokenizer: Any) -> None:
    report = validate_file(tmp_path / "missing.jsonl", tokenizer, 16)
    assert [i.code for i in report.errors] == ["unreadable"]
    path = tmp_path / "bad.bin"
    path.write_bytes(b"\x00\xff\xfe garbage\n{]\n")
    report = validate_file(path, tokenizer, 16)
    assert not report.ok and {i.line for i in report.errors} == {1, 2}

    class Broken:
        chat_template = None
        eos_token_id = None

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

    report = validate_file(write_jsonl(tmp_path / "t.jsonl", [TEXT]), Broken(), 16)
    assert [i.code for i in report.errors] == ["tokenize_failed"]
    assert json.dumps(report.to_dict())  # JSON-ready for the API


def test_lines_json_cannot_hold_are_refused_naming_the_line() -> None:
    """Deep nesting and over-long integers (which Python's parser raises on), lone UTF-16 surrogates
    (which it accepts, and which no UTF-8 text, database or JSON answer can hold) and keys given twice
    (of which it keeps the last without a word) are line errors."""
    lines = [
        json.dumps(TEXT),
        '{"text": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"text": "a", "x": ' + "9" * 5000 + "}",
        '{"text": "a", "\\ud800": 1}',
        '{"text": "q\\udc00"}',
        '{"text": "fine \\ud83d\\ude00"}',  # a surrogate pair is one character (an emoji)
        '{"text": "first", "text": "second"}',
        '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}',
    ]
    examples, report = read_examples(lines)
    assert [e.line for e in examples] == [1, 6]
    found = by_line(report)
    assert sorted(found) == [2, 3, 4, 5, 7, 8]
    assert "nested too deeply" in found[2][0].message
    assert all(found[n][0].code == "bad_json" and "given twice" in found[n][0].message for n in (7, 8))
    assert found[3][0].code == "bad_json"
    assert all(found[n][0].code == "bad_text" and "surrogate" in found[n][0].message for n in (4, 5))
    json.dumps([i.message for i in report.errors]).encode("utf-8")  # every message is valid text
