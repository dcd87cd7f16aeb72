"""Incremental detokenisation with stop strings, for one generated sequence.

Each step decodes a short window of ids, never the whole sequence: the window starts a few ids
before the text read so far (at first, the last prompt ids), and the new text is what decoding the
window adds to decoding its start alone. Tokenizers that drop a word's leading space at the start of
a decode (SentencePiece), or clean up spaces around punctuation, then give the same text as
decoding the whole sequence. While the window ends in an incomplete UTF-8 character it is not read
yet. Text is cut at the first stop string; while streaming, the tail that could still become a stop
string is held back until it is settled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from app.serving.errors import RequestTooLarge

_CONTEXT_IDS = 6
_INCOMPLETE = "\ufffd"


class TextTracker:
    """The text of one sequence as tokens arrive (each step costs a few tokens of decoding)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_IDS:])
        self._context = len(self._ids)
        self._context_text = self._decode(self._ids)
        self._start = 0  # the decode window: ids[_start:]; ids before _read are in ``text``
        self._read = len(self._ids)
        self._generated = 0  # generated ids appended to ``_ids`` so far
        self.stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters already streamed
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        text: str = self._tokenizer.decode(list(ids), skip_special_tokens=True)
        return text

    def _read_window(self, final: bool) -> None:
        """Append the text the unread ids add (an incomplete character waits for more ids unless ``final``)."""
        if self._read == len(self._ids):
            return
        head = self._decode(self._ids[self._start:self._read])
        window = self._decode(self._ids[self._start:])
        if not window.startswith(head):  # the new ids rewrote text before them (space clean-up): re-read all
            self.text = self._whole_text()
        elif len(window) > len(head) and (final or not window.endswith(_INCOMPLETE)):
            self.text += window[len(head):]
        else:
            return
        self._start, self._read = self._read, len(self._ids)

    def _whole_text(self) -> str:
        full = self._decode(self._ids)
        if full.startswith(self._context_text):
            return full[len(self._context_text):]
        return self._decode(self._ids[self._context:])

    def update(self, generated: Sequence[int]) -> str:
        """Read the tokens appended to ``generated`` since the last call; returns the text so far (cut at a
        stop string, which sets ``stopped``)."""
        if self.stopped:
            return self.text
        self._ids.extend(generated[self._generated:])
        self._generated = len(generated)
        before = len(self.text)
        self._read_window(final=False)
        self._cut(before)
        return self.text

    def _cut(self, before: int) -> None:
        if self.stop and len(self.text) > before:
            start = max(0, before - self._hold)
            cuts = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if cuts:
                self.text = self.text[: min(cuts)]
                self.stopped = True

    def finish(self) -> str:
        """The final text: ids still waiting on an incomplete character are read as they are."""
        if not self.stopped:
            before = len(self.text)
            self._read_window(final=True)
            self._cut(before)
        return self.text

    def delta(self, final: bool) -> str:
        """Text not streamed yet that is safe to send now (everything when ``final``, after :meth:`finish`)."""
        end = len(self.text)
        if not final and self.stop and not self.stopped:
            end -= self._hold
        if end <= self.sent:
            return ""
        out = self.text[self.sent:end]
        self.sent = end
        return out


def lone_surrogate(text: str) -> int | None:
    """Where ``text`` holds a lone UTF-16 surrogate (JSON's ``"\\ud800"``), or ``None``: such text is not
    text (no tokenizer takes it, no generated text contains it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return int(exc.start)
    return None


def check_text(text: str, param: str) -> None:
    """Refuse (422 naming ``param``) text holding a lone UTF-16 surrogate."""
    at = lone_surrogate(text)
    if at is not None:
        raise RequestTooLarge(f"{param} holds a lone UTF-16 surrogate at character {at}, which is not text",
                              param=param)
