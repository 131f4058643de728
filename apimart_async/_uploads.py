"""Image sources for ``POST /v1/uploads/images``: checks, streaming multipart, dedup.

A source is a path (``str`` or ``os.PathLike``), ``bytes``, or a binary file object.
Before any request we check that it exists, is a regular non-empty file of at most
20 MB, and that its *bytes* (not its name) say JPEG, PNG, WebP or GIF, and that it is
not visibly truncated. Problems raise ``InvalidImageError`` (a ``ValueError``) naming the
source and the rule.

Files larger than ``SMALL_FILE`` are never held in memory: they are hashed in one
worker-thread pass and streamed from disk in chunks for each upload attempt, so a
20 MB upload costs about one chunk of RAM. Identical content (by SHA-256) uploaded
through one client is uploaded once: ``UploadCache`` reuses the URL while it has
comfortably long to live and lets concurrent uploads of the same bytes share a single
request (single flight).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

import anyio
import anyio.to_thread

from ._config import MAX_UPLOAD_BYTES
from ._exceptions import ApimartError, InvalidImageError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from .types import UploadedImage

__all__ = [
    "PreparedImage",
    "UploadCache",
    "multipart_body",
    "multipart_parts",
    "prepare_image",
    "sniff_image_type",
]


# Read whole below this size (one worker-thread hop); stream from disk above it.
SMALL_FILE = 1024 * 1024
CHUNK = 256 * 1024

_EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp", "image/gif": "gif"}


def sniff_image_type(head: bytes) -> str | None:
    """The MIME type the first bytes announce, if it is one the service accepts."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def _looks_like(head: bytes) -> str:
    known = {b"%PDF": "a PDF", b"PK\x03\x04": "a ZIP archive", b"<": "text/HTML", b"{": "JSON"}
    for magic, name in known.items():
        if head.lstrip().startswith(magic):
            return name
    return "no known image format"


def _truncation(content_type: str, head: bytes, tail: bytes, size: int) -> str | None:
    """Why the file looks cut short, or None. Cheap checks on the first/last bytes."""
    if content_type == "image/png":
        if size < 57 or b"IEND" not in tail[-64:]:
            return "PNG without its IEND end chunk"
    elif content_type == "image/jpeg":
        if b"\xff\xd9" not in tail[-1024:]:
            return "JPEG without its end-of-image marker"
    elif content_type == "image/gif":
        if not tail.rstrip(b"\x00").endswith(b";"):
            return "GIF without its trailer"
    elif content_type == "image/webp":
        declared = int.from_bytes(head[4:8], "little") + 8
        if size < declared:
            return f"WebP of {size} bytes whose header declares {declared}"
    return None


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """A checked image ready to upload: in memory (*data*) or streamed from *path*."""

    filename: str
    content_type: str
    size: int
    sha256: str
    data: bytes | None = None
    path: Path | None = None


def _label(source: object, filename: str | None) -> str:
    if filename:
        return repr(filename)
    if isinstance(source, str | os.PathLike):
        return repr(os.fspath(cast("str | os.PathLike[str]", source)))
    return "<bytes>" if isinstance(source, bytes) else "<file object>"


def _check(
    label: str, head: bytes, tail: bytes, size: int, max_bytes: int
) -> str:  # returns content type
    if size == 0:
        raise InvalidImageError(f"image {label} is empty (0 bytes)")
    if size > max_bytes:
        raise InvalidImageError(
            f"image {label} is {size / 1048576:.1f} MB; the upload limit is "
            f"{max_bytes / 1048576:.0f} MB"
        )
    content_type = sniff_image_type(head)
    if content_type is None:
        raise InvalidImageError(
            f"image {label} is not a JPEG, PNG, WebP or GIF image (its first bytes look "
            f"like {_looks_like(head)}); allowed formats: JPEG, PNG, WebP, GIF"
        )
    problem = _truncation(content_type, head, tail, size)
    if problem:
        raise InvalidImageError(f"image {label} looks truncated: {problem}")
    return content_type


def _filename(name: str | None, content_type: str, sha256: str) -> str:
    ext = _EXTENSIONS[content_type]
    if not name:
        return f"image-{sha256[:12]}.{ext}"
    # The name travels inside a multipart header: keep it printable and quote-free.
    clean = "".join(ch if ch.isprintable() and ch not in '"\\/' else "_" for ch in name)
    return clean[:200] or f"image-{sha256[:12]}.{ext}"


def _prepare_path(path: Path, filename: str | None, max_bytes: int) -> PreparedImage:
    label = _label(path, filename)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InvalidImageError(f"image {label}: file not found") from None
    except OSError as exc:
        raise InvalidImageError(f"image {label}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InvalidImageError(f"image {label} is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidImageError(f"image {label} is not a regular file")
    size = st.st_size
    if size == 0 or size > max_bytes:
        _check(label, b"", b"", size, max_bytes)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        if size <= SMALL_FILE:
            data = fh.read(max_bytes + 1)
            digest.update(data)
            head, tail, size = data[:16], data[-1024:], len(data)
            content_type = _check(label, head, tail, size, max_bytes)
            return PreparedImage(
                _filename(filename or path.name, content_type, digest.hexdigest()),
                content_type,
                size,
                digest.hexdigest(),
                data=data,
            )
        head = fh.read(16)
        digest.update(head)
        tail = head
        read = len(head)
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            read += len(chunk)
            tail = (tail + chunk)[-1024:]
            if read > max_bytes:
                break
    content_type = _check(label, head, tail, read, max_bytes)
    sha = digest.hexdigest()
    return PreparedImage(
        _filename(filename or path.name, content_type, sha), content_type, read, sha, path=path
    )


def _prepare_bytes(data: bytes, filename: str | None, label: str, max_bytes: int) -> PreparedImage:
    content_type = _check(label, data[:16], data[-1024:], len(data), max_bytes)
    sha = hashlib.sha256(data).hexdigest()
    return PreparedImage(_filename(filename, content_type, sha), content_type, len(data), sha, data)


def _prepare_fileobj(fh: IO[bytes], filename: str | None, max_bytes: int) -> PreparedImage:
    # A file object may not be seekable, so it is read once, bounded by the limit;
    # reading one byte past it is how we know it is too big without reading it all.
    data = fh.read(max_bytes + 1)
    if not isinstance(data, bytes):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise InvalidImageError("file object must be opened in binary mode ('rb')")
    name = filename or os.path.basename(str(getattr(fh, "name", "") or "")) or None
    return _prepare_bytes(data, name, _label(fh, filename), max_bytes)


async def prepare_image(
    source: Any, *, filename: str | None = None, max_bytes: int = MAX_UPLOAD_BYTES
) -> PreparedImage:
    """Check *source* and make it uploadable, off the event loop for file I/O.

    Raises:
        InvalidImageError: missing, not a file, empty, over *max_bytes*, not an
            accepted format by its magic bytes, or truncated.
        TypeError: *source* is none of the accepted kinds.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        return _prepare_bytes(
            bytes(cast("bytes", source)), filename, _label(b"", filename), max_bytes
        )
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        return await anyio.to_thread.run_sync(_prepare_path, path, filename, max_bytes)
    if hasattr(source, "read"):
        return await anyio.to_thread.run_sync(_prepare_fileobj, source, filename, max_bytes)
    raise TypeError(
        f"image source must be a path (str or os.PathLike), bytes or a binary file object, "
        f"not {type(source).__name__}"
    )


def multipart_parts(image: PreparedImage) -> tuple[str, bytes, bytes]:
    """(content type header, preamble, epilogue) of a one-field ``file`` form."""
    boundary = os.urandom(16).hex()
    preamble = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{image.filename}"\r\n'
        f"Content-Type: {image.content_type}\r\n\r\n"
    ).encode()
    epilogue = f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", preamble, epilogue


async def multipart_body(
    image: PreparedImage, preamble: bytes, epilogue: bytes
) -> AsyncIterator[bytes]:
    """Stream the form of an image kept on disk: preamble, the file in chunks, epilogue.

    A fresh iterator per upload attempt: the file is read again each time.
    """
    assert image.path is not None
    yield preamble
    async with await anyio.open_file(image.path, "rb") as fh:
        while chunk := await fh.read(CHUNK):
            yield chunk
    yield epilogue


@dataclass(slots=True)
class _Flight:
    # Created by the first caller that has to wait: most uploads have no follower.
    done: anyio.Event | None = None
    result: UploadedImage | None = None
    error: BaseException | None = None


class UploadCache:
    """Content-addressed upload URLs with single flight, scoped to one client.

    A cached URL is reused while it has more than *margin* seconds to live, so a task
    submitted with it can still fetch it. When the leading upload fails with an
    ``ApimartError`` (after its own retries), the callers waiting on it get that error
    too rather than repeating a doomed upload once each; when the leader is cancelled
    (its job was), one of the waiters takes over.
    """

    __slots__ = ("_done", "_flights", "_margin", "_max_entries")

    def __init__(self, margin: float, max_entries: int = 4096) -> None:
        self._margin = margin
        # Bounded, so a long-running app that uploads many distinct images does not
        # keep every URL for 72 h: the oldest entries go first (and dead ones on sight).
        self._max_entries = max_entries
        self._done: dict[str, UploadedImage] = {}
        self._flights: dict[str, _Flight] = {}

    def __len__(self) -> int:
        return len(self._done)

    def get(self, sha256: str) -> UploadedImage | None:
        """A still-fresh cached upload of this content, if any."""
        hit = self._done.get(sha256)
        if hit is None:
            return None
        if hit.expires_within(self._margin, now=datetime.now(timezone.utc)):
            del self._done[sha256]
            return None
        return hit

    def _remember(self, sha256: str, image: UploadedImage) -> None:
        done = self._done
        done.pop(sha256, None)
        done[sha256] = image
        while len(done) > self._max_entries:
            del done[next(iter(done))]  # dicts keep insertion order: oldest first

    async def get_or_upload(
        self, sha256: str, upload: Callable[[], Awaitable[UploadedImage]]
    ) -> tuple[UploadedImage, bool]:
        """The URL for this content and whether it came from the cache (or a flight)."""
        while True:
            hit = self.get(sha256)
            if hit is not None:
                return hit, True
            flight = self._flights.get(sha256)
            if flight is None:
                break
            if flight.done is None:
                flight.done = anyio.Event()
            await flight.done.wait()
            if flight.result is not None:
                return flight.result, True
            if isinstance(flight.error, ApimartError):
                raise flight.error
            # The leader was cancelled or broke for a reason of its own: lead anew.
        flight = _Flight()
        self._flights[sha256] = flight
        try:
            result = await upload()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.result = result
            self._remember(sha256, result)
            return result, False
        finally:
            del self._flights[sha256]
            if flight.done is not None:
                flight.done.set()
