"""Checks on text that is about to go on the wire."""

from __future__ import annotations

__all__ = ["encodable"]


def encodable(text: str) -> bool:
    """Whether *text* can go on the wire as UTF-8 (a lone surrogate cannot)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True
