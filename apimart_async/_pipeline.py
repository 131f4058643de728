"""``generate_many``: many pipelines in one task group, outcomes streamed as they finish.

Shape (all structured; nothing outlives the ``async with``)::

    run() ── task group ── drive ── task group ──┬── starters (≤ uploads + submits)
          │                                      │     pull a request, upload, submit
          │                                      ├── scheduler: one heap of waiting
          │                                      │     jobs, ordered by next poll
          │                                      ├── poll workers (≤ polls_in_flight)
          │                                      │     query a due task, re-schedule
          │                                      │     it or settle its outcome
          │                                      └── downloads, one per finished job
          │                                            (only with download_to)
          └── yields the outcomes as they are settled

A waiting job owns no task: it is a small record in the scheduler's heap. Most of a
pipeline's life is spent waiting for the service, so 10,000 jobs in flight cost 10,000
records, not 10,000 suspended tasks with their frames, cancel scopes and timers; a task
is spent only where work happens (an upload, a submit, a query). *concurrency* bounds
jobs in flight: a starter takes a slot before it pulls a request, and the slot comes
back when the caller takes that job's outcome, so read-ahead and buffered outcomes are
bounded too, and settling an outcome never waits for the caller.

A job turns every ``Exception`` into its own ``Outcome`` (typed errors from the client,
``ValueError`` subclasses for bad input), so one failure never cancels a sibling and no
``ExceptionGroup`` reaches the caller; only cancellation propagates. The outcome stream
is a memory object stream rather than a generator yielding from inside the task group,
which anyio forbids. Leaving the ``async with`` early cancels the group: in-flight HTTP
calls are abandoned (submits excepted, which the client shields for a bounded time so a
created task is still reported), waiting jobs are dropped with the heap, and
connections go back to the pool.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc

from . import _jobs
from ._clock import now
from ._download import download_images
from ._events import emit, new_idempotency_key
from ._exceptions import (
    AuthenticationError,
    BudgetExceededError,
    InsufficientBalanceError,
    SubmissionUncertainError,
)
from ._jobs import Job
from .models import BaseImageRequest, parse_request
from .types import DownloadedEvent, Event, Outcome, Task, TaskStatus

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncGenerator

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from ._budget import Budget
    from ._config import Limits
    from ._jobs import Resources
    from ._pushes import PushRouter

__all__ = ["OutcomeStream", "Pipeline"]

logger = logging.getLogger("apimart_async.pipeline")


def _outcome(
    job: Job, task: Task | None, error: Exception | None = None, files: tuple[Any, ...] = ()
) -> Outcome:
    """The job's one ``Outcome``."""
    return Outcome(job.index or 0, job.item, task, error, job.timings, files, job.key)


class OutcomeStream:
    """The outcomes of a ``generate_many`` run, as they finish; and what they cost.

    Iterate it (``async for outcome in stream``); taking an outcome frees its job's
    place. While and after iterating, *spent* is what the finished tasks cost (USD, as
    the service reported), *cost_unknown* how many submitted jobs have no known cost
    (the service did not say, the submit was uncertain, or the task was still running
    at the deadline), and *stopped* the error that ended submitting early (a budget,
    or a 402/401 from the service), if one did.
    """

    __slots__ = ("_pipeline", "_receive", "_slots")

    def __init__(
        self,
        receive: MemoryObjectReceiveStream[Outcome],
        slots: anyio.Semaphore,
        pipeline: Pipeline,
    ) -> None:
        self._receive = receive
        self._slots = slots
        self._pipeline = pipeline

    def __aiter__(self) -> OutcomeStream:
        return self

    async def __anext__(self) -> Outcome:
        try:
            try:
                # A waiting outcome is taken at once: no trip through the event loop.
                outcome = self._receive.receive_nowait()
            except anyio.WouldBlock:
                outcome = await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        self._slots.release()
        return outcome

    @property
    def spent(self) -> float:
        """USD the finished tasks of this run cost, as the service reported."""
        return self._pipeline.budget.spent

    @property
    def cost_unknown(self) -> int:
        """Submitted jobs of this run whose cost is not known."""
        return self._pipeline.cost_unknown

    @property
    def stopped(self) -> BaseException | None:
        """What ended submitting early (``BudgetExceededError``, 402, 401), if anything."""
        return self._pipeline.stop


class _Source:
    """The caller's requests, pulled one at a time by whichever worker is free.

    Pulls are serialised (an async source may suspend mid-pull), so indices follow the
    input order. A source that raises is treated as exhausted and its error kept, to be
    raised plainly once the jobs already started have finished.
    """

    __slots__ = ("_async", "_iter", "_lock", "error", "exhausted", "pulled")

    def __init__(self, items: Iterable[Any] | AsyncIterable[Any]) -> None:
        self._async = isinstance(items, AsyncIterable)
        self._iter: Iterator[Any] | AsyncIterator[Any] = (
            aiter(items) if isinstance(items, AsyncIterable) else iter(items)
        )
        self._lock = anyio.Lock(fast_acquire=True)
        self.error: BaseException | None = None
        self.exhausted = False
        self.pulled = 0

    async def next(self) -> tuple[int, Any] | None:
        """The next (index, request), or None once the input is spent or broken."""
        if not self._async:
            return await self._pull()  # a plain iterator never suspends mid-pull
        async with self._lock:
            return await self._pull()

    async def _pull(self) -> tuple[int, Any] | None:
        if self.exhausted:
            return None
        try:
            if self._async:
                item = await anext(cast("AsyncIterator[Any]", self._iter))
            else:
                item = next(cast("Iterator[Any]", self._iter))
        except (StopIteration, StopAsyncIteration):
            self.exhausted = True
            return None
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            # SystemExit or KeyboardInterrupt too: raised in the caller's task, not
            # from deep in the pipeline's task group.
            self.error = exc
            self.exhausted = True
            return None
        index = self.pulled
        self.pulled += 1
        return index, item

    async def aclose(self) -> None:
        """Close an async source (a generator's ``finally`` runs), however we stopped."""
        aclose = getattr(self._iter, "aclose", None) if self._async else None
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


class Pipeline:
    """One ``generate_many`` run; see the module docstring."""

    def __init__(
        self,
        res: Resources,
        *,
        concurrency: int,
        fail_fast: bool,
        timeout: float | None,
        download_to: str | os.PathLike[str] | None,
        on_event: Callable[[Event], Any] | None,
        allow_unknown: bool,
        idempotency_keys: Callable[[int, Any], str | None] | None,
        known_tasks: Callable[[int, Any], str | None] | None,
        limits: Limits,
        budget: Budget,
        webhook_url: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._res = res
        self._concurrency = concurrency
        self._fail_fast = fail_fast
        self._timeout = timeout
        self._download_to = download_to
        self._on_event = on_event
        self._allow_unknown = allow_unknown
        self._keys = idempotency_keys
        self._known = known_tasks
        # More starters or poll workers than the client lets run at once (its stage
        # limits, its connection pool) would only queue, each holding its job's state.
        self._max_starters = min(concurrency, limits.uploads + limits.submits, limits.connections)
        self._max_pollers = min(concurrency, limits.polls_in_flight, limits.connections)
        self._poll_bound = res.call_bound
        self._starters = 0  # alive
        self._pollers = 0  # alive
        self._active = 0  # jobs pulled and not yet settled
        self._heap: list[tuple[float, int, Job, int]] = []  # (due, order, job, version)
        self._order = itertools.count()  # heap tie-break: jobs are never compared
        self._wake: anyio.Event | None = None  # set to wake a sleeping scheduler
        self._ready: deque[Job] = deque()  # due now, for the next free poll worker
        self._idle: deque[anyio.Event] = deque()  # one per idle poll worker
        self._group: anyio.abc.TaskGroup | None = None
        self._closing = False  # set before the group is cancelled: start nothing more
        self._send: MemoryObjectSendStream[Outcome] | None = None
        # Jobs pulled and not settled: what a run cut short must account for.
        self._live: set[Job] = set()
        # The spending side: what each admitted job reserved, and what stopped submits.
        self.budget = budget
        self._admitted: dict[Job, tuple[str, int, float | None]] = {}
        self.stop: BaseException | None = None
        self.cost_unknown = 0
        # Webhooks: the URL every request gets unless it names its own, and the
        # router of the receiver behind it (then results are pushed, polls rare).
        self._webhook_url = webhook_url
        self.pushes: PushRouter | None = None  # set on entry, inside the loop

    @asynccontextmanager
    async def run(
        self, requests: Iterable[Any] | AsyncIterable[Any]
    ) -> AsyncGenerator[OutcomeStream, None]:
        """Start the jobs; yield the stream of their outcomes; cancel what is left."""
        source = _Source(requests)
        # Unbounded, yet it never holds more than *concurrency* outcomes: a slot is
        # freed only when the caller takes an outcome, so settling never waits on it.
        send, receive = anyio.create_memory_object_stream[Outcome](math.inf)
        slots = anyio.Semaphore(self._concurrency, fast_acquire=True)
        # What the caller's block raised is re-raised as it is, after the group has
        # ended, not wrapped in an ExceptionGroup by it (cancellation included).
        body_error: BaseException | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drive, source, send, slots)
                try:
                    yield OutcomeStream(receive, slots, self)
                except BaseException as exc:  # noqa: BLE001 - re-raised below
                    body_error = exc
                finally:
                    self._closing = True
                    tg.cancel_scope.cancel()
            if body_error is not None:
                raise body_error
        finally:
            self._untaken(receive)
            receive.close()
            self._cut_short()
        if source.error is not None:
            raise source.error

    async def _drive(
        self, source: _Source, send: MemoryObjectSendStream[Outcome], slots: anyio.Semaphore
    ) -> None:
        self._send = send
        try:
            async with send:
                try:
                    async with anyio.create_task_group() as group:
                        self._group = group
                        group.start_soon(self._schedule)
                        self._starters = 1
                        group.start_soon(self._starter, source, slots)
                finally:
                    self._group = None  # no task starts any more (a late push finds no one)
        finally:
            await source.aclose()

    def _end_if_done(self) -> None:
        # Everything pulled is settled and no starter will pull again: stop the
        # scheduler and idle workers, which closes the outcome stream.
        if self._starters == 0 and self._active == 0 and self._group is not None:
            self._closing = True
            self._group.cancel_scope.cancel()

    # -- starting: pull, upload, submit -------------------------------------------

    async def _starter(self, source: _Source, slots: anyio.Semaphore) -> None:
        try:
            while not source.exhausted:
                await slots.acquire()
                pulled = await source.next()
                if pulled is None:
                    slots.release()
                    return
                if self._starters < self._max_starters and not source.exhausted:
                    # The input goes on: one more starter, up to the limit.
                    self._starters += 1
                    self._spawn(self._starter, source, slots)
                self._active += 1
                await self._start(*pulled)
        finally:
            self._starters -= 1
            self._end_if_done()

    async def _start(self, index: int, item: Any) -> None:
        job = Job(key="", timeout=self._timeout, on_event=self._on_event, index=index, item=item)
        try:
            job.key = (self._keys(index, item) if self._keys else None) or new_idempotency_key()
            known = self._known(index, item) if self._known else None
            if known:
                job.task = Task(id=known, status=TaskStatus.SUBMITTED)
                job.fresh = False
            else:
                request = job.request = self._request(item)
                job.model = request.model
                if self.pushes is not None and request.webhook == self.pushes.receiver.webhook_url:
                    job.pushes = self.pushes
            self._live.add(job)
            _jobs.open_span(self._res, job, "apimart.job")
            if not known:
                if self.stop is not None:  # nothing of this job is even uploaded
                    raise self._stopped()
                job.gate = self
                await _jobs.submit(self._res, job)
                if job.pushes is not None:
                    _jobs.listen(job, functools.partial(self._pushed, job))
        except Exception as exc:  # noqa: BLE001 - every failure is this job's outcome
            await self._failed(job, exc)
            return
        # A fresh task's first poll waits a moment; a known one is polled now, by this
        # starter: a job due now is polled by the task that already has it.
        delay = job.begin_waiting(self._res)
        if delay > 0:
            self._wait(job, delay)
        else:
            await self._poll_due(job)

    def _untaken(self, receive: MemoryObjectReceiveStream[Outcome]) -> None:
        """Outcomes settled but never taken (the caller left early): their tasks, paid
        and maybe with results, are the client's now."""
        while True:
            try:
                outcome = receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return
            task = outcome.task
            if task is not None and task.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
                self._res.keeper.adopt(
                    task,
                    outcome.idempotency_key or "",
                    "generate_many ended before this outcome was taken",
                )

    def _cut_short(self) -> None:
        """The run ended with jobs under way (left early, cancelled, fail_fast)."""
        for job in self._live:
            _jobs.unlisten(job)  # a late push finds no job, and no finished task group
            _jobs.abandon(self._res, job, "generate_many ended before this job's outcome")
            _jobs.close_span(self._res, job, "cancelled")
        self._live.clear()

    def _request(self, item: Any) -> BaseImageRequest:
        request = (
            item
            if isinstance(item, BaseImageRequest)
            else parse_request(item, allow_unknown=self._allow_unknown)
        )
        if self._webhook_url is not None and request.webhook is None:
            request = parse_request(request, webhook=self._webhook_url)
        return request

    # -- the spending side: budgets, and a 402/401 that stops every submit ---------

    def admit_now(self, job: Job) -> bool:
        """``Gate``: reserve the job's place in the budget if nothing needs waiting."""
        model, images = self._asking(job)
        try:
            admitted, estimate = self.budget.try_admit(model, images)
        except BudgetExceededError as exc:
            self._halt(exc)
            raise
        if admitted:
            self._admitted[job] = (model, images, estimate)
        return admitted

    async def admit(self, job: Job) -> None:
        """``Gate``: reserve the job's place in the budget (may wait, or refuse)."""
        model, images = self._asking(job)
        try:
            estimate = await self.budget.admit(model, images)
        except BudgetExceededError as exc:
            self._halt(exc)
            raise
        self._admitted[job] = (model, images, estimate)

    def _asking(self, job: Job) -> tuple[str, int]:
        """What *job* asks the budget for (model, images); the stop, if spending ended."""
        if self.stop is not None:
            raise self._stopped()
        request = job.request
        assert request is not None
        return request.model, request.image_count()

    def check(self, job: Job) -> None:
        """``Gate``: right before sending, refuse if submitting stopped meanwhile."""
        if self.stop is not None:
            admitted = self._admitted.pop(job, None)
            if admitted is not None:
                self.budget.release(*admitted)
            raise self._stopped()

    def _halt(self, error: BaseException) -> None:
        """Start no more submits: a budget is reached, or the service said 402/401."""
        if self.stop is None:
            self.stop = error
            logger.warning("generate_many stops submitting: %s", error)

    def _stopped(self) -> BaseException:
        # Each job gets its own error, raised from the one that stopped the run.
        stop = self.stop
        assert stop is not None
        # A copy of the same class and attributes (copy.copy would call __init__ with
        # the message alone, which our errors' keyword-only signatures refuse).
        error = type(stop).__new__(type(stop))
        error.__dict__.update(stop.__dict__)
        error.args = stop.args
        if not isinstance(stop, BudgetExceededError):
            error.__cause__ = stop
        return error

    def _account(self, job: Job, outcome: Outcome) -> None:
        """What the job's outcome means for the budget (and the 402/401 stop)."""
        error, task = outcome.error, outcome.task
        if task is None and isinstance(error, InsufficientBalanceError | AuthenticationError):
            self._halt(error)
        admitted = self._admitted.pop(job, None)
        if admitted is None:
            return
        status = task.status if task is not None else None
        if status is TaskStatus.COMPLETED:
            assert task is not None
            self.budget.settle(*admitted, task.cost)
            if task.cost is None:
                self.cost_unknown += 1
        elif status in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            self.budget.release(*admitted)  # refunded by the service
        elif task is None and not isinstance(error, SubmissionUncertainError):
            self.budget.release(*admitted)  # refused: nothing was created
        else:  # uncertain, or still running at the deadline: it may yet cost
            model, _, estimate = admitted
            self.budget.unresolved(model, estimate)
            self.cost_unknown += 1

    # -- waiting: the scheduler and the poll workers ------------------------------

    def _wait(self, job: Job, delay: float) -> None:
        """Queue *job* for a poll in *delay* seconds (or at its deadline)."""
        due = min(now() + delay, job.deadline)
        job.queued = True
        heapq.heappush(self._heap, (due, next(self._order), job, job.version))
        if self._wake is not None and self._heap[0][2] is job:
            self._wake.set()  # the sleeping scheduler aimed later than this

    def _pushed(self, job: Job) -> None:
        """Its result was pushed: a job waiting in the heap is due now."""
        if self._closing or self._group is None:
            # The run is ending: a task started now could miss the cancellation and
            # keep the group open forever; the run's end accounts for the job.
            return
        if job.queued:  # else a task is busy with it and will see the push
            job.queued = False
            job.version += 1  # its heap entry is now stale
            self._ready.append(job)
            try:
                self._dispatch()
            except RuntimeError:
                # The group is closing (trio refuses new tasks once every child has
                # ended, before its host task resumes): the run's end accounts for it.
                pass

    def _dispatch(self) -> None:
        """Wake (or start) a poll worker for each job ready now, up to the limit."""
        waiting = len(self._ready)
        while waiting and self._idle:
            self._idle.popleft().set()
            waiting -= 1
        while waiting and self._pollers < self._max_pollers:
            self._pollers += 1
            self._spawn(self._poll_worker)
            waiting -= 1
        # Any rest is taken by busy workers as they finish.

    async def _schedule(self) -> None:
        """Move jobs from the heap to the ready queue as they come due; sleep otherwise."""
        heap = self._heap
        while True:
            current = now()
            if heap and heap[0][0] <= current:
                while heap and heap[0][0] <= current:
                    _, _, job, version = heapq.heappop(heap)
                    if version == job.version:  # else a push took it out already
                        job.queued = False
                        self._ready.append(job)
                self._dispatch()
            wake = self._wake = anyio.Event()
            with anyio.CancelScope(deadline=heap[0][0] if heap else math.inf):
                await wake.wait()
            self._wake = None

    async def _poll_worker(self) -> None:
        ready = self._ready
        while True:
            while ready:
                await self._poll_due(ready.popleft())
            wake = anyio.Event()
            self._idle.append(wake)
            await wake.wait()

    async def _poll_due(self, job: Job) -> None:
        """Poll a due job until it settles or is due again later (then back to the heap)."""
        while True:
            if job.deadline <= now():
                await self._failed(job, job.timed_out())
                return
            delay = await self._poll(job)
            if delay is None:
                return
            if delay > 0 and job.pushed is None:
                self._wait(job, delay)
                return

    async def _poll(self, job: Job) -> float | None:
        """One query: the delay until the next, or None once the job is settled."""
        res = self._res
        # A query that cannot outlive the deadline needs no cancel scope. That bound
        # is the request's own time and its retries; waiting for the poll budget or a
        # poll slot shared with other batches can add to it, and a job whose deadline
        # passes meanwhile settles as timed out at its next turn.
        scope = None
        if job.deadline - now() <= self._poll_bound:
            scope = anyio.CancelScope(deadline=job.deadline)
        try:
            with scope or contextlib.nullcontext():
                delay = await _jobs.poll_once(res, job)
            if scope is not None and scope.cancelled_caught:
                await self._failed(job, job.timed_out())
                return None
            if delay is not None:
                return delay
            task = await _jobs.settle(job)
        except Exception as exc:  # noqa: BLE001 - every failure is this job's outcome
            job.timings["wait"] = now() - job.waiting_since
            await self._failed(job, exc)
            return None
        if self._download_to is None:
            self._settle(job, _outcome(job, task))
        else:
            self._spawn(self._download, job, task)  # the poller stays free
        return None

    # -- settling ------------------------------------------------------------------

    async def _download(self, job: Job, task: Task) -> None:
        assert self._download_to is not None
        try:
            t0 = now()
            paths = await download_images(
                self._res, task, self._download_to, names=None, overwrite=True, span=job.span
            )
            job.timings["download"] = now() - t0
            files = tuple(paths)
            event = DownloadedEvent(task.id, files, now() - job.started, job.index)
            await emit(self._on_event, event)
        except Exception as exc:  # noqa: BLE001 - every failure is this job's outcome
            await self._failed(job, exc)
            return
        self._settle(job, _outcome(job, task, files=files))

    async def _failed(self, job: Job, exc: Exception) -> None:
        task = await _jobs.fail(job, exc)
        self._settle(job, _outcome(job, task, exc))

    def _settle(self, job: Job, outcome: Outcome) -> None:
        assert self._send is not None
        self._active -= 1
        self._account(job, outcome)
        _jobs.unlisten(job)
        self._live.discard(job)
        _jobs.close_span(self._res, job, outcome.error)
        try:
            self._send.send_nowait(outcome)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the caller has left; the run is being cancelled
        if self._fail_fast and outcome.error is not None and self._group is not None:
            self._closing = True
            self._group.cancel_scope.cancel()
        self._end_if_done()

    def _spawn(self, func: Callable[..., Any], *args: Any) -> None:
        # Once the run is ending nothing new starts: a task started then could miss
        # the cancellation and hold the group open.
        if self._closing:
            return
        assert self._group is not None
        self._group.start_soon(func, *args)


# Re-exported by the package root: shown as ``apimart_async.OutcomeStream``.
OutcomeStream.__module__ = "apimart_async"
