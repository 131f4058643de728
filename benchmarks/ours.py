"""apimart_async in the shapes a user would drive it, for the worker to measure.

* ``apimart``: ``generate_many`` with dict requests whose ``image_urls`` hold PNG bytes
  (the client uploads them), on the transport the client picks itself (aiohttp on
  asyncio when installed: ``transport_backend="auto"``).
* ``apimart-generate``: one ``client.generate(request)`` per pipeline under an
  ``asyncio.Semaphore`` (``gather``), the same dict requests: the web-app shape, where
  every request handler awaits its own pipeline on one shared client.
* ``apimart-httpx``: the same, forced onto httpx's own pool
  (``transport=httpx.AsyncHTTPTransport(...)``), to show what the aiohttp transport buys.
* ``apimart-calls``: explicit ``upload_image(cache=False)`` → ``submit`` → ``wait`` per
  pipeline under an ``asyncio.Semaphore`` (the raw loops' structure), to separate the
  cost of ``generate_many``'s machinery from the cost of the calls.
* ``apimart-shared``: ``generate_many`` where every request names the *same* image bytes,
  so the content-hash dedup uploads it once (not a like-for-like row: labelled).
* ``apimart-fixed``: the service examples' fixed-interval polling (sleep *interval*,
  ``get_task``, repeat) on our client, so the polling scenario compares schedules over
  the same HTTP stack.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TYPE_CHECKING, Any

import httpx
from typing_extensions import Self

from apimart_async import AsyncApimart, Limits, PollPolicy, TaskStatus

from .images import png
from .raw import MODEL, TaskFailed

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from apimart_async.types import Event
    from apimart_async.webhooks import WebhookReceiver

__all__ = ["Ours", "poll_policy"]


def poll_policy(kind: str, scale: float) -> PollPolicy:
    """The ``PollPolicy`` a scenario runs with.

    ``prompt``: first poll at once (the fake's zero-latency tasks are already complete),
    so the overhead and end-to-end scenarios charge no sleeping; ``adaptive``: the
    default schedule scaled like the fake's clock; ``idle``: first poll at once, then
    one an hour (the memory scenario holds pipelines waiting, not polling).
    """
    if kind == "prompt":
        return PollPolicy(first_default=0.0, first_min=0.0, min_interval=0.05, jitter=0.0)
    if kind == "adaptive":
        return PollPolicy().scaled(scale)
    if kind == "idle":
        return PollPolicy(
            first_default=0.0, first_min=0.0, min_interval=3600.0, max_interval=3600.0
        )
    raise ValueError(f"unknown poll policy {kind!r}")


class Ours:
    """One ``AsyncApimart`` configured for a scenario, with the runs the worker calls."""

    def __init__(
        self,
        impl: str,
        base_url: str,
        api_key: str,
        *,
        limits: Limits,
        poll: PollPolicy,
        interval: float,
        webhooks: WebhookReceiver | None = None,
    ) -> None:
        self.impl = impl
        self.limits = limits
        self.interval = interval
        transport: httpx.AsyncBaseTransport | None = None
        if impl == "apimart-httpx":
            pool = httpx.Limits(
                max_connections=limits.connections, max_keepalive_connections=limits.connections
            )
            transport = httpx.AsyncHTTPTransport(limits=pool, retries=0)
        self._requests: list[dict[str, Any]] = []
        # With *webhooks*, every submit (generate and generate_many alike) sends the
        # receiver's URL and waits on its pushes; polls become the safety net.
        self.client = AsyncApimart(
            api_key=api_key,
            base_url=base_url,
            poll=poll,
            limits=limits,
            transport=transport,
            webhooks=webhooks,
        )

    @property
    def pool(self) -> int:
        """The connection pool size the client was configured with."""
        return self.limits.connections

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def warmup(self) -> None:
        """One upload, submit and task query, so lazy set-up (the aiohttp transport is
        chosen and imported on the first request) is not measured."""
        up = await self.client.upload_image(png(10_000_000), cache=False)
        task = await self.client.submit(model=MODEL, prompt="warm-up", image_urls=[up.url])
        await self.client.get_task(task.id)

    async def upload_file(self, path: Path) -> str:
        """Upload one file from disk (streamed by the client), no dedup."""
        return (await self.client.upload_image(path, cache=False)).url

    def prepare(self, images: list[bytes]) -> list[dict[str, Any]]:
        """Build the request dicts now, before the baseline is taken (the raw loops
        need none, so building them must not count against the client)."""
        self._requests = [
            {"model": MODEL, "prompt": f"benchmark pipeline {i}", "image_urls": [image]}
            for i, image in enumerate(images)
        ]
        return self._requests

    async def run(
        self,
        images: list[bytes],
        concurrency: int,
        on_done: Callable[[str], None],
        on_poll: Callable[[], None] | None = None,
    ) -> int:
        """All pipelines; returns how many ended in an error (outcome or exception)."""
        if self.impl in ("apimart-calls", "apimart-fixed"):
            return await self._run_calls(images, concurrency, on_done, on_poll)
        requests = self._requests if len(self._requests) == len(images) else self.prepare(images)
        on_event: Callable[[Event], None] | None = None
        if on_poll is not None:
            poll_hook = on_poll

            def count_polls(event: Event) -> None:
                if event.kind == "progress":
                    poll_hook()

            on_event = count_polls

        if self.impl == "apimart-generate":
            return await self._run_generate(requests, concurrency, on_done, on_event)
        errors = 0
        async with self.client.generate_many(
            requests, concurrency=concurrency, on_event=on_event
        ) as outcomes:
            async for outcome in outcomes:
                if outcome.error is not None or outcome.task is None:
                    errors += 1
                    if errors == 1:
                        print(f"first error: {outcome.error!r}", file=sys.stderr)
                    continue
                on_done(outcome.task.id)
        return errors

    async def _run_generate(
        self,
        requests: list[dict[str, Any]],
        concurrency: int,
        on_done: Callable[[str], None],
        on_event: Callable[[Event], None] | None,
    ) -> int:
        """One ``generate`` per request, at most *concurrency* at once: the web-app shape
        (each handler awaits its own pipeline on the shared client)."""
        client = self.client
        slots = asyncio.Semaphore(concurrency)
        errors = 0

        async def one(request: dict[str, Any]) -> None:
            nonlocal errors
            async with slots:
                try:
                    task = await client.generate(request, on_event=on_event)
                except Exception as exc:  # noqa: BLE001 - counted like generate_many's
                    errors += 1
                    if errors == 1:
                        print(f"first error: {exc!r}", file=sys.stderr)
                    return
            on_done(task.id)

        await asyncio.gather(*(one(request) for request in requests))
        return errors

    async def _run_calls(
        self,
        images: list[bytes],
        concurrency: int,
        on_done: Callable[[str], None],
        on_poll: Callable[[], None] | None,
    ) -> int:
        client = self.client
        slots = asyncio.Semaphore(concurrency)

        async def one(index: int, image: bytes) -> None:
            async with slots:
                up = await client.upload_image(image, cache=False)
                task = await client.submit(
                    model=MODEL, prompt=f"benchmark pipeline {index}", image_urls=[up.url]
                )
                if self.impl == "apimart-fixed":
                    task = await self._fixed_wait(task.id, on_poll)
                else:
                    task = await client.wait(task)
            on_done(task.id)

        await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))
        return 0

    async def _fixed_wait(self, task_id: str, on_poll: Callable[[], None] | None) -> Any:
        """The service examples' loop: sleep *interval*, query, until terminal."""
        while True:
            await asyncio.sleep(self.interval)
            task = await self.client.get_task(task_id)
            if on_poll is not None:
                on_poll()
            if task.status is TaskStatus.COMPLETED:
                return task
            if task.status.is_terminal:
                raise TaskFailed(f"{task_id}: {task.status}")
