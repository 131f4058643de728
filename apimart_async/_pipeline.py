"""``generate_many``: many pipelines in one task group, outcomes streamed as they finish.

Shape (all structured; nothing outlives the ``async with``)::

    run() ── task group ── drive ── task group ── worker × up to *concurrency*
          │                                        each: pull the next request
          │                                        (lazily, one at a time), run
          │                                        upload → submit → wait →
          │                                        download, send its Outcome
          └── yields the receive end of a memory object stream of Outcomes

Workers, not a task per job: a pool of at most *concurrency* tasks pulls requests from
the shared input, so read-ahead is bounded by construction and a batch of a million
jobs starts *concurrency* tasks, not a million (spawning a task costs more than a
pipeline's own bookkeeping). The pool grows one worker per request pulled while the
input lasts, so three requests never start 64 idle workers.

A job turns every ``Exception`` into its own ``Outcome`` (typed errors from the client,
``ValueError`` subclasses for bad input), so one failure never cancels a sibling and no
``ExceptionGroup`` reaches the caller; only cancellation propagates. The outcome stream
is a memory object stream rather than a generator yielding from inside the task group,
which anyio forbids. Leaving the ``async with`` early cancels the group: in-flight HTTP
calls are abandoned (submits excepted, which the client shields for a bounded time so a
created task is still reported), and connections go back to the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc

from ._clock import now
from ._events import emit, new_idempotency_key
from ._exceptions import TaskError
from .models import BaseImageRequest, parse_request
from .types import DownloadedEvent, Event, FailedEvent, Outcome, Task, TaskStatus

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncGenerator

    from anyio.streams.memory import MemoryObjectSendStream

    from ._client import AsyncApimart

__all__ = ["JobState", "Pipeline"]


@dataclass
class JobState:
    """What one job knows so far; kept so an error never loses a created task."""

    task: Task | None = None


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
        self.error: Exception | None = None
        self.exhausted = False
        self.pulled = 0

    async def next(self) -> tuple[int, Any] | None:
        """The next (index, request), or None once the input is spent or broken."""
        if not self._async:
            return self._take_sync()
        async with self._lock:
            if self.exhausted:
                return None
            try:
                item = await anext(cast("AsyncIterator[Any]", self._iter))
            except StopAsyncIteration:
                self.exhausted = True
                return None
            except Exception as exc:  # noqa: BLE001 - raised plainly after the jobs end
                self._broken(exc)
                return None
            return self._numbered(item)

    def _take_sync(self) -> tuple[int, Any] | None:
        if self.exhausted:
            return None
        try:
            item = next(cast("Iterator[Any]", self._iter))
        except StopIteration:
            self.exhausted = True
            return None
        except Exception as exc:  # noqa: BLE001 - raised plainly after the jobs end
            self._broken(exc)
            return None
        return self._numbered(item)

    def _numbered(self, item: Any) -> tuple[int, Any]:
        index = self.pulled
        self.pulled += 1
        return index, item

    def _broken(self, exc: Exception) -> None:
        self.error = exc
        self.exhausted = True

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
        client: AsyncApimart,
        *,
        concurrency: int,
        fail_fast: bool,
        timeout: float | None,
        download_to: str | os.PathLike[str] | None,
        on_event: Callable[[Event], Any] | None,
        allow_unknown: bool,
        idempotency_keys: Callable[[int, Any], str | None] | None,
        known_tasks: Callable[[int, Any], str | None] | None,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._client = client
        self._concurrency = concurrency
        self._fail_fast = fail_fast
        self._timeout = timeout
        self._download_to = download_to
        self._on_event = on_event
        self._allow_unknown = allow_unknown
        self._keys = idempotency_keys
        self._known = known_tasks
        self._workers = 0

    @asynccontextmanager
    async def run(
        self, requests: Iterable[Any] | AsyncIterable[Any]
    ) -> AsyncGenerator[AsyncIterator[Outcome], None]:
        """Start the jobs; yield the stream of their outcomes; cancel what is left."""
        source = _Source(requests)
        send, receive = anyio.create_memory_object_stream[Outcome](self._concurrency)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._drive, source, send)
                try:
                    yield receive
                finally:
                    tg.cancel_scope.cancel()
        finally:
            receive.close()
        if source.error is not None:
            raise source.error

    async def _drive(self, source: _Source, send: MemoryObjectSendStream[Outcome]) -> None:
        try:
            async with send, anyio.create_task_group() as workers:
                self._workers = 1
                workers.start_soon(self._worker, source, send, workers)
        finally:
            await source.aclose()

    async def _worker(
        self,
        source: _Source,
        send: MemoryObjectSendStream[Outcome],
        workers: anyio.abc.TaskGroup,
    ) -> None:
        while (pulled := await source.next()) is not None:
            if self._workers < self._concurrency and not source.exhausted:
                # The input goes on: one more worker, up to the concurrency.
                self._workers += 1
                workers.start_soon(self._worker, source, send, workers)
            outcome = await self._run_job(*pulled)
            await send.send(outcome)
            if self._fail_fast and outcome.error is not None:
                workers.cancel_scope.cancel()
                return

    async def _run_job(self, index: int, item: Any) -> Outcome:
        client = self._client
        timings: dict[str, float] = {}
        state = JobState()
        key: str | None = None
        started = now()
        try:
            key = (self._keys(index, item) if self._keys else None) or new_idempotency_key()
            known = self._known(index, item) if self._known else None
            if known:
                state.task = Task(id=known, status=TaskStatus.SUBMITTED)
            task = await client._run_pipeline(
                # Not bound to a local here: the pipeline drops it once submitted.
                item
                if isinstance(item, BaseImageRequest)
                else parse_request(item, allow_unknown=self._allow_unknown),
                key=key,
                timeout=self._timeout,
                on_event=self._on_event,
                job=index,
                timings=timings,
                known_task=state.task,
                state=state,
            )
            files: tuple[Any, ...] = ()
            if self._download_to is not None:
                t0 = now()
                paths = await client.download(task, self._download_to)
                timings["download"] = now() - t0
                files = tuple(paths)
                await emit(
                    self._on_event,
                    DownloadedEvent(task.id, files, now() - started, index),
                )
            return Outcome(index, item, task, None, timings, files, key)
        except Exception as exc:  # noqa: BLE001 - every failure is this job's outcome
            task_seen = exc.task if isinstance(exc, TaskError) and exc.task else state.task
            if self._on_event is not None:
                event = FailedEvent(
                    exc, task_seen.id if task_seen else None, now() - started, index
                )
                # Shielded: a cancelled batch must still hear of an uncertain submit.
                with anyio.CancelScope(shield=True):
                    await emit(self._on_event, event)
            return Outcome(index, item, task_seen, exc, timings, (), key)
