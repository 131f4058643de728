"""Upload sources, checks before any request, streaming, and content dedup."""

from __future__ import annotations

import io
from pathlib import Path

import anyio
import pytest

import apimart_async as am
from apimart_async import AsyncApimart
from apimart_async.testing import FakeApimart

from .conftest import FAST_POLL
from .images import PDF, gif, jpeg, png, webp

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("maker", "content_type"),
    [(png, "image/png"), (jpeg, "image/jpeg"), (webp, "image/webp"), (gif, "image/gif")],
)
async def test_each_format_uploads_from_path_bytes_and_file(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path, maker: object, content_type: str
) -> None:
    """A real tiny image of each format uploads from a path, bytes and a file object."""
    data = maker()  # type: ignore[operator]
    path = tmp_path / "photo.bin"  # the name says nothing; the bytes decide
    path.write_bytes(data)
    for source in (path, str(path), data, io.BytesIO(data)):
        image = await client.upload_image(source, cache=False)
        assert image.content_type == content_type
        assert image.bytes == len(data)
        assert image.url.startswith("https://")
        assert (image.expires_at - image.created_at).total_seconds() == 72 * 3600
    assert fake.stats.uploads == 4


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.png", "not found"),
        (lambda d: d, "directory"),
        (lambda d: _write(d / "empty.png", b""), "empty"),
        (lambda d: _write(d / "doc.png", PDF), "PDF"),
        (lambda d: _write(d / "cut.png", png()[:-12]), "truncated"),
        (lambda d: _write(d / "cut.jpg", jpeg()[:-2]), "truncated"),
        (lambda d: _write(d / "big.png", png() + b"\0" * (21 * 1024 * 1024)), "20 MB"),
    ],
)
async def test_bad_sources_fail_before_any_request(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path, setup: object, message: str
) -> None:
    """Missing, directory, empty, non-image, truncated and oversized: ValueError, no I/O."""
    source = setup(tmp_path)  # type: ignore[operator]
    with pytest.raises(am.InvalidImageError, match=message) as info:
        await client.upload_image(source)
    assert isinstance(info.value, ValueError)
    assert fake.stats.requests_total == 0


async def test_wrong_source_type(client: AsyncApimart) -> None:
    """Anything but a path, bytes or a binary file is a TypeError."""
    with pytest.raises(TypeError, match="path"):
        await client.upload_image(12345)  # type: ignore[arg-type]


async def test_large_file_streams_and_reports_size(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path
) -> None:
    """A multi-MB file is streamed (not from memory) and arrives byte-exact."""
    data = png(seed=3)
    big = data[:-12] + b"\0" * (3 * 1024 * 1024) + data[-12:]
    path = tmp_path / "big.png"
    path.write_bytes(big)
    image = await client.upload_image(path)
    assert image.bytes == len(big)
    assert fake.stored_upload(image.url) == big


async def test_identical_content_is_uploaded_once(client: AsyncApimart, fake: FakeApimart) -> None:
    """Same bytes → one upload, reused; different bytes → another upload."""
    a = await client.upload_image(png(seed=1))
    b = await client.upload_image(io.BytesIO(png(seed=1)))
    c = await client.upload_image(png(seed=2))
    assert a.url == b.url != c.url
    assert fake.stats.uploads == 2


async def test_concurrent_uploads_share_one_request(
    client: AsyncApimart, fake: FakeApimart
) -> None:
    """50 concurrent uploads of the same content make exactly one request."""
    urls: list[str] = []

    async def one() -> None:
        urls.append((await client.upload_image(png(seed=9))).url)

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(one)
    assert len(set(urls)) == 1 and len(urls) == 50
    assert fake.stats.uploads == 1


async def test_upload_413_maps_to_payload_too_large() -> None:
    """A server-side 413 (e.g. a lower limit) surfaces as PayloadTooLargeError."""
    from .mock import Script, reply

    script = Script(reply(413, {"error": {"code": 413, "message": "File too large"}}))
    async with AsyncApimart(api_key="k", transport=script.transport(), poll=FAST_POLL) as client:
        with pytest.raises(am.PayloadTooLargeError):
            await client.upload_image(png())
    assert len(script.requests) == 1


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


async def test_dedup_cache_is_bounded() -> None:
    """The URL cache keeps at most its configured number of entries, oldest out first."""
    from apimart_async._uploads import UploadCache

    cache = UploadCache(margin=0.0, max_entries=3)
    fake = FakeApimart(api_key="test-key")
    async with AsyncApimart(api_key="test-key", transport=fake.transport()) as client:
        for seed in range(5):
            image = await client.upload_image(png(seed=seed), cache=False)
            await cache.get_or_upload(f"sha{seed}", lambda image=image: _done(image))
    assert len(cache) == 3
    assert cache.get("sha0") is None and cache.get("sha4") is not None


async def _done(image: am.UploadedImage) -> am.UploadedImage:
    """An "upload" that is already done."""
    return image
