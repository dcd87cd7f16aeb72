"""Telling a decimal number apart in user text: ``str.isdigit`` also accepts superscripts (which
``int`` refuses) and other scripts' digits (which ``int`` reads), neither of which a version number,
cursor, event id or size field means."""

from __future__ import annotations


def is_ascii_number(text: str) -> bool:
    """Whether ``text`` is one or more ASCII digits and nothing else."""
    return text.isascii() and text.isdigit()


__all__ = ["is_ascii_number"]
