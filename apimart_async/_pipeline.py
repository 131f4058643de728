"""``generate_many``: many pipelines in one task group, outcomes streamed as they finish.

Shape (all structured; nothing outlives the ``async with``)::

    run() ── task group ──┬── feeder: reads requests lazily; a Semaphore(concurrency)
          │               │   bounds jobs alive at once, so read-ahead is bounded
          │               └── job × N: upload → submit → wait → download → Outcome
          └── yields the receive end of a memory object stream of Outcomes

A job turns every ``Exception`` into its own ``Outcome`` (typed errors from the client,
``ValueError`` subclasses for bad input), so one failure never cancels a sibling and no
``ExceptionGroup`` reaches the caller; only cancellation propagates. The outcome stream
is a memory object stream rather than a generator yielding from inside the task group,
which anyio forbids. Leaving the ``async with`` early cancels the group: in-flight HTTP
calls are abandoned (submits excepted, which the client shields for a bounded time so a
created task is still reported), and connections go back to the pool.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc

from ._events import emit, new_idempotency_key
from ._exceptions import TaskError
from .models import BaseImageRequest, parse_request
from .types import DownloadedEvent, Event, FailedEvent, Outcome, Task, TaskStatus

if TYPE_CHECKING:
    import os
    from collections.abc import AsyncGenerator, AsyncIterator

    from anyio.streams.memory import MemoryObjectSendStream

    from ._client import AsyncApimart

__all__ = ["JobState", "Pipeline"]


@dataclass
class JobState:
    """What one job knows so far; kept so an error never loses a created task."""

    task: Task | None = None


async def _each(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncGenerator[Any, None]:
    """Iterate a sync or async iterable; an async source is closed however we stop."""
    if not isinstance(items, AsyncIterable):
        for item in items:
            yield item
        return
    source = aiter(items)
    try:
        async for item in source:
            yield item
    finally:
        aclose = getattr(source, "aclose", None)
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
        self._feed_error: BaseException | None = None

    @asynccontextmanager
    async def run(
        self, requests: Iterable[Any] | AsyncIterable[Any]
    ) -> AsyncGenerator[AsyncIterator[Outcome], None]:
        """Start the jobs; yield the stream of their outcomes; cancel what is left."""
        send, receive = anyio.create_memory_object_stream[Outcome](self._concurrency)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._feed, requests, send)
                try:
                    yield receive
                finally:
                    tg.cancel_scope.cancel()
        finally:
            receive.close()
        if self._feed_error is not None:
            raise self._feed_error

    async def _feed(
        self,
        requests: Iterable[Any] | AsyncIterable[Any],
        send: MemoryObjectSendStream[Outcome],
    ) -> None:
        # fast_acquire: a free slot starts the next job at once; without it every
        # acquire yields first and short jobs never pile up to *concurrency*.
        slots = anyio.Semaphore(self._concurrency, fast_acquire=True)
        async with send, anyio.create_task_group() as jobs:
            index = 0
            items = _each(requests)
            try:
                async for item in items:
                    await slots.acquire()
                    jobs.start_soon(self._job, index, item, send, slots, jobs)
                    index += 1
            except Exception as exc:  # noqa: BLE001 - re-raised plainly after the jobs end
                # The caller's iterable broke: finish what started, then report it
                # plainly (never wrapped in an ExceptionGroup).
                self._feed_error = exc
            finally:
                with anyio.CancelScope(shield=True):
                    await items.aclose()

    async def _job(
        self,
        index: int,
        item: Any,
        send: MemoryObjectSendStream[Outcome],
        slots: anyio.Semaphore,
        jobs: anyio.abc.TaskGroup,
    ) -> None:
        try:
            outcome = await self._run_job(index, item)
        finally:
            slots.release()
        await send.send(outcome)
        if self._fail_fast and outcome.error is not None:
            jobs.cancel_scope.cancel()

    async def _run_job(self, index: int, item: Any) -> Outcome:
        client = self._client
        timings: dict[str, float] = {}
        state = JobState()
        key: str | None = None
        started = anyio.current_time()
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
                t0 = anyio.current_time()
                paths = await client.download(task, self._download_to)
                timings["download"] = anyio.current_time() - t0
                files = tuple(paths)
                await emit(
                    self._on_event,
                    DownloadedEvent(task.id, files, anyio.current_time() - started, index),
                )
            return Outcome(index, item, task, None, timings, files, key)
        except Exception as exc:  # noqa: BLE001 - every failure is this job's outcome
            task_seen = exc.task if isinstance(exc, TaskError) and exc.task else state.task
            if self._on_event is not None:
                event = FailedEvent(
                    exc, task_seen.id if task_seen else None, anyio.current_time() - started, index
                )
                # Shielded: a cancelled batch must still hear of an uncertain submit.
                with anyio.CancelScope(shield=True):
                    await emit(self._on_event, event)
            return Outcome(index, item, task_seen, exc, timings, (), key)
