"""The baselines: what a competent user would hand-write with raw httpx or raw aiohttp.

One shared ``aiohttp.ClientSession`` (``TCPConnector(limit=pool)``) or one shared
``httpx.AsyncClient`` (``httpx.Limits(max_connections=pool)``), default headers carrying
the key, an ``asyncio.Semaphore`` bounding pipelines in flight, and per pipeline:
upload the PNG (multipart field ``file``) → submit JSON → ``GET /v1/tasks/{id}`` at once
and then every *interval* seconds until ``completed``. Status codes are checked
(``raise_for_status``); there are no retries, no validation, no limits beyond the pool:
that is the work apimart_async does on top, and what the ratios put a price on.

``httpx-aiohttp`` is the raw httpx loop over the ``httpx-aiohttp`` transport (context:
httpx's API on aiohttp's connection pool).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from typing_extensions import Self

from .images import png

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = ["MODEL", "RawAiohttp", "RawHttpx"]

MODEL = "gemini-3-pro-image-preview"
_FAILED = ("failed", "cancelled")


class TaskFailed(RuntimeError):
    """The fake failed or cancelled a task (the benchmarks configure no faults)."""


class _RawBase:
    """The pipeline loop both raw clients share; subclasses supply the three requests."""

    def __init__(self, base_url: str, api_key: str, *, pool: int, interval: float) -> None:
        self.base = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.pool = pool
        self.interval = interval

    async def upload(self, image: bytes) -> str:
        raise NotImplementedError

    async def upload_file(self, path: Path) -> str:
        raise NotImplementedError

    async def submit(self, image_url: str, index: int) -> str:
        raise NotImplementedError

    async def poll(self, task_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, images: list[bytes]) -> list[bytes]:
        """Nothing to build ahead: the loop takes the images as they are."""
        return images

    def body(self, image_url: str, index: int) -> dict[str, Any]:
        return {"model": MODEL, "prompt": f"benchmark pipeline {index}", "image_urls": [image_url]}

    async def warmup(self) -> None:
        """One upload, submit and poll, so lazy set-up is not measured."""
        task_id = await self.submit(await self.upload(png(10_000_000)), -1)
        await self.poll(task_id)

    async def pipeline(
        self, image: bytes, index: int, on_poll: Callable[[], None] | None = None
    ) -> str:
        """upload → submit → poll now, then every *interval*, until completed."""
        task_id = await self.submit(await self.upload(image), index)
        while True:
            data = await self.poll(task_id)
            if on_poll is not None:
                on_poll()
            status = data["status"]
            if status == "completed":
                return task_id
            if status in _FAILED:
                raise TaskFailed(f"{task_id}: {status}")
            await asyncio.sleep(self.interval)

    async def run(
        self,
        images: list[bytes],
        concurrency: int,
        on_done: Callable[[str], None],
        on_poll: Callable[[], None] | None = None,
    ) -> None:
        """All pipelines, at most *concurrency* at once (gather + Semaphore)."""
        slots = asyncio.Semaphore(concurrency)

        async def one(index: int, image: bytes) -> None:
            async with slots:
                task_id = await self.pipeline(image, index, on_poll)
            on_done(task_id)

        await asyncio.gather(*(one(i, image) for i, image in enumerate(images)))


class RawAiohttp(_RawBase):
    """The raw aiohttp loop: one ClientSession, TCPConnector(limit=pool)."""

    session: aiohttp.ClientSession

    async def __aenter__(self) -> Self:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool), headers=self.headers
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def upload(self, image: bytes) -> str:
        form = aiohttp.FormData()
        form.add_field("file", image, filename="ref.png", content_type="image/png")
        async with self.session.post(f"{self.base}/v1/uploads/images", data=form) as r:
            r.raise_for_status()
            return str((await r.json())["url"])

    async def upload_file(self, path: Path) -> str:
        with path.open("rb") as fh:  # aiohttp streams an open file in chunks
            form = aiohttp.FormData()
            form.add_field("file", fh, filename=path.name, content_type="image/png")
            async with self.session.post(f"{self.base}/v1/uploads/images", data=form) as r:
                r.raise_for_status()
                return str((await r.json())["url"])

    async def submit(self, image_url: str, index: int) -> str:
        body = self.body(image_url, index)
        async with self.session.post(f"{self.base}/v1/images/generations", json=body) as r:
            r.raise_for_status()
            return str((await r.json())["data"][0]["task_id"])

    async def poll(self, task_id: str) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/v1/tasks/{task_id}") as r:
            r.raise_for_status()
            data: dict[str, Any] = (await r.json())["data"]
            return data


class RawHttpx(_RawBase):
    """The raw httpx loop: one AsyncClient with its own pool (or *transport*)."""

    client: httpx.AsyncClient

    def __init__(
        self, base_url: str, api_key: str, *, pool: int, interval: float, transport: str = "httpx"
    ) -> None:
        super().__init__(base_url, api_key, pool=pool, interval=interval)
        self.transport = transport

    async def __aenter__(self) -> Self:
        limits = httpx.Limits(max_connections=self.pool, max_keepalive_connections=self.pool)
        timeout = httpx.Timeout(60.0, pool=None)  # the semaphore, not the pool, waits
        if self.transport == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            self.client = httpx.AsyncClient(
                transport=AiohttpTransport(limits=limits), headers=self.headers, timeout=timeout
            )
        else:
            self.client = httpx.AsyncClient(limits=limits, headers=self.headers, timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()

    async def upload(self, image: bytes) -> str:
        files = {"file": ("ref.png", image, "image/png")}
        r = await self.client.post(f"{self.base}/v1/uploads/images", files=files)
        r.raise_for_status()
        return str(r.json()["url"])

    async def upload_file(self, path: Path) -> str:
        with path.open("rb") as fh:  # httpx streams a file object in 64 KB chunks
            files = {"file": (path.name, fh, "image/png")}
            r = await self.client.post(f"{self.base}/v1/uploads/images", files=files)
        r.raise_for_status()
        return str(r.json()["url"])

    async def submit(self, image_url: str, index: int) -> str:
        body = self.body(image_url, index)
        r = await self.client.post(f"{self.base}/v1/images/generations", json=body)
        r.raise_for_status()
        return str(r.json()["data"][0]["task_id"])

    async def poll(self, task_id: str) -> dict[str, Any]:
        r = await self.client.get(f"{self.base}/v1/tasks/{task_id}")
        r.raise_for_status()
        data: dict[str, Any] = r.json()["data"]
        return data
