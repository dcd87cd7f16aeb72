"""Tokenisation: loss masks on chat / completion / text examples, truncation."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from adapters_core.tiny_models import CHAT_TEMPLATE
from adapters_core.training.examples import Example, Message, TokenizedExample
from adapters_core.training.tokenize import tokenize_chat, tokenize_dataset, tokenize_example


@pytest.fixture(scope="module")
def tok(tiny_llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def chat(*turns: tuple[str, str] | tuple[str, str, int], line: int = 1) -> Example:
    return Example(form="chat", line=line, messages=tuple(Message(*t) for t in turns))


CHAT = chat(
    ("system", "you are a helpful assistant."),
    ("user", "What is two plus two?"),
    ("assistant", "Two plus two is four."),
    ("user", "What is the capital of France?"),
    ("assistant", "The capital of France is Paris."),
)


def trained_spans(tok: Any, t: TokenizedExample) -> list[str]:
    """Decoded runs of consecutive in-loss tokens."""
    runs = itertools.groupby(zip(t.input_ids, t.labels, strict=True), key=lambda p: p[1] != -100)
    return [tok.decode([i for i, _ in run]) for in_loss, run in runs if in_loss]


def test_chat_loss_only_on_assistant_content_and_end_of_turn(tok: Any) -> None:
    t = tokenize_example(CHAT, tok, max_seq_len=512)
    rendered = tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in CHAT.messages], tokenize=False
    )
    assert t.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert trained_spans(tok, t) == [
        "Two plus two is four.<|im_end|>",
        "The capital of France is Paris.<|im_end|>",
    ]
    assert all(lab in (-100, tid) for tid, lab in zip(t.input_ids, t.labels, strict=True))
    assert t.line == 1


def test_piecewise_tokenisation_matches_full_render_and_offsets(tok: Any) -> None:
    piecewise = tokenize_chat(CHAT, tok)
    offsets = tokenize_chat(CHAT, tok, use_offsets=True)
    assert piecewise == offsets


def test_weight_zero_assistant_turn_is_masked(tok: Any) -> None:
    ex = chat(
        ("user", "hello there!"),
        ("assistant", "bad answer", 0),
        ("user", "again"),
        ("assistant", "hello, how can I help you today?"),
    )
    t = tokenize_example(ex, tok, max_seq_len=512)
    assert trained_spans(tok, t) == ["hello, how can I help you today?<|im_end|>"]
    t_all = tokenize_example(ex, tok, max_seq_len=512, train_on_inputs=True)
    assert "bad answer" not in "".join(trained_spans(tok, t_all))
    assert "again" in "".join(trained_spans(tok, t_all))


def test_conversation_opening_with_the_assistant(tok: Any) -> None:
    """No template renders an empty conversation, so the opening turn's header is found by its content: the
    header stays out of the loss, the content and end of turn are in it, and the ids are the full render's."""
    ex = chat(("assistant", "Hello! Ask me anything."), ("user", "What is 2+2?"), ("assistant", "It is 4."))
    t = tokenize_example(ex, tok, max_seq_len=512)
    rendered = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in ex.messages], tokenize=False)
    assert t.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert trained_spans(tok, t) == ["Hello! Ask me anything.<|im_end|>", "It is 4.<|im_end|>"]
    assert tokenize_chat(ex, tok) == tokenize_chat(ex, tok, use_offsets=True)


def test_template_refusing_a_conversation_names_the_line(tok: Any) -> None:
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tok.name_or_path)
    strict.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversations must start with a user turn') }}"
        "{% endif %}" + CHAT_TEMPLATE
    )
    with pytest.raises(ValueError, match=r"^line 7: the chat template cannot render .*must start with a user turn"):
        tokenize_example(chat(("assistant", "hi"), ("user", "yo"), ("assistant", "ok"), line=7), strict, max_seq_len=64)


def test_train_on_inputs_counts_every_token(tok: Any) -> None:
    t = tokenize_example(CHAT, tok, max_seq_len=512, train_on_inputs=True)
    assert t.labels == t.input_ids


def test_fallback_chat_template(tok: Any) -> None:
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        tokenize_example(CHAT, bare, max_seq_len=512)
    t = tokenize_example(CHAT, bare, max_seq_len=512, chat_template=CHAT_TEMPLATE)
    assert t == tokenize_example(CHAT, tok, max_seq_len=512)


def test_completion_form(tok: Any) -> None:
    ex = Example(
        form="completion", line=3, prompt="What is two plus two?", completion=" Two plus two is four."
    )
    t = tokenize_example(ex, tok, max_seq_len=512)
    prompt = tok("What is two plus two?")["input_ids"]
    assert t.input_ids[: len(prompt)] == prompt
    assert t.input_ids[-1] == tok.eos_token_id
    assert t.labels[: len(prompt)] == [-100] * len(prompt)
    assert t.labels[len(prompt) :] == t.input_ids[len(prompt) :]
    assert trained_spans(tok, t) == [" Two plus two is four.<|eos|>"]
    t_all = tokenize_example(ex, tok, max_seq_len=512, train_on_inputs=True)
    assert t_all.labels == t_all.input_ids == t.input_ids


def test_text_form(tok: Any) -> None:
    ex = Example(form="text", line=2, text="The quick brown fox jumps over the lazy dog.")
    t = tokenize_example(ex, tok, max_seq_len=512)
    assert t.labels == t.input_ids
    assert tok.decode(t.input_ids) == "The quick brown fox jumps over the lazy dog.<|eos|>"


def test_truncation_keeps_the_start(tok: Any) -> None:
    full = tokenize_example(CHAT, tok, max_seq_len=512)
    cut = tokenize_example(CHAT, tok, max_seq_len=20)
    assert len(cut.input_ids) == len(cut.labels) == 20
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    with pytest.raises(ValueError):
        tokenize_example(CHAT, tok, max_seq_len=0)


def test_tokenize_dataset_keeps_order(tok: Any) -> None:
    exs = [Example(form="text", line=i, text=f"text {i}") for i in range(1, 4)]
    out = tokenize_dataset(exs, tok, max_seq_len=64)
    assert [t.line for t in out] == [1, 2, 3]
    assert out[1] == tokenize_example(exs[1], tok, max_seq_len=64)
