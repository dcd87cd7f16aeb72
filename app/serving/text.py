"""Incremental detokenisation with stop strings, for one generated sequence.

The generated ids are decoded together with the last few prompt ids and the prompt part's text is
cut off again, so tokenizers that drop a word's leading space at the start of a decode (SentencePiece)
give the same text as decoding the whole conversation. Text is cut at the first stop string; while
streaming, the tail that could still become a stop string, or that ends in an incomplete UTF-8
character, is held back until it is settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_IDS = 6
_INCOMPLETE = "\ufffd"


class TextTracker:
    """The text of one sequence as tokens arrive."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._context = list(prompt_ids[-_CONTEXT_IDS:])
        self._context_text = self._decode(self._context)
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters already streamed
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    def update(self, generated: Sequence[int]) -> str:
        """Re-read the text after new tokens; returns it (cut at a stop string, which sets ``stopped``)."""
        full = self._decode(self._context + list(generated))
        text = full[len(self._context_text):] if full.startswith(self._context_text) else self._decode(generated)
        if self.stop:
            start = max(0, len(self.text) - self._hold - 1)
            cuts = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if cuts:
                text = text[: min(cuts)]
                self.stopped = True
        self.text = text
        return text

    def delta(self, final: bool) -> str:
        """Text not streamed yet that is safe to send now (everything when ``final``)."""
        end = len(self.text)
        if not final:
            end -= self._hold if self.stop else 0
            while end > self.sent and self.text[end - 1] == _INCOMPLETE:
                end -= 1
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out
