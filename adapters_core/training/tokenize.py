"""Tokenisation of validated examples into ``input_ids`` plus loss ``labels`` (``-100`` = not in the loss).

* chat: the conversation is rendered with the tokenizer's chat template (or ``chat_template`` when the
  tokenizer has none) and tokenised with ``add_special_tokens=False``, exactly as
  ``apply_chat_template(tokenize=True)`` does at inference, so any BOS comes from the template itself.
  Assistant spans are found by rendering prefix by prefix: the text an assistant turn adds after
  ``render(messages[:i], add_generation_prompt=True)`` is its content plus the turn's suffix; the content and
  the suffix up to and including its first special token (the end-of-turn token, e.g. ``<|im_end|>``)
  are trainable, any later text of the suffix (e.g. the newline after ``<|im_end|>``) is not (a conversation
  that opens with the assistant has no prefix to render: that turn's header is the text before its
  content). A template that refuses a conversation fails with the example's line. The pieces are
  tokenised one by one and their concatenation is checked against the tokenisation of the full render; when
  a BPE merge crosses a piece boundary the labels come from the full render's offset mapping instead.
* completion: ``tokenizer(prompt)`` (with the tokenizer's default special tokens, e.g. BOS) + completion
  tokens + EOS; only the completion and EOS are trainable.
* text: ``tokenizer(text)`` + EOS, every token trainable.

``train_on_inputs=True`` makes every token trainable except the tokens of weight-0 assistant turns, which
stay masked in both modes. Sequences longer than ``max_seq_len`` keep their first ``max_seq_len`` tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from adapters_core.training.examples import Example, Message, TokenizedExample

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Character ranges [start, end) of the rendered text that count in the loss.
_Span = tuple[int, int]


def _render(
    tokenizer: Any, messages: Sequence[Message], template: str | None, *, generation: bool, line: int
) -> str:
    """The chat template's text for ``messages`` (no tokenisation); a template that refuses them (many
    raise on a conversation they do not accept) fails with the example's line."""
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation, chat_template=template
        )
    except Exception as exc:
        raise ValueError(
            f"line {line}: the chat template cannot render the first {len(messages)} messages: {exc}"
        ) from exc
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def _special_tokens(tokenizer: Any) -> list[str]:
    """Every special / added token string (used to find the end-of-turn token of an assistant turn)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = getattr(tokenizer, "get_added_vocab", None)
    if callable(added):
        tokens.update(added().keys())
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _trainable_end(turn: str, content: str, specials: Sequence[str]) -> int:
    """Length of the trainable head of an assistant turn's text: content + suffix through the first special."""
    stripped = content.strip()
    pos = turn.find(stripped) if stripped else 0
    if pos < 0:  # the template rewrote the content beyond recognition: train on the whole turn
        return len(turn)
    after = pos + len(stripped)
    hits = [(turn.find(s, after), s) for s in specials]
    found = [(i, s) for i, s in hits if i >= 0]
    if not found:
        return len(turn)
    first, token = min(found, key=lambda h: (h[0], -len(h[1])))
    return first + len(token)


def _chat_pieces(
    example: Example, tokenizer: Any, template: str | None, train_on_inputs: bool
) -> tuple[str, list[tuple[str, bool]]]:
    """The full render and its consecutive (text, trainable) pieces."""
    messages = example.messages
    specials = _special_tokens(tokenizer)
    pieces: list[tuple[str, bool]] = []
    done = ""  # rendered text covered by ``pieces`` so far
    for i, message in enumerate(messages):
        if message.role == "assistant" and i > 0:  # (no template renders an empty conversation: see below)
            header_end = _render(tokenizer, messages[:i], template, generation=True, line=example.line)
            if header_end.startswith(done) and len(header_end) > len(done):
                pieces.append((header_end[len(done) :], train_on_inputs))
                done = header_end
        full = _render(tokenizer, messages[: i + 1], template, generation=False, line=example.line)
        if not full.startswith(done):
            raise ValueError(
                f"line {example.line}: the chat template's render of the first {i + 1} messages does not "
                "extend the render of the first messages; cannot locate the assistant turns"
            )
        turn = full[len(done) :]
        if message.role == "assistant":
            head = 0
            if i == 0:  # a conversation that opens with the assistant: its header is the text before the content
                stripped = message.content.strip()
                head = max(turn.find(stripped), 0) if stripped else 0
                pieces.append((turn[:head], train_on_inputs))
            cut = head + _trainable_end(turn[head:], message.content, specials)
            in_loss = message.weight != 0
            pieces.append((turn[head:cut], in_loss))
            pieces.append((turn[cut:], train_on_inputs and in_loss))
        else:
            pieces.append((turn, train_on_inputs))
        done = full
    return done, [(text, flag) for text, flag in pieces if text]


def _encode(tokenizer: Any, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _labels_from_offsets(tokenizer: Any, text: str, pieces: Sequence[tuple[str, bool]]) -> list[bool]:
    """Per-token trainable flags of the full render: a token counts when its first character does."""
    spans: list[_Span] = []
    start = 0
    for piece, flag in pieces:
        if flag:
            spans.append((start, start + len(piece)))
        start += len(piece)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [any(lo <= s < hi for lo, hi in spans) for s, _ in enc["offset_mapping"]]


def tokenize_chat(
    example: Example,
    tokenizer: Any,
    *,
    train_on_inputs: bool = False,
    chat_template: str | None = None,
    use_offsets: bool = False,
) -> tuple[list[int], list[bool]]:
    """Token ids of a chat example's full render and per-token trainable flags (not truncated).

    ``use_offsets`` forces the offset-mapping labelling (the fallback when piecewise tokenisation differs).
    """
    template = None if getattr(tokenizer, "chat_template", None) else chat_template
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template and no fallback chat_template was given")
    text, pieces = _chat_pieces(example, tokenizer, template, train_on_inputs)
    full_ids = _encode(tokenizer, text, special=False)
    if not use_offsets:
        ids: list[int] = []
        flags: list[bool] = []
        for piece, flag in pieces:
            piece_ids = _encode(tokenizer, piece, special=False)
            ids.extend(piece_ids)
            flags.extend([flag] * len(piece_ids))
        if ids == full_ids:
            return ids, flags
        logger.debug(
            "line %d: piecewise tokenisation differs from the full render; using offsets", example.line
        )
    return full_ids, _labels_from_offsets(tokenizer, text, pieces)


def _eos(tokenizer: Any) -> list[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos token; completion and text examples need one")
    return [int(eos)]


def tokenize_example(
    example: Example,
    tokenizer: Any,
    *,
    max_seq_len: int,
    train_on_inputs: bool = False,
    chat_template: str | None = None,
) -> TokenizedExample:
    """Token ids and labels of one example, truncated to its first ``max_seq_len`` tokens."""
    if max_seq_len < 1:
        raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
    ids, flags = encode_example(example, tokenizer, train_on_inputs=train_on_inputs, chat_template=chat_template)
    ids, flags = ids[:max_seq_len], flags[:max_seq_len]
    labels = [t if f else IGNORE_INDEX for t, f in zip(ids, flags, strict=True)]
    return TokenizedExample(input_ids=[int(t) for t in ids], labels=labels, line=example.line)


def encode_example(
    example: Example, tokenizer: Any, *, train_on_inputs: bool = False, chat_template: str | None = None
) -> tuple[list[int], list[bool]]:
    """All token ids of ``example`` (untruncated) and whether each one counts in the loss."""
    if example.form == "chat":
        ids, flags = tokenize_chat(
            example, tokenizer, train_on_inputs=train_on_inputs, chat_template=chat_template
        )
    elif example.form == "completion":
        prompt = _encode(tokenizer, example.prompt, special=True)
        answer = _encode(tokenizer, example.completion, special=False) + _eos(tokenizer)
        ids = prompt + answer
        flags = [train_on_inputs] * len(prompt) + [True] * len(answer)
    elif example.form == "text":
        ids = _encode(tokenizer, example.text, special=True) + _eos(tokenizer)
        flags = [True] * len(ids)
    else:
        raise ValueError(f"line {example.line}: unknown example form {example.form!r}")
    return [int(t) for t in ids], flags


def tokenize_dataset(
    examples: Iterable[Example],
    tokenizer: Any,
    *,
    max_seq_len: int,
    train_on_inputs: bool = False,
    chat_template: str | None = None,
) -> list[TokenizedExample]:
    """``tokenize_example`` over every example, in order."""
    return [
        tokenize_example(
            ex,
            tokenizer,
            max_seq_len=max_seq_len,
            train_on_inputs=train_on_inputs,
            chat_template=chat_template,
        )
        for ex in examples
    ]
