"""Delivering progress events to sync or async callbacks, and idempotency keys."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable
from typing import Any

from .types import Event

__all__ = ["EventHandler", "checked_key", "emit", "new_idempotency_key"]

EventHandler = Callable[[Event], Any]
"""A callback taking an ``Event``; it may be a plain function or a coroutine function."""

_KEY_CHARS = re.compile(r"^[\x21-\x7e]{1,191}$")


async def emit(handler: EventHandler | None, event: Event) -> None:
    """Deliver *event* to *handler*, awaiting it if it returned an awaitable.

    A handler's exception propagates: a broken progress callback is a bug to see, and
    ``generate_many`` records it as that job's outcome.
    """
    if handler is None:
        return
    result = handler(event)
    if inspect.isawaitable(result):
        await result


def new_idempotency_key() -> str:
    """A fresh key: one per logical submit, reused on every retry of it."""
    return f"apimart-async-{os.urandom(16).hex()}"  # 128 random bits, as uuid4 has


def checked_key(key: str | None) -> str:
    """*key* if it is 1-191 visible ASCII characters (the service's rule), else a new one."""
    if key is None:
        return new_idempotency_key()
    if not isinstance(key, str) or not _KEY_CHARS.match(key):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise ValueError(
            f"idempotency_key must be 1-191 visible ASCII characters (no spaces), got {key!r}"
        )
    return key
