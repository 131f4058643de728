"""Paid submits run as the client's own tasks, where callers' cancellation cannot reach.

Once a submit may be on the wire, the service may be creating (and billing) a task,
and the only record of its id is the answer on the way back. So the request does not
run in the caller's task: it runs in a task the client owns and tracks
(``SubmitKeeper``; on asyncio a task of the loop, on trio a system task), and the
caller only waits for it. Cancelling the caller, by any means (an anyio or trio
scope, ``asyncio.wait_for``, ``asyncio.timeout``, ``Task.cancel()``, a failing sibling
in an ``asyncio.TaskGroup``), ends the caller's wait at once; the request goes on:

* with nobody cancelling, a submit has its full request timeout and retries: nothing
  cuts a live request short;
* once its caller is gone, it gets at most ``shield`` more seconds, and no new attempt
  starts (a new attempt could only create a task nobody waits for);
* the answer, if a task was created, is reported three ways: a ``SubmittedEvent`` to
  the caller's ``on_event``, a WARNING on ``apimart_async.submit`` naming the task id
  and the idempotency key, and ``AsyncApimart.orphaned_tasks()``; an uncertain outcome
  is a ``FailedEvent`` and a WARNING with the key.

Closing the client gives in-flight submits up to ``shield`` seconds, then reports
what it abandoned (a WARNING with each idempotency key). A loop that ends with
submits in flight (no ``aclose``) cancels them; they report themselves the same way.
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import anyio

from ._clock import now
from ._events import emit
from ._exceptions import SubmissionUncertainError
from ._runtime import spawn_detached
from .types import FailedEvent, SubmittedEvent, Task

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._events import EventHandler

__all__ = ["Flight", "SubmitKeeper"]

logger = logging.getLogger("apimart_async.submit")

# Orphans nobody collects are kept up to this many (oldest dropped, with a warning each).
MAX_ORPHANS = 10_000


class Flight:
    """One paid submit handed to the keeper: its identity, and how it ended."""

    __slots__ = (
        "abandoned",
        "body",
        "deadline",
        "done",
        "error",
        "job",
        "key",
        "maybe_created",
        "on_event",
        "release",
        "scope",
        "started",
        "task",
    )

    def __init__(
        self,
        key: str,
        body: dict[str, Any],
        *,
        on_event: EventHandler | None,
        job: int | None,
        started: float,
        release: Callable[[], None],
    ) -> None:
        self.key = key
        self.body = body
        self.on_event = on_event
        self.job = job
        self.started = started
        self.release = release  # frees the submit slot the caller took
        self.done = anyio.Event()
        self.task: Task | None = None
        self.error: BaseException | None = None
        self.abandoned = False
        self.maybe_created = False  # an attempt may have created a task
        self.deadline = float("inf")
        self.scope: anyio.CancelScope | None = None

    def limit(self, deadline: float) -> None:
        """Let this submit run until *deadline* at the latest."""
        self.deadline = min(self.deadline, deadline)
        if self.scope is not None:
            self.scope.deadline = self.deadline


class SubmitKeeper:
    """Runs each paid submit as a task of the client's own; see the module docstring."""

    __slots__ = ("_closed", "_flights", "_idle", "_orphans", "shield")

    def __init__(self, shield: float) -> None:
        self.shield = shield
        self._idle: anyio.Event | None = None
        self._flights: dict[Flight, object] = {}  # in flight -> its task (kept alive)
        self._orphans: OrderedDict[str, Task] = OrderedDict()
        self._closed = False

    async def run(self, flight: Flight, send: Callable[[Flight], Awaitable[Task]]) -> Task:
        """Run ``send(flight)`` as the client's task; wait for its answer here.

        If the caller is cancelled while waiting, the submit is handed over (see the
        module docstring) and the cancellation propagates at once.
        """
        if self._closed:
            flight.release()  # never launched: nothing was sent
            raise RuntimeError("this AsyncApimart client is closed; create a new one")
        self._flights[flight] = spawn_detached(functools.partial(self._fly, flight, send))
        try:
            await flight.done.wait()
        except BaseException:
            self._abandon(flight)
            raise
        if flight.error is not None:
            raise flight.error
        assert flight.task is not None
        return flight.task

    def orphans(self) -> list[Task]:
        """Take the tasks whose submit finished after their caller was cancelled."""
        tasks = list(self._orphans.values())
        self._orphans.clear()
        return tasks

    def adopt(self, task: Task, key: str, why: str) -> None:
        """Keep *task*, which its caller will not hear of (*why*): log it, hold it."""
        self._orphans[task.id] = task
        while len(self._orphans) > MAX_ORPHANS:
            dropped, _ = self._orphans.popitem(last=False)
            logger.warning(
                "orphaned task %s dropped: more than %d uncollected", dropped, MAX_ORPHANS
            )
        logger.warning(
            "%s: task %s (idempotency key %s) goes on at the service; collect it with "
            "client.orphaned_tasks() or client.wait(%r)",
            why,
            task.id,
            key,
            task.id,
            extra={"apimart.task_id": task.id, "apimart.idempotency_key": key},
        )

    async def aclose(self) -> None:
        """Give in-flight submits up to ``shield`` seconds; return once all have ended."""
        self._closed = True
        if not self._flights:
            return
        with anyio.CancelScope(shield=True):
            deadline = now() + self.shield
            for flight in list(self._flights):
                flight.limit(deadline)
            if self._flights:
                self._idle = anyio.Event()
                await self._idle.wait()

    # -- one submit -------------------------------------------------------------------

    async def _fly(self, flight: Flight, send: Callable[[Flight], Awaitable[Task]]) -> None:
        """The submit's own task: never raises (on trio it is a system task)."""
        try:
            with anyio.CancelScope(deadline=flight.deadline) as scope:
                flight.scope = scope
                try:
                    flight.task = await send(flight)
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    # Handed to the caller, SystemExit from a callback too: on trio an
                    # exception escaping this task would end the whole run.
                    flight.error = exc
        finally:
            if flight.task is None and flight.error is None:
                # Cut short while the request may have been on the wire.
                reason = (
                    f"no answer within {self.shield:g}s after its caller was cancelled"
                    if flight.abandoned and now() >= flight.deadline
                    else "the client or its event loop closed before the answer came"
                )
                flight.error = SubmissionUncertainError(
                    idempotency_key=flight.key, request=flight.body, reason=reason
                )
                _log(flight)
            flight.release()
            flight.done.set()
            if flight.abandoned:
                with anyio.CancelScope(shield=True):
                    await self._report(flight)
            # Only now: closing the client waits until every report was made.
            self._landed(flight)

    def _abandon(self, flight: Flight) -> None:
        """The caller stopped waiting: bound the submit, and report it when it ends."""
        flight.abandoned = True
        if not flight.done.is_set():
            flight.limit(now() + self.shield)
        else:
            # It ended just as the caller was cancelled: the caller never took it.
            # Tracked like a flight, so closing the client waits for this report too.
            self._flights[flight] = spawn_detached(functools.partial(self._late_report, flight))

    async def _late_report(self, flight: Flight) -> None:
        try:
            with anyio.CancelScope(shield=True):
                await self._report(flight)
        finally:
            self._landed(flight)

    def _landed(self, flight: Flight) -> None:
        """*flight* is over, its report made: wake ``aclose`` once none is left."""
        self._flights.pop(flight, None)
        if not self._flights and self._idle is not None:
            self._idle.set()

    async def _report(self, flight: Flight) -> None:
        """Report a submit whose caller left: never raises (this is the client's task)."""
        task, error = flight.task, flight.error
        if task is not None:
            self.adopt(task, flight.key, "a submit finished after its caller was cancelled")
        if flight.on_event is None or (
            task is None and not isinstance(error, SubmissionUncertainError)
        ):
            return
        elapsed = now() - flight.started
        event = (
            SubmittedEvent(task.id, elapsed, flight.job)
            if task is not None
            else FailedEvent(error or RuntimeError("submit ended"), None, elapsed, flight.job)
        )
        try:
            await emit(flight.on_event, event)
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            # SystemExit too: nobody is left to raise it to, and on trio it would end
            # the whole run.
            logger.warning("on_event raised while reporting an orphaned submit", exc_info=True)


def _log(flight: Flight) -> None:
    error = flight.error
    if isinstance(error, SubmissionUncertainError):
        logger.warning(
            "submit cut short, its outcome is unknown (%s): a task may exist; "
            "resubmit only with idempotency key %s",
            error.reason,
            flight.key,
            extra={"apimart.idempotency_key": flight.key},
        )
