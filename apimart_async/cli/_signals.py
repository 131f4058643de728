"""Stopping cleanly on Ctrl-C (SIGINT) or SIGTERM, and at once on the second one.

The first signal cancels the work: the client lets submits already on the wire answer
(so their task ids are recorded) and abandons everything else; the journal commits in
whole transactions, so it is consistent however far the work got. Closing the client
(which hears those submits out, up to its submit shield) is watched too:
the second signal, during the work or during that wait, exits immediately
(``os._exit``); that is as safe as ``kill -9``: a submit that was in flight is left
``submitting`` in the journal and counts as uncertain on the next run.

What can go wrong: on Windows, or outside the main thread, signal handlers cannot be
installed; Ctrl-C then raises ``KeyboardInterrupt`` after the same clean unwinding.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from anyio.abc import TaskStatus

__all__ = ["exit_status", "interruptible"]


def exit_status(signum: int) -> int:
    """The shell's status for death by *signum* (130 for SIGINT)."""
    return 128 + signum


def _can_watch() -> bool:
    return sys.platform != "win32" and threading.current_thread() is threading.main_thread()


async def interruptible(
    body: Callable[[], Awaitable[None]],
    *,
    on_stop: Callable[[int], None],
    on_abort: Callable[[int], None] | None = None,
    then: Callable[[], Awaitable[None]] | None = None,
) -> int | None:
    """Run *body*, then *then* (however *body* ended: closing the client); return the
    signal that stopped it, or None if it ran to its end.

    An exception from *body* (else from *then*) is re-raised as itself, never inside an
    ExceptionGroup.

    *on_stop(signum)* is called on the first signal (say what is happening), then the
    body is cancelled (*then* is not: it must end on its own, as a client's close
    does); *on_abort(signum)* on the second, right before ``os._exit``.
    """
    stopped: int | None = None
    work = anyio.CancelScope()

    async def watch(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        nonlocal stopped
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if stopped is None:
                    stopped = int(signum)
                    on_stop(stopped)
                    work.cancel()
                else:
                    if on_abort is not None:
                        on_abort(int(signum))
                    os._exit(exit_status(int(signum)))

    error: Exception | None = None
    async with anyio.create_task_group() as tg:
        if _can_watch():
            await tg.start(watch)
        with work:
            try:
                await body()
            except Exception as exc:  # noqa: BLE001 - re-raised plainly below
                error = exc
        if then is not None:
            try:
                await then()
            except Exception as exc:  # noqa: BLE001 - re-raised plainly below
                error = error or exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return stopped
