"""The in-memory form of one training example, whatever JSONL form it came from.

Three forms are accepted (one per file; mixing them is refused):

* chat: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0|1}, ...]}``
  (OpenAI's fine-tuning form; ``weight`` 0 excludes an assistant turn from the loss);
* completion: ``{"prompt": str, "completion": str}``;
* text: ``{"text": str}`` (loss on every token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ExampleForm = Literal["chat", "completion", "text"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn; ``weight`` 1 = assistant tokens count in the loss, 0 = they do not."""

    role: str
    content: str
    weight: int = 1


@dataclass(frozen=True)
class Example:
    """One validated example; ``line`` is its 1-based line number in the source JSONL."""

    form: ExampleForm
    line: int
    messages: tuple[Message, ...] = ()
    prompt: str = ""
    completion: str = ""
    text: str = ""


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and per-token labels (``-100`` = not in the loss) of one example."""

    input_ids: list[int]
    labels: list[int]
    line: int
