"""Result images to disk: streamed, checked, size-capped, atomic, and key-free.

Result URLs live on other hosts (``upload.<domain>``) and are public, so requests for
them never carry the API key: they are built bare (no key, and none of a borrowed
client's auth, default headers or cookies) and go through the same transport seam as
API calls. Redirects are followed here, a few at most and only to http(s), each hop
built bare again. Each image streams into a hidden
temporary file in the destination directory, is checked by its magic bytes and a size
cap, and is renamed into place only when whole; a download is all or nothing: if one
image fails, the files this call already placed are removed again.
"""

from __future__ import annotations

import contextlib
import functools
import re
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import httpx

from ._exceptions import (
    APIResponseValidationError,
    APITimeoutError,
    ResultExpiredError,
    status_error_class,
)
from ._runtime import all_or_first_error
from ._transport import Request, check_declared, request_deadline
from ._uploads import sniff_image_type
from .types import Task, TaskStatus

if TYPE_CHECKING:
    import os

    from ._jobs import Resources
    from ._transport import Streamed

__all__ = ["download_images"]

_EXT = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp", "image/gif": "gif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_REDIRECTS = 5
# Result images up to this size are held in memory and written in one go.
IN_MEMORY = 8 * 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def safe_stem(text: str) -> str:
    """A file-name stem from untrusted text: no separators, no dot-files, bounded."""
    stem = _UNSAFE.sub("_", text).strip("._") or "image"
    return stem[:120]


def _targets(
    task: Task | Sequence[str], names: Sequence[str] | None
) -> tuple[list[str], list[str], Task | None]:
    if isinstance(task, Task):
        if task.status is not TaskStatus.COMPLETED:
            raise ValueError(f"task {task.id} is {task.status.value}, not completed")
        if not task.image_urls:
            raise APIResponseValidationError(
                f"completed task {task.id} lists no result URLs", status_code=200
            )
        urls = list(task.image_urls)
        stems = [f"{safe_stem(task.id)}_{i}" for i in range(len(urls))]
        owner: Task | None = task
    else:
        if isinstance(task, str):
            raise TypeError("pass a Task or a list of URLs, not a single string")
        if not isinstance(task, Sequence):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"pass a Task or a list of URL strings, not {type(task).__name__}")
        urls = list(task)
        if not all(isinstance(u, str) for u in urls):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError("every URL to download must be a string")
        stems = [f"image_{i}" for i in range(len(urls))]
        owner = None
    if names is not None:
        if len(names) != len(urls):
            raise ValueError(f"names has {len(names)} entries for {len(urls)} images")
        stems = [safe_stem(Path(n).name) for n in names]
    for url in urls:
        _check_url(url)
    return urls, stems, owner


def _check_url(url: str) -> None:
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https"):
        raise APIResponseValidationError(
            f"refusing to fetch a result URL with scheme {parsed.scheme!r}",
            status_code=200,
            excerpt=url[:80],
        )
    if parsed.userinfo:
        # ``user@host`` would be sent as credentials (and makes a host look like another).
        raise APIResponseValidationError(
            "refusing to fetch a result URL that carries credentials",
            status_code=200,
            excerpt=f"{parsed.scheme}://{parsed.host}{parsed.path}"[:80],
        )


async def download_images(
    res: Resources,
    task: Task | Sequence[str],
    dest: str | os.PathLike[str],
    *,
    names: Sequence[str] | None,
    overwrite: bool,
    span: object = None,
) -> list[Path]:
    """Download every URL of *task* into *dest*; see the module docstring.

    *span* is the pipeline span this download belongs to (telemetry only).
    """
    if res.telemetry is None:
        return await _download(res, task, dest, names, overwrite)
    with res.telemetry.stage(span, "apimart.download"):
        return await _download(res, task, dest, names, overwrite)


async def _download(
    res: Resources,
    task: Task | Sequence[str],
    dest: str | os.PathLike[str],
    names: Sequence[str] | None,
    overwrite: bool,
) -> list[Path]:
    urls, stems, owner = _targets(task, names)
    expires_at = owner.expires_at if owner is not None else None
    if owner is not None and expires_at is not None and expires_at <= datetime.now(timezone.utc):
        raise ResultExpiredError(task_id=owner.id, task=owner, expired_at=owner.expires_at)
    directory = anyio.Path(dest)
    await directory.mkdir(parents=True, exist_ok=True)
    placed: list[Path | None] = [None] * len(urls)

    async def one(i: int) -> None:
        async with res.download_slots:
            placed[i] = await res.retry_download(
                _fetch_one, res, urls[i], directory, stems[i], overwrite
            )

    try:
        # All or nothing: the first failure stops the rest, and undoes what was placed.
        await all_or_first_error([functools.partial(one, i) for i in range(len(urls))])
    except BaseException:
        with anyio.CancelScope(shield=True):
            for path in placed:
                if path is not None:
                    await anyio.Path(path).unlink(missing_ok=True)
        raise
    return [p for p in placed if p is not None]


async def _fetch_one(
    res: Resources, url: str, directory: anyio.Path, stem: str, overwrite: bool
) -> Path:
    limit = request_deadline(res.download_timeout)
    body = _Body(Path(directory) / f".{stem}.{uuid.uuid4().hex}.part")
    try:
        with anyio.move_on_after(limit):
            await _fetch_to(res, url, body)
            # One worker-thread hop for the file work (write, check, rename), not one
            # per chunk: result images are a few MB, and each hop costs the loop.
            return await anyio.to_thread.run_sync(_place, body, stem, overwrite)
        raise APITimeoutError(
            f"the download did not finish within {limit:g}s", method="GET", url=url, sent=True
        )
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_undo, body)
        raise


class _Body:
    """A result image on its way to disk: in memory, or (when large) in *tmp*."""

    __slots__ = ("chunks", "content_type", "file", "placed", "size", "tmp")

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.chunks: list[bytes] = []
        self.size = 0
        self.content_type = ""
        self.file: Any = None  # an async file on *tmp*, once the body outgrew memory
        self.placed: Path | None = None  # the final file this download created

    async def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.file is None and self.size <= IN_MEMORY:
            self.chunks.append(chunk)
            return
        if self.file is None:
            self.file = await anyio.open_file(self.tmp, "wb")
            await self.file.write(b"".join(self.chunks))
            self.chunks = []
        await self.file.write(chunk)

    async def finish(self) -> None:
        if self.file is not None:
            await self.file.aclose()


def _place(body: _Body, stem: str, overwrite: bool) -> Path:
    """Write (if still in memory) and rename into place; runs in a worker thread."""
    final = body.tmp.parent / f"{stem}.{_EXT[body.content_type]}"
    if not overwrite and final.exists():
        raise FileExistsError(f"{final} exists and overwrite=False")
    if body.file is None:
        body.tmp.write_bytes(b"".join(body.chunks))
    body.tmp.replace(final)
    body.placed = final
    return final


def _undo(body: _Body) -> None:
    """After a failure or cancellation: no partial file, and no file of ours left."""
    body.tmp.unlink(missing_ok=True)
    if body.placed is not None:  # renamed just as the cancellation came
        body.placed.unlink(missing_ok=True)


async def _fetch_to(res: Resources, url: str, body: _Body) -> None:
    """GET *url* (following a few redirects ourselves) into *body*."""
    transport = res.http.transport
    for _ in range(MAX_REDIRECTS + 1):
        # Built bare: no key, no default headers or cookies of a borrowed client.
        request = Request("GET", url, {}, None, res.download_timeout)
        with (
            res.telemetry.http("GET", url, "result", None)
            if res.telemetry is not None
            else contextlib.nullcontext()
        ) as span:
            async with transport.stream(request) as streamed:
                if res.telemetry is not None:
                    res.telemetry.status(span, streamed.status, "result")
                location = streamed.headers.get("location")
                if streamed.status in _REDIRECTS and location:
                    url = str(httpx.URL(url).join(location))
                    _check_url(url)
                    continue
                await _read_image(streamed, body, res.max_download, url)
                return
    raise APIResponseValidationError(
        f"more than {MAX_REDIRECTS} redirects for a result image", status_code=0, excerpt=url[:80]
    )


async def _read_image(streamed: Streamed, body: _Body, max_bytes: int, url: str) -> None:
    status = streamed.status
    if status >= 400:
        cls = status_error_class(status)
        message = f"download of a result image failed with HTTP {status}"
        if status in (403, 404, 410):
            message += " (the URL may have expired; results live about 24 h)"
        kw: dict[str, Any] = {"status_code": status, "headers": streamed.headers}
        raise cls(message, **kw)
    check_declared(streamed.headers, status, max_bytes)
    try:
        async for chunk in streamed.chunks:
            if not body.content_type:
                content_type = sniff_image_type(chunk[:16])
                if content_type is None:
                    raise APIResponseValidationError(
                        "result is not a JPEG, PNG, WebP or GIF image",
                        status_code=status,
                        excerpt=chunk[:80].decode("utf-8", "replace"),
                    )
                body.content_type = content_type
            if body.size + len(chunk) > max_bytes:
                raise APIResponseValidationError(
                    f"result image exceeds the {max_bytes}-byte cap", status_code=status
                )
            await body.add(chunk)
    finally:
        await body.finish()
    if not body.content_type:
        raise APIResponseValidationError(
            "result image is empty", status_code=status, excerpt=url[:80]
        )
