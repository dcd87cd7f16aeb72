"""A JSON object hook that refuses a key given twice (``json`` would keep the last value silently)."""

from __future__ import annotations

from typing import Any


class RepeatedKey(ValueError):
    """A JSON object gives ``key`` more than once."""

    def __init__(self, key: str) -> None:
        super().__init__(f"key {key!r} is given twice")
        self.key = key


def object_without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads`: the object's dict, or :class:`RepeatedKey`."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise RepeatedKey(key)
        out[key] = value
    return out


__all__ = ["RepeatedKey", "object_without_repeats"]
