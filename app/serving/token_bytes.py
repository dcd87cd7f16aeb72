"""The bytes a token stands for, and where each token starts in the text, for OpenAI's logprobs.

A token can hold part of a UTF-8 character: decoded alone it is U+FFFD, whose bytes are not the
token's. Its real bytes come from its vocabulary string, by tokenizer kind:

- byte-level BPE (GPT-2, Llama-3, Qwen): each character of the string stands for one byte, through
  GPT-2's table of printable stand-ins (:func:`byte_level_table`), which is inverted here;
- SentencePiece-style (Llama-2, Mistral): a byte-fallback piece ``<0xNN>`` is the byte ``NN``, and
  ``▁`` is a space;
- otherwise, and for added tokens (``<|im_end|>``, ...): the UTF-8 of the token decoded alone.

So the bytes of a sequence's tokens, joined, are the UTF-8 bytes its text decodes from.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import re
import weakref
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
T = TypeVar("T")
_KINDS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_ADDED: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


@cache
def byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet inverted: stand-in character -> byte. Printable Latin-1 bytes stand for
    themselves; the other 68 bytes, in order, for the characters from U+0100 on."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(0x100 + shifted)] = byte
            shifted += 1
    return table


def _decoder_types(tokenizer: Any) -> set[str]:
    """The ``type`` of a fast tokenizer's decoder and of the decoders it chains (empty for slow ones)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return set()
    types: set[str] = set()
    stack = [json.loads(decoder.__getstate__())]
    while stack:
        node = stack.pop()
        types.add(str(node.get("type")))
        if node.get("type") == "Replace" and node.get("pattern", {}).get("String") == "▁":
            types.add("Metaspace")
        stack.extend(node.get("decoders") or [])
    return types


def _kept(cache: weakref.WeakKeyDictionary[Any, T], tokenizer: Any, work_out: Callable[[Any], T]) -> T:
    """``work_out(tokenizer)``, kept per tokenizer in ``cache`` (worked out each time for a tokenizer that
    cannot be weakly referenced)."""
    try:
        return cache[tokenizer]
    except (KeyError, TypeError):
        pass
    value = work_out(tokenizer)
    with contextlib.suppress(TypeError):
        cache[tokenizer] = value
    return value


def tokenizer_kind(tokenizer: Any) -> str:
    """``byte_level``, ``sentencepiece`` or ``text`` (see the module docstring); kept per tokenizer."""
    return _kept(_KINDS, tokenizer, _work_out_kind)


def _work_out_kind(tokenizer: Any) -> str:
    types = _decoder_types(tokenizer)
    if "ByteLevel" in types or hasattr(tokenizer, "byte_decoder"):
        return "byte_level"
    if types & {"Metaspace", "ByteFallback"} or hasattr(tokenizer, "sp_model"):
        return "sentencepiece"
    return "text"


def _added_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's added tokens, kept per tokenizer (HF rebuilds ``added_tokens_decoder`` on
    every read: tens of microseconds with Llama-3's 256)."""
    return _kept(_ADDED, tokenizer, lambda t: frozenset(getattr(t, "added_tokens_decoder", {})))


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes ``token_id`` stands for (see the module docstring)."""
    kind = "text" if token_id in _added_ids(tokenizer) else tokenizer_kind(tokenizer)
    if kind != "text":
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            if kind == "byte_level":
                table = byte_level_table()
                if all(c in table for c in piece):
                    return bytes(table[c] for c in piece)
            else:
                match = _BYTE_PIECE.fullmatch(piece)
                return bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode()
    text: str = tokenizer.decode([token_id], skip_special_tokens=False)
    return text.encode()


def char_starts(data: bytes) -> list[int]:
    """Where each character of ``data.decode("utf-8", errors="replace")`` starts in ``data`` (each invalid
    span, which decodes to one U+FFFD, counts as one character)."""
    starts: list[int] = []
    pos = 0
    while pos < len(data):
        try:
            valid, bad = data[pos:].decode(), None
        except UnicodeDecodeError as exc:
            valid, bad = data[pos:pos + exc.start].decode(), (pos + exc.start, pos + exc.end)
        for char in valid:
            starts.append(pos)
            pos += len(char.encode())
        if bad is not None:
            starts.append(bad[0])
            pos = bad[1]
    return starts


def text_offsets(tokenizer: Any, token_ids: Sequence[int]) -> list[int]:
    """For each token, how many characters of the sequence's text (decoded without special tokens) come
    before it; a token that starts inside a character points at that character."""
    return TextOffsets(tokenizer).add(token_ids)


class TextOffsets:
    """:func:`text_offsets` a few tokens at a time, for streams: :meth:`add` answers the new tokens' offsets
    in the text of every token added so far, at a cost per token that does not grow with the length (the
    characters before the last one are settled: a later byte cannot change where they start)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._skipped = set(getattr(tokenizer, "all_special_ids", ()))
        self._tail = bytearray()  # the bytes from the start of the last character on
        self._before = 0  # characters wholly before the tail

    def add(self, token_ids: Sequence[int]) -> list[int]:
        offsets = []
        for token_id in token_ids:
            start = len(self._tail)
            if token_id not in self._skipped:
                self._tail += token_bytes(self._tokenizer, token_id)
            starts = char_starts(bytes(self._tail))
            inside = bisect.bisect_right(starts, start) - 1 if start < len(self._tail) else len(starts)
            offsets.append(self._before + inside)
            if len(starts) > 1:
                self._before += len(starts) - 1
                del self._tail[: starts[-1]]
        return offsets
