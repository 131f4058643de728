"""The event loop's clock, read without anyio's backend lookup on every call.

``anyio.current_time()`` works out which async library is running each time it is
called (sniffio, then asyncio's current task), and a pipeline reads the clock a dozen
times. On asyncio, ``now()`` reads the running loop's clock directly, the very value
anyio would return; anywhere else (trio) it defers to anyio. Either way its readings
compare correctly with anyio cancel-scope deadlines.

``asyncio`` is looked up, not imported: importing it costs tens of milliseconds, and
when it was never imported no asyncio loop can be running (trio, or no loop at all).
"""

from __future__ import annotations

import sys

import anyio

__all__ = ["now", "running_asyncio_loop"]


def running_asyncio_loop() -> object | None:
    """The running asyncio loop, or None (no loop, or trio)."""
    asyncio = sys.modules.get("asyncio")
    return None if asyncio is None else asyncio._get_running_loop()


def now() -> float:
    """The current time on the running event loop's clock (seconds)."""
    asyncio = sys.modules.get("asyncio")
    if asyncio is not None:
        loop = asyncio._get_running_loop()
        if loop is not None:
            return loop.time()  # type: ignore[no-any-return]
    return anyio.current_time()
