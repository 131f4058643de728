"""The blocking client's machinery: one event loop on a thread, and calls handed to it.

``Runner`` owns the loop (anyio's blocking portal on a daemon thread) and hands each
blocking call to it as a ``_Call``, which the caller's thread waits on; Ctrl-C in the
caller cancels the call on the loop before ``KeyboardInterrupt`` is raised. ``_Batch``
pumps a ``generate_many`` run's outcomes to ``OutcomeIterator`` through a small queue,
a few ahead of the reader. Callbacks that run on the loop thread are wrapped
(``carried``) so that a ``SystemExit`` in them is carried back to the caller's thread
instead of ending the loop. ``Apimart`` (``_sync``) is the public face of all this.
"""

from __future__ import annotations

import enum
import inspect
import logging
import queue
import sys
import threading
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import anyio
from anyio.from_thread import start_blocking_portal

from ._clock import running_asyncio_loop
from ._exceptions import ApimartError
from .types import Outcome, Task

if TYPE_CHECKING:
    from collections.abc import (
        AsyncIterator,
        Awaitable,
        Callable,
        Generator,
        Iterable,
        Iterator,
    )
    from contextlib import AbstractAsyncContextManager, AbstractContextManager

    from anyio.from_thread import BlockingPortal

    from ._client import AsyncApimart
    from ._pipeline import OutcomeStream

__all__ = ["CLOSED", "OutcomeIterator", "Runner", "carried", "carried_items", "finalize"]

logger = logging.getLogger("apimart_async.submit")

T = TypeVar("T")
F = TypeVar("F", bound="Callable[..., Any]")

CLOSED = "this Apimart client is closed; create a new one"
_CLOSED_WHILE_RUNNING = (
    "the Apimart client was closed (or its event loop ended) while this call ran"
)
_LOOP_ENDED = (
    "the event loop of this Apimart client has ended (a callback ended it?); create a new client"
)
# Outcomes a batch's pump may take before the caller asks for them, and how many must
# be asked for before a parked pump is woken (see _Batch).
_PREFETCH = 8
_WAKE_AT = 4
_WORKER_JOIN_TIMEOUT = 30.0


class _Call(Generic[T]):
    """One coroutine function handed to the loop, and how it ended.

    The caller registers the call *before* it is spawned, since a Ctrl-C can land while
    the portal is still spawning it (anyio may even run it then). Whether it started
    and whether it should is decided on the loop alone: ``run`` and ``abort`` both run
    there, so an abort either cancels a running call or stops it from ever starting.
    ``done`` is set once the coroutine has fully unwound.
    """

    __slots__ = ("aborted", "cancelled", "done", "error", "escaped", "func", "result", "scope")

    result: T

    def __init__(self, func: Callable[[], Awaitable[T]]) -> None:
        self.func = func
        self.done = threading.Event()
        self.scope: anyio.CancelScope | None = None  # set once started
        self.aborted = False
        self.cancelled = False
        self.error: Exception | None = None
        # A non-Exception (SystemExit) that user code raised on the loop's thread and no
        # _Escape carried: the caller's to raise, never the loop's (it would end it).
        self.escaped: BaseException | None = None

    async def run(self) -> None:
        """On the loop: run the function (unless aborted first) and record its end."""
        try:
            if self.aborted:
                return
            with anyio.CancelScope() as self.scope:
                self.result = await self.func()
            self.cancelled = self.scope.cancelled_caught
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread
            self.error = exc
        except anyio.get_cancelled_exc_class():
            self.cancelled = True
            raise  # the loop itself is ending
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.escaped = exc
        finally:
            self.done.set()

    def abort(self) -> bool:
        """On the loop: cancel the call, or keep it from starting; whether it started."""
        self.aborted = True
        if self.scope is None:
            return False
        self.scope.cancel()
        return True

    def outcome(self) -> T:
        """After ``done``: the result, or the error, as the caller's thread sees it."""
        if self.escaped is not None:
            raise _sole(self.escaped)  # not in the group of one a task group made
        if isinstance(self.error, _Escape):
            raise self.error.carried
        if self.error is not None:
            raise self.error
        if self.scope is None or self.cancelled:
            raise RuntimeError(_CLOSED_WHILE_RUNNING)
        return self.result


class Runner:
    """One ``AsyncApimart`` on one event loop in a daemon thread, and its calls in flight.

    Kept apart from ``Apimart`` so the finalizer can own it without keeping the client
    alive. Every call is tracked until its caller has its answer, so ``close()`` can
    cancel the ones still running and wait until each has unwound.
    """

    def __init__(self, build: Callable[[], AsyncApimart], backend: str) -> None:
        # Built here unless an event loop runs in this thread: anyio would then bind
        # the client's locks to that loop, not ours. Either way its errors (a missing
        # key) reach the caller of ``Apimart(...)``.
        client = None if _loop_running_here() else build()
        self._portal_cm: AbstractContextManager[BlockingPortal] = start_blocking_portal(backend)
        self._portal = self._portal_cm.__enter__()
        try:
            self.thread_id = self._portal.call(_adopt_thread)
            self._asyncio_loop = self._portal.call(_asyncio_loop)
            self.client = client if client is not None else self._portal.call(build)
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._lock = threading.Lock()  # guards _calls and closed; never taken on the loop
        self._closing = threading.Lock()  # one close() at a time; a second one waits
        self._calls: set[_Call[Any]] = set()
        self.closed = False
        self._stopped = False

    # -- calls ---------------------------------------------------------------------

    def run(self, func: Callable[[], Awaitable[T]]) -> T:
        """Run ``func()`` on the loop and block until it ends: its result or its error."""
        call = self._start(func)
        try:
            return self._wait(call)
        finally:
            self._forget(call)

    def _start(self, func: Callable[[], Awaitable[T]]) -> _Call[T]:
        if threading.get_ident() == self.thread_id:
            raise RuntimeError(
                "an Apimart client cannot be called from its own thread (an on_event "
                "callback, a generate_many input or key callback); pass the data back "
                "to your thread instead, or use AsyncApimart in async code"
            )
        call = _Call(func)
        with self._lock:  # registered before close() takes stock, or refused
            if self.closed:
                raise RuntimeError(CLOSED)
            self._calls.add(call)
        try:
            self._portal.start_task_soon(call.run)
        except RuntimeError as exc:  # the portal has stopped
            self._forget(call)
            raise RuntimeError(CLOSED if self.closed else _LOOP_ENDED) from exc
        except BaseException as exc:  # interrupted while the portal spawned it
            self._interrupted(call, exc)
            self._forget(call)
            raise
        return call

    def _wait(self, call: _Call[T]) -> T:
        """Block until *call* has ended; its outcome. See ``_interrupted``."""
        try:
            call.done.wait()
        except BaseException as exc:
            self._interrupted(call, exc)
            raise
        return call.outcome()

    def _interrupted(self, call: _Call[Any], exc: BaseException) -> None:
        """Cancel *call* and wait until it has unwound, before *exc* (Ctrl-C) is raised.

        A submit on the wire is not waited for: the client's keeper hears it out and
        reports it. A call that had already returned a task when the abort came gets it
        logged (WARNING) and named in a note on *exc*. A second interrupt during the
        wait abandons it (``close()`` still waits). A call aborted before it started
        (the interrupt came while it was being spawned) never runs: its task, if it was
        spawned at all, ends at its first step.
        """
        try:
            started = self._portal.call(call.abort)
        except RuntimeError:  # the portal stopped: close() already cancelled it
            return
        if not started:
            return
        call.done.wait()
        # It may have ended just before the abort came: a task it made must not be lost.
        ended = call.error if call.error is not None else getattr(call, "result", None)
        if isinstance(ended, Task):
            logger.warning(
                "interrupted as it returned: task %s (%s) had been created; "
                "resume it with client.wait(%r)",
                ended.id,
                ended.status.value,
                ended.id,
                extra={"apimart.task_id": ended.id},
            )
        if isinstance(ended, Task | ApimartError) and sys.version_info >= (3, 11):
            what = f"task {ended.id} ({ended.status.value})" if isinstance(ended, Task) else ended
            exc.add_note(f"apimart_async: the interrupted call had already ended with {what!r}")

    def _forget(self, call: _Call[Any]) -> None:
        with self._lock:
            self._calls.discard(call)

    def on_loop(self, func: Callable[[], T]) -> T:
        """``func()`` on the loop's thread, or here once the loop is gone."""
        with self._closing:  # not while close() is taking the loop down
            if not self._stopped and self._portal_running():
                return self._portal.call(func)
        return func()

    def _portal_running(self) -> bool:
        try:
            self._portal.call(int)
        except RuntimeError:
            return False
        return True

    # -- generate_many ---------------------------------------------------------------

    @contextmanager
    def batch(
        self, acm: AbstractAsyncContextManager[OutcomeStream]
    ) -> Generator[OutcomeIterator, None, None]:
        """Enter a ``generate_many`` batch on the loop; iterate it from this thread.

        An ``Exception`` from the block is passed into the batch (as ``async with``
        would); anything else (Ctrl-C, ``GeneratorExit``) leaves it as a plain exit,
        since a ``KeyboardInterrupt`` thrown into the loop would end the loop itself.
        Either way the block is left only once the batch has unwound.
        """
        batch = _Batch(acm)
        call = self._start(batch.run)
        try:
            self._entered(call, batch)
        except BaseException:
            self._forget(call)
            raise
        try:
            yield OutcomeIterator(self, batch)
        except Exception as exc:
            self._leave(call, batch, exc)
            raise
        except BaseException:
            self._leave(call, batch, None)
            raise
        else:
            self._leave(call, batch, None)

    def _entered(self, call: _Call[None], batch: _Batch) -> None:
        try:
            batch.entered.result()
        except CancelledError:
            pass  # entering failed, or close() aborted it: the call says which
        except BaseException as exc:
            self._interrupted(call, exc)
            raise
        else:
            return
        self._wait(call)
        raise AssertionError("a batch that was never entered ended without an error")

    def _leave(self, call: _Call[None], batch: _Batch, error: Exception | None) -> None:
        try:
            if not call.done.is_set():
                batch.error = error
                self.wake(batch.leave)
            self._wait(call)
        except Exception as exc:
            if error is None or _sole(exc) is not error:
                raise
            # The batch re-raised the block's own error (anyio's task group may have
            # wrapped it in a group of one): the caller raises it as it was.
        finally:
            self._forget(call)

    def wake(self, event: anyio.Event) -> None:
        """Set an event of the loop from this thread (nothing to do once it stopped)."""
        try:
            self._portal.call(event.set)
        except RuntimeError:  # the portal stopped: close() has cancelled its waiter
            pass

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Refuse new calls, cancel running ones and wait for them, close, stop."""
        if threading.get_ident() == self.thread_id:
            raise RuntimeError("an Apimart client cannot be closed from its own thread")
        with self._closing:
            with self._lock:
                self.closed = True
                calls = list(self._calls)
            if self._stopped:
                return
            try:
                for call in self._portal.call(_abort_all, calls):
                    call.done.wait()
                self._portal.call(self.client.aclose)
            except RuntimeError:
                if self._portal_running():
                    raise
                # The loop ended on its own: its tasks were cancelled with it.
            finally:
                self._portal_cm.__exit__(None, None, None)  # stops the loop, joins the thread
                self._stopped = True
            # anyio's worker threads on asyncio (file reads and writes) are told to stop
            # when the loop ends but nobody joins them; they belong to this client. One
            # stuck in a blocking read is left to end on its own (it is a daemon thread).
            for worker in _workers_of(self._asyncio_loop):
                worker.join(_WORKER_JOIN_TIMEOUT)


class _Batch:
    """One ``generate_many`` batch on the loop, and the queue its outcomes cross by.

    One task (``run``) enters the async batch, runs the pump and leaves it. The pump
    moves outcomes into a thread-safe queue as the caller asks for them, up to
    ``_PREFETCH`` ahead of the caller: a caller who keeps up then waits on the queue
    alone, and a burst of outcomes costs it one wake-up, not a round trip through the
    loop per outcome (each round trip is two thread switches, which cost more CPU than
    the rest of a pipeline's client-side work). When the caller falls behind, the pump
    parks, and is woken once per ``_WAKE_AT`` outcomes asked for, or when the caller
    is about to wait. An outcome taken frees its job's slot, so the service still never
    sees more than *concurrency* jobs at once; the read-ahead only lets the input be
    read up to ``_PREFETCH`` items further ahead.
    """

    __slots__ = (
        "_acm",
        "_credit",
        "_lock",
        "_parked",
        "entered",
        "error",
        "finished",
        "items",
        "leave",
        "stream",
    )

    def __init__(self, acm: AbstractAsyncContextManager[OutcomeStream]) -> None:
        self._acm = acm
        self.entered: Future[None] = Future()
        self.error: Exception | None = None
        self.stream: OutcomeStream  # the async batch's, once entered
        self.leave: anyio.Event
        self.finished = False  # set on the loop once the batch has been left
        self.items: queue.SimpleQueue[Outcome | _Marker] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _credit and _parked, across both threads
        self._credit = _PREFETCH  # outcomes the pump may take before they are asked for
        self._parked: anyio.Event | None = None  # the pump waits for credit on it

    async def run(self) -> None:
        """On the loop: enter the batch, pump until told to leave, leave it."""
        try:
            async with self._acm as outcomes:
                self.stream = outcomes
                self.leave = anyio.Event()
                self.entered.set_result(None)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, outcomes)
                    await self.leave.wait()
                    tg.cancel_scope.cancel()
                if self.error is not None:
                    raise self.error
        finally:
            if not self.entered.done():
                self.entered.cancel()  # entering failed or was cancelled: the call says why
            self.finished = True
            self.items.put(_Marker.CLOSED)

    async def _pump(self, outcomes: AsyncIterator[Outcome]) -> None:
        while True:
            with self._lock:
                parked = None
                if self._credit:
                    self._credit -= 1
                else:
                    parked = self._parked = anyio.Event()
            if parked is not None:
                await parked.wait()
                continue
            try:
                outcome = await outcomes.__anext__()
            except StopAsyncIteration:
                self.items.put(_Marker.END)
                return
            self.items.put(outcome)

    def ask(self) -> anyio.Event | None:
        """From the caller: one more outcome wanted; the pump's event, if it is parked
        and it is time to wake it (the caller is about to wait, or half the read-ahead
        is free again: one wake-up per several outcomes, not one per outcome)."""
        with self._lock:
            self._credit += 1
            parked = self._parked
            # While parked the pump puts nothing, so an empty queue stays empty.
            if parked is None or (self._credit < _WAKE_AT and not self.items.empty()):
                return None
            self._parked = None
        return parked


class _Marker(enum.Enum):
    END = "end"  # every outcome was delivered
    CLOSED = "closed"  # the batch was left (or the client closed): nothing more comes


class _Escape(Exception):
    """A ``SystemExit`` (or other non-``Exception``) raised by user code on the loop.

    Left as it is, it would end the event loop (and every call on it), or, from a
    batch's input, leave the batch in an exception group. Carried as an ordinary
    error, it fails what the callback was part of (the input counts as broken), and
    the caller's thread raises the original.
    """

    def __init__(self, carried: BaseException) -> None:
        super().__init__(repr(carried))
        self.carried = carried


def carried(callback: F | None) -> F | None:
    """*callback* (sync, or returning an awaitable), with what it raises that is not an
    ``Exception`` carried as an ``_Escape``."""
    if callback is None:
        return None

    def carried(*args: Any) -> Any:
        try:
            result = callback(*args)
        except Exception:
            raise
        except BaseException as exc:
            raise _Escape(exc) from exc
        return _awaited(result) if inspect.isawaitable(result) else result

    return cast("F", carried)


def carried_items(items: Iterable[Any]) -> Iterator[Any]:
    """*items*, read lazily, with what reading raises that is not an ``Exception`` carried."""
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception:
            raise
        except BaseException as exc:
            raise _Escape(exc) from exc
        yield item


async def _awaited(result: Awaitable[Any]) -> Any:
    try:
        return await result
    except (Exception, anyio.get_cancelled_exc_class()):
        raise
    except BaseException as exc:
        raise _Escape(exc) from exc


class OutcomeIterator:
    """The outcomes of an ``Apimart.generate_many`` batch as they finish; what they cost.

    The blocking twin of ``OutcomeStream``: iterate it (``for outcome in outcomes``);
    *spent*, *cost_unknown* and *stopped* mean what they mean there, during the batch
    and after it.
    """

    __slots__ = ("_batch", "_runner")

    def __init__(self, runner: Runner, batch: _Batch) -> None:
        self._runner = runner
        self._batch = batch

    def __iter__(self) -> OutcomeIterator:
        return self

    @property
    def spent(self) -> float:
        """USD the finished tasks of this batch cost, as the service reported."""
        return self._batch.stream.spent

    @property
    def cost_unknown(self) -> int:
        """Submitted jobs of this batch whose cost is not known."""
        return self._batch.stream.cost_unknown

    @property
    def stopped(self) -> BaseException | None:
        """What ended submitting early (``BudgetExceededError``, 402, 401), if anything."""
        return self._batch.stream.stopped

    def __next__(self) -> Outcome:
        if threading.get_ident() == self._runner.thread_id:
            raise RuntimeError("a generate_many batch cannot be read on the client's thread")
        batch = self._batch
        item: Outcome | _Marker = _Marker.CLOSED
        if not batch.finished:
            parked = batch.ask()
            if parked is not None:
                self._runner.wake(parked)
            item = batch.items.get()  # a Ctrl-C here leaves the block, which cancels
        if isinstance(item, _Marker) or batch.finished:
            # Once the batch is left, an outcome read ahead is dropped with the rest.
            marker = item if isinstance(item, _Marker) else _Marker.CLOSED
            batch.items.put(marker)  # for every later (or concurrent) reader too
            if marker is _Marker.END:
                raise StopIteration
            if self._runner.closed:
                raise RuntimeError(_CLOSED_WHILE_RUNNING)
            raise anyio.ClosedResourceError  # read after the block, as in the async client
        if isinstance(item.error, _Escape):
            raise item.error.carried
        return item


def _abort_all(calls: list[_Call[Any]]) -> list[_Call[Any]]:
    # On the loop: abort every call; the ones that had started, to wait for.
    return [call for call in calls if call.abort()]


def finalize(runner: Runner) -> None:
    # At interpreter exit or garbage collection of an unclosed client. Collection can
    # happen on the client's own thread, which cannot join itself: hand it over.
    if threading.get_ident() == runner.thread_id:
        threading.Thread(target=runner.close, name="apimart-sync-close", daemon=True).start()
    else:
        runner.close()


def _sole(exc: BaseException) -> BaseException:
    """*exc*, or the one exception inside an exception group of one (and so on down)."""
    while True:
        group: object = getattr(exc, "exceptions", ())
        members = cast("tuple[object, ...]", group) if isinstance(group, tuple) else ()
        if len(members) != 1 or not isinstance(members[0], BaseException):
            return exc
        exc = members[0]


def _asyncio_loop() -> object | None:
    # Runs on the portal's thread: its asyncio loop, or None (trio).
    return running_asyncio_loop()


def _workers_of(loop: object | None) -> list[threading.Thread]:
    """The worker threads anyio started for *loop* (they keep a ``loop`` reference)."""
    if loop is None:
        return []  # trio's thread cache is process-wide: its idle threads are trio's
    current = threading.current_thread()
    return [
        t for t in threading.enumerate() if t is not current and getattr(t, "loop", None) is loop
    ]


def _adopt_thread() -> int:
    # Runs on the portal's thread: name it for thread dumps, and say who it is.
    thread = threading.current_thread()
    thread.name = f"apimart-sync-{thread.ident}"
    return threading.get_ident()


def _loop_running_here() -> bool:
    """Whether an async library (asyncio, trio) runs in the current thread."""
    try:
        anyio.get_current_task()
    except RuntimeError:  # NoEventLoopError, or sniffio's AsyncLibraryNotFoundError
        return False
    return True


# Re-exported by the package root: shown as ``apimart_async.OutcomeIterator``.
OutcomeIterator.__module__ = "apimart_async"
