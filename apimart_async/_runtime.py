"""What the client needs to know about the event loop it runs on.

anyio hides which async library is running, which is what we want almost everywhere.
Two things cannot be expressed through it:

* which loop a client first ran on, so using it on another one (two ``asyncio.run``
  calls with one module-level client) is a clear ``RuntimeError``, not a deep
  "Event loop is closed" or "attached to a different loop" from a pool;
* starting a task of the client's own (one that keeps a paid submit going when its
  caller is cancelled) outside any caller's task tree: on asyncio a task of the loop,
  on trio a system task. Either ends with its loop at the latest.
"""

from __future__ import annotations

import contextvars
import sys
from typing import TYPE_CHECKING, Any

import anyio

from ._clock import running_asyncio_loop

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

__all__ = ["all_or_first_error", "current_loop", "loop_mismatch", "spawn_detached"]


def current_loop() -> object:
    """An object identifying the running event loop (the asyncio loop, or trio's token)."""
    loop = running_asyncio_loop()
    if loop is not None:
        return loop
    trio: Any = sys.modules.get("trio")
    if trio is not None:
        return trio.lowlevel.current_trio_token()
    raise RuntimeError("apimart_async needs a running asyncio or trio event loop")


def loop_mismatch(owner: str) -> RuntimeError:
    """The error for a client used on another loop than the one it first ran on."""
    return RuntimeError(
        f"this {owner} is bound to another event loop: it first ran on a different one "
        "(for example in an earlier asyncio.run() call), and its connections and tasks "
        "belong to that loop. Create the client inside the loop that uses it (in your "
        "async main, or a web app's lifespan handler), or use apimart_async.Apimart, the "
        "blocking client, from synchronous code."
    )


def spawn_detached(fn: Callable[[], Awaitable[None]]) -> object:
    """Start *fn* as a task of the running loop that no caller's cancellation reaches.

    Returns a handle the caller must keep until *fn* ends (asyncio holds tasks only
    weakly). *fn* must not raise: on trio a failing system task crashes the whole run.
    """
    loop: Any = running_asyncio_loop()
    if loop is not None:
        return loop.create_task(fn())
    trio: Any = sys.modules["trio"]
    # A system task starts from an empty context; the caller's (log correlation ids,
    # tracing) goes with it, as asyncio's create_task does by itself.
    trio.lowlevel.spawn_system_task(fn, context=contextvars.copy_context())
    return fn


async def all_or_first_error(calls: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run *calls* concurrently; at the first failure cancel the rest and raise it.

    The caller sees that error itself, never an ``ExceptionGroup`` (a ``SystemExit``
    from a callback included); cancellation from outside propagates as usual.
    """
    failures: list[BaseException] = []
    async with anyio.create_task_group() as tg:

        async def one(call: Callable[[], Awaitable[None]]) -> None:
            try:
                await call()
            except BaseException as exc:
                if isinstance(exc, anyio.get_cancelled_exc_class()):
                    raise
                failures.append(exc)
                tg.cancel_scope.cancel()

        for call in calls:
            tg.start_soon(one, call)
    if failures:
        raise failures[0]
