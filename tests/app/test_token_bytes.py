"""Each token's own bytes and its place in the text, for byte-level and SentencePiece-style tokenizers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from app.serving.token_bytes import (
    TextOffsets,
    byte_level_table,
    char_starts,
    text_offsets,
    token_bytes,
    tokenizer_kind,
)

TEXT = "ab é日 a😀"


@pytest.fixture(scope="module")
def byte_level(demo_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def sentencepiece() -> Any:
    """Llama-2's tokenizer layout in small: ``▁`` for spaces, ``<0xNN>`` pieces for bytes outside the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in ("▁", "a", "b", "▁a", "▁ab"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁a", "b")], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_level_table_stands_for_every_byte_once() -> None:
    table = byte_level_table()
    assert sorted(table.values()) == list(range(256))
    assert table["a"] == ord("a") and table["Ġ"] == ord(" ") and table["Ċ"] == ord("\n")


def test_byte_level_tokens_join_to_the_texts_bytes(byte_level: Any) -> None:
    ids = byte_level.encode(TEXT, add_special_tokens=False)
    assert tokenizer_kind(byte_level) == "byte_level"
    pieces = [token_bytes(byte_level, i) for i in ids]
    assert b"".join(pieces) == TEXT.encode()
    assert any(byte_level.decode([i]) == "\ufffd" for i in ids)  # some tokens hold part of a character
    assert token_bytes(byte_level, byte_level.eos_token_id) == byte_level.eos_token.encode()


def test_sentencepiece_byte_pieces_and_spaces(sentencepiece: Any) -> None:
    ids = sentencepiece.encode(TEXT, add_special_tokens=False)
    assert tokenizer_kind(sentencepiece) == "sentencepiece"
    assert "<0xC3>" in sentencepiece.convert_ids_to_tokens(ids)
    assert b"".join(token_bytes(sentencepiece, i) for i in ids) == b" " + TEXT.encode()  # the ▁ before "ab"


def test_text_offsets_point_at_the_character_a_token_starts_or_continues(sentencepiece: Any) -> None:
    ids = sentencepiece.encode(TEXT, add_special_tokens=False)
    # " ab é日 a😀": "▁ab" at 0, "▁" at 3, é's two bytes at 4, 日's three at 5, "▁a" at 6, 😀's four at 8
    assert text_offsets(sentencepiece, ids) == [0, 3, 4, 4, 5, 5, 5, 6, 8, 8, 8, 8]
    eos = sentencepiece.eos_token_id
    assert text_offsets(sentencepiece, [*ids, eos]) == [0, 3, 4, 4, 5, 5, 5, 6, 8, 8, 8, 8, 9]  # skipped in the text


def test_char_starts_count_each_invalid_span_as_one_replacement_character() -> None:
    for data in (b"ab", "é日".encode(), b"a\xe6b", b"\xe6\x97", b"\xe6\x97\xa5x\xff\xfe", "\ufffd".encode()):
        assert len(char_starts(data)) == len(data.decode("utf-8", "replace")), data
    assert char_starts(b"\xe6\x97\xa5x\xff\xfe") == [0, 3, 4, 5]


def test_text_offsets_a_few_tokens_at_a_time_equal_the_whole_sequences(byte_level: Any) -> None:
    """What a stream answers piece by piece is what the whole sequence answers, byte soup included (tokens
    that split characters, invalid runs): each offset is the number of characters starting before the token."""
    generator = random.Random(0)
    for _ in range(200):
        ids = [generator.randrange(len(byte_level)) for _ in range(generator.randrange(1, 40))]
        data = b"".join(token_bytes(byte_level, i) for i in ids if i not in byte_level.all_special_ids)
        starts, position, want = char_starts(data), 0, []
        for i in ids:
            want.append(sum(1 for s in starts if s <= position) - 1 if position < len(data) else len(starts))
            position += 0 if i in byte_level.all_special_ids else len(token_bytes(byte_level, i))
        assert text_offsets(byte_level, ids) == want
        stream, got, at = TextOffsets(byte_level), [], 0
        while at < len(ids):
            step = generator.randrange(1, 4)
            got += stream.add(ids[at:at + step])
            at += step
        assert got == want
