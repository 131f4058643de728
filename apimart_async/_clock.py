"""The event loop's clock, read without anyio's backend lookup on every call.

``anyio.current_time()`` works out which async library is running each time it is
called (sniffio, then asyncio's current task), and a pipeline reads the clock a dozen
times. On asyncio, ``now()`` reads the running loop's clock directly, the very value
anyio would return; anywhere else (trio) it defers to anyio. Either way its readings
compare correctly with anyio cancel-scope deadlines.
"""

from __future__ import annotations

from asyncio import _get_running_loop  # pyright: ignore[reportPrivateUsage]

import anyio

__all__ = ["now"]


def now() -> float:
    """The current time on the running event loop's clock (seconds)."""
    loop = _get_running_loop()
    if loop is not None:
        return loop.time()
    return anyio.current_time()
