"""Pushed tasks from a ``WebhookReceiver``, handed to the jobs of one client waiting on them.

With webhooks, the service POSTs a finished task to the receiver instead of being
asked. A ``PushRouter`` listens on one receiver for one client (one listener however
many jobs wait) and calls the waiting job's callback with the pushed task, which is
then the job's result, with no confirming query. It never loses a job to a lost
callback: jobs still poll, rarely (the safety net in ``PollPolicy``), so a dropped
push only makes its job slower.

A push can arrive before the submit answer (the service is fast, the answer slow):
``expect`` first asks the receiver whether the task was already pushed. A receiver
served in another thread (a web server of its own) calls the listener there; the
task then crosses into this client's event loop with ``anyio.from_thread``.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import anyio.from_thread
import anyio.lowlevel

if TYPE_CHECKING:
    from collections.abc import Callable

    from .types import Task
    from .webhooks import WebhookReceiver

__all__ = ["PushRouter"]

logger = logging.getLogger("apimart_async.webhooks")


class PushRouter:
    """Routes one receiver's pushes to this client's waiting jobs, by task id."""

    __slots__ = ("_thread", "_token", "_unsubscribe", "_waiting", "receiver")

    def __init__(self, receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        self._waiting: dict[str, Callable[[Task], None]] = {}
        # Created inside the client's event loop: what a push from elsewhere needs.
        self._thread = threading.get_ident()
        self._token = anyio.lowlevel.current_token()
        self._unsubscribe = receiver.add_listener(self._on_push)

    def expect(self, task_id: str, on_push: Callable[[Task], None]) -> Task | None:
        """Call *on_push(task)* when *task_id* is pushed; or return it if it already was."""
        receiver = self.receiver
        pushed = receiver.get(task_id)
        if pushed is not None:
            return pushed
        self._waiting[task_id] = on_push
        # A push handled in another thread between the two looks is stored first.
        pushed = receiver.get(task_id)
        if pushed is not None:
            self._waiting.pop(task_id, None)
        return pushed

    def forget(self, task_id: str) -> None:
        """The job of *task_id* ended (or stopped waiting): its push is of no use."""
        self._waiting.pop(task_id, None)

    def close(self) -> None:
        """Stop listening (the client is closing)."""
        self._unsubscribe()
        self._waiting.clear()

    def _on_push(self, task: Task) -> None:
        if threading.get_ident() == self._thread:
            self._deliver(task)
            return
        try:
            anyio.from_thread.run_sync(self._deliver, task, token=self._token)
        except RuntimeError:  # the client's loop has ended: nobody waits any more
            logger.debug("push for task %s arrived after the client's loop ended", task.id)

    def _deliver(self, task: Task) -> None:
        on_push = self._waiting.pop(task.id, None)
        if on_push is not None:
            on_push(task)
