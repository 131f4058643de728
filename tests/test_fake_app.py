"""FakeApimart's endpoints, state machine, response variants, idempotency and counters.

Driven with a plain ``httpx.AsyncClient`` over ``fake.transport()`` so the fake is
tested on its own, independent of the client being built against it.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from typing import Any

import anyio
import httpx
import pytest

from apimart_async.testing import (
    MAX_UPLOAD_BYTES,
    RESULT_PNG,
    FakeApimart,
    Latency,
    ManualClock,
    Variants,
)

pytestmark = pytest.mark.anyio

API = "https://api.apimart.ai"
KEY = "test"
TASK_ID = re.compile(r"^task_[0-9A-HJKMNP-TV-Z]{26}$")
REQUEST_ID = re.compile(r" \(request id: req_[0-9a-f]{20}\)$")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once per backend."""
    return str(request.param)


def client(fake: FakeApimart, key: str | None = KEY, **kwargs: Any) -> httpx.AsyncClient:
    """A plain httpx client wired to *fake*, sending *key* as a Bearer token."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.AsyncClient(transport=fake.transport(), base_url=API, headers=headers, **kwargs)


def png(width: int = 2, height: int = 2) -> bytes:
    """A structurally valid RGB PNG built by hand (independent of the fake's own)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = (b"\x00" + b"\x10\x20\x30" * width) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff"
    b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
WEBP = b"RIFF" + struct.pack("<I", 14) + b"WEBPVP8L" + struct.pack("<I", 2) + b"\x2f\x00"
PDF = b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n"


def assert_valid_png(data: bytes) -> tuple[int, int]:
    """Check signature, every chunk CRC and the IDAT stream size; return (w, h)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size, kind = 8, b"", (0, 0), b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert kind == b"IEND"
    width, height = size
    assert len(zlib.decompress(idat)) == height * (1 + width * 3)
    return width, height


async def submit(c: httpx.AsyncClient, **body: Any) -> httpx.Response:
    """POST a generation request (defaults: imagen, a prompt)."""
    payload = {"model": "imagen-4.0-apimart", "prompt": "a lighthouse", **body}
    return await c.post("/v1/images/generations", json=payload)


async def submit_id(c: httpx.AsyncClient, **body: Any) -> str:
    """Submit and return the task id from the default (list) shape."""
    response = await submit(c, **body)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"][0]["task_id"]
    return task_id


async def poll(c: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    """GET the task and return its ``data`` object."""
    response = await c.get(f"/v1/tasks/{task_id}")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


# -- auth ----------------------------------------------------------------------------


async def test_missing_key_gets_key_required_401() -> None:
    """No Authorization header: 401 with the observed "API key is required" body."""
    fake = FakeApimart()
    async with client(fake, key=None) as c:
        response = await submit(c)
    assert response.status_code == 401
    body = response.json()
    assert set(body["error"]) == {"message", "type"}
    assert body["error"]["type"] == "apimart_error"
    assert body["error"]["message"].startswith("API key is required (request id: ")
    assert fake.stats.tasks_created == 0


@pytest.mark.parametrize("path", ["/v1/uploads/images", "/v1/images/generations", "/v1/tasks/x"])
async def test_wrong_key_gets_observed_401_shape(path: str) -> None:
    """A wrong key on any endpoint: the observed code:""/param:"" apimart_error body."""
    fake = FakeApimart(api_key="right")
    async with client(fake, key="wrong") as c:
        response = await c.request("GET" if "tasks" in path else "POST", path)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["code"] == "" and error["param"] == "" and error["type"] == "apimart_error"
    assert re.fullmatch(r"invalid API key \(request id: req_[0-9a-f]{20}\)", error["message"])


# -- uploads -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "content_type"),
    [(png(), "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp"), (GIF, "image/gif")],
)
async def test_upload_each_format_and_get_it_back(data: bytes, content_type: str) -> None:
    """Each accepted format is sniffed by magic bytes, stored, and served back unauthenticated."""
    fake = FakeApimart()
    async with client(fake) as c:
        # The declared type is deliberately wrong: the bytes decide.
        response = await c.post(
            "/v1/uploads/images", files={"file": ("my photo.bin", data, "text/plain")}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"url", "filename", "content_type", "bytes", "created_at"}
        assert body["content_type"] == content_type
        assert body["bytes"] == len(data)
        assert body["filename"] == "my photo.bin"
        assert isinstance(body["created_at"], int)
        assert body["url"].startswith("https://upload.apimart.ai/f/image/")
        async with client(fake, key=None) as files:
            got = await files.get(body["url"])
    assert got.status_code == 200
    assert got.content == data
    assert got.headers["content-type"] == content_type
    assert fake.stored_upload(body["url"]) == data
    assert fake.stats.uploads == 1 and fake.stats.downloads == 1
    assert fake.stats.file_requests_with_auth == 0


async def test_upload_size_limit_is_20_mib() -> None:
    """Exactly 20 MiB is accepted; 21 MB is a 413 with the documented message."""
    fake = FakeApimart()
    at_limit = png()[:16] + b"\0" * (MAX_UPLOAD_BYTES - 16)
    too_big = png()[:16] + b"\0" * (21 * 1024 * 1024)
    async with client(fake) as c:
        ok = await c.post("/v1/uploads/images", files={"file": ("a.png", at_limit)})
        big = await c.post("/v1/uploads/images", files={"file": ("b.png", too_big)})
    assert ok.status_code == 200 and ok.json()["bytes"] == MAX_UPLOAD_BYTES
    assert big.status_code == 413
    error = big.json()["error"]
    assert error["code"] == 413 and error["type"] == "invalid_request_error"
    assert error["message"].startswith("File too large (max 20MB) (request id: ")
    assert len(fake.tasks) == 0 and fake.stats.uploads == 2


async def test_upload_rejects_a_pdf() -> None:
    """Bytes that are not JPEG/PNG/WebP/GIF are a 400, whatever the file is called."""
    fake = FakeApimart()
    async with client(fake) as c:
        response = await c.post("/v1/uploads/images", files={"file": ("x.png", PDF, "image/png")})
    assert response.status_code == 400
    assert "Unsupported file format" in response.json()["error"]["message"]
    assert fake.stats.status_counts == {400: 1}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"files": {"image": ("a.png", png())}},  # wrong field name
        {"content": b"not multipart", "headers": {"content-type": "application/octet-stream"}},
        {
            "content": b"--x\r\nno header end",
            "headers": {"content-type": "multipart/form-data; boundary=x"},
        },
    ],
)
async def test_upload_without_file_field_is_400(kwargs: dict[str, Any]) -> None:
    """No ``file`` part (wrong name, not multipart, broken framing): 400 Missing file field."""
    fake = FakeApimart()
    async with client(fake) as c:
        response = await c.post("/v1/uploads/images", **kwargs)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("Missing file field (request id: ")


# -- submit validation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "flux-kontext-pro"}, "prompt is required"),
        ({"model": "flux-kontext-pro", "prompt": "  "}, "prompt is required"),
        ({"model": "flux-kontext-pro", "prompt": "x", "image_urls": ["a", "b"]}, "at most 1"),
        (
            {"model": "imagen-4.0-apimart", "prompt": "x", "image_urls": ["https://a/b.png"]},
            "google_imagen4 currently supports text-to-image only",
        ),
        (
            {"model": "gemini-3-pro-image-preview", "prompt": "x", "image_urls": ["u"] * 15},
            "at most 14",
        ),
        ({"model": "gemini-3-pro-image-preview", "prompt": "x", "n": "1"}, "n must be a number"),
        ({"model": "gemini-3-pro-image-preview", "prompt": "x", "n": 5}, "between 1 and 4"),
        ({"model": "imagen-4.0-apimart", "prompt": "x", "n": 2}, "between 1 and 1"),
        ({"model": "flux-kontext-max", "prompt": "x", "image_urls": "u"}, "array of strings"),
        ({"model": "flux-kontext-max", "prompt": "x", "image_urls": [{"url": "u"}]}, "strings"),
        ({"model": "dall-e-3", "prompt": "x"}, "not supported"),
        ({"prompt": "x"}, "model is required"),
        (["not", "an", "object"], "JSON object"),
    ],
)
async def test_submit_validation_errors_use_the_real_envelope(body: Any, message: str) -> None:
    """Each invalid request is a 400 in the documented envelope and creates no task."""
    fake = FakeApimart()
    async with client(fake) as c:
        response = await c.post("/v1/images/generations", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 400
    assert error["type"] == "invalid_request_error"
    assert error["param"] == ""
    assert message in error["message"]
    assert REQUEST_ID.search(error["message"])
    assert fake.stats.tasks_created == 0 and fake.stats.submits == 1


async def test_submit_invalid_json_is_400() -> None:
    """A body that is not JSON at all is a 400."""
    fake = FakeApimart()
    async with client(fake) as c:
        response = await c.post("/v1/images/generations", content=b"{nope")
    assert response.status_code == 400
    assert "Invalid JSON" in response.json()["error"]["message"]


async def test_unknown_models_accepted_when_asked() -> None:
    """``accept_unknown_models=True`` lets an undocumented model id through."""
    fake = FakeApimart(accept_unknown_models=True)
    async with client(fake) as c:
        task_id = await submit_id(c, model="gpt-image-2", n=2)
    assert fake.task(task_id).model == "gpt-image-2" and fake.task(task_id).n == 2


@pytest.mark.parametrize(
    "model",
    [
        "flux-kontext-pro",
        "flux-kontext-max",
        "imagen-4.0-apimart",
        "gemini-3-pro-image-preview",
        "gemini-3-pro-image-preview-official",
        "gemini-2.5-flash-image-preview",
        "gemini-2.5-flash-image-preview-official",
        "gemini-3.1-flash-image-preview",
        "gemini-3.1-flash-image-preview-official",
    ],
)
async def test_every_documented_model_is_accepted(model: str) -> None:
    """Every model id of the reference list creates a task with its own price."""
    fake = FakeApimart()
    async with client(fake) as c:
        task_id = await submit_id(c, model=model)
    assert fake.task(task_id).model == model and fake.task(task_id).cost > 0


# -- submit shapes -------------------------------------------------------------------


async def test_submit_shape_list_without_the_version_header() -> None:
    """Shape A by default when no version is pinned: ``{"code":200,"data":[{...}]}``."""
    fake = FakeApimart()
    assert fake.variants.submit_shape == "auto"
    async with client(fake) as c:
        body = (await submit(c)).json()
    assert body["code"] == 200 and len(body["data"]) == 1
    entry = body["data"][0]
    assert entry["status"] == "submitted" and set(entry) == {"status", "task_id"}
    assert TASK_ID.match(entry["task_id"]) and entry["task_id"] in fake.tasks


async def test_submit_shape_object() -> None:
    """Shape B: ``data`` is an object with ``id``, pending status and ``task_info``."""
    fake = FakeApimart(variants=Variants(submit_shape="object"))
    async with client(fake) as c:
        body = (await submit(c)).json()
    data = body["data"]
    task = fake.task(data["id"])
    assert body["code"] == 200 and data["status"] == "pending" and data["progress"] == 0
    assert data["object"] == "image.generation.task" and data["model"] == "imagen-4.0-apimart"
    assert data["task_info"] == {"can_cancel": True, "estimated_time": task.estimated_time}
    assert data["created"] == task.created_unix


async def test_submit_shape_top_level() -> None:
    """Shape C: the id and status at the top level, no envelope."""
    fake = FakeApimart(variants=Variants(submit_shape="top_level"))
    async with client(fake) as c:
        body = (await submit(c)).json()
    assert set(body) == {"id", "status"} and body["id"] in fake.tasks


async def test_submit_shape_versioned() -> None:
    """Shape D: ``data`` object with id/status/object plus an envelope ``request_id``."""
    fake = FakeApimart(variants=Variants(submit_shape="versioned"))
    async with client(fake) as c:
        body = (await submit(c)).json()
    assert body["code"] == 200 and body["request_id"].startswith("req_")
    assert body["data"]["object"] == "generation.task" and body["data"]["id"] in fake.tasks


@pytest.mark.parametrize("variants", [None, Variants(submit_shape="auto")])
async def test_submit_shape_auto_follows_the_version_header(variants: Variants | None) -> None:
    """``auto`` (the default) answers shape D to requests pinning the response version
    (as the official skill client does), A otherwise."""
    fake = FakeApimart(variants=variants)
    async with client(fake) as c:
        plain = (await submit(c)).json()
        pinned = (
            await c.post(
                "/v1/images/generations",
                json={"model": "imagen-4.0-apimart", "prompt": "x"},
                headers={"X-APIMart-Response-Version": "2026-07-27"},
            )
        ).json()
    assert isinstance(plain["data"], list)
    assert isinstance(pinned["data"], dict) and "request_id" in pinned
    assert pinned["data"]["object"] == "generation.task" and pinned["data"]["id"] in fake.tasks


@pytest.mark.parametrize("shape", ["list", "object", "top_level"])
async def test_a_fixed_submit_shape_ignores_the_version_header(shape: str) -> None:
    """A fixed shape stays selectable: the header does not turn it into shape D."""
    fake = FakeApimart(variants=Variants(submit_shape=shape))  # type: ignore[arg-type]
    async with client(fake) as c:
        pinned = (
            await c.post(
                "/v1/images/generations",
                json={"model": "imagen-4.0-apimart", "prompt": "x"},
                headers={"X-APIMart-Response-Version": "2026-07-27"},
            )
        ).json()
    assert "request_id" not in pinned
    if shape == "list":
        assert pinned["data"][0]["task_id"] in fake.tasks
    elif shape == "object":
        assert pinned["data"]["object"] == "image.generation.task"
    else:
        assert pinned["id"] in fake.tasks


# -- task lifecycle ------------------------------------------------------------------


async def test_lifecycle_on_a_manual_clock() -> None:
    """submitted -> pending -> processing (rising progress) -> completed, on the clock."""
    clock = ManualClock()
    fake = FakeApimart(latency=Latency.fixed(20.0), clock=clock)
    async with client(fake) as c:
        task_id = await submit_id(c, model="gemini-3-pro-image-preview", n=2)
        seen: list[tuple[str, int]] = []
        for step in [0.0, 0.0, 1.0, 2.0, 5.0, 5.0, 5.0, 1.5, 0.5]:
            clock.advance(step)
            data = await poll(c, task_id)
            seen.append((data["status"], data["progress"]))
            assert data["estimated_time"] >= 1 and isinstance(data["created"], int)
    assert seen[0] == ("submitted", 0) and seen[1] == ("submitted", 0)
    assert seen[2] == ("pending", 0)
    processing = [p for s, p in seen if s == "processing"]
    assert processing == [15, 40, 65, 90, 97]
    assert seen[-1] == ("completed", 100)
    task = fake.task(task_id)
    assert task.polls == 9 == fake.stats.polls_by_task[task_id]
    assert task.detected_at == clock() == task.completes_at


async def test_completed_task_fields() -> None:
    """A completed task has completed, actual_time, cost, credits_cost and expires_at=+24h."""
    clock = ManualClock()
    fake = FakeApimart(latency=Latency.fixed(19.0), clock=clock)
    async with client(fake) as c:
        task_id = await submit_id(c, model="gemini-3-pro-image-preview", n=3)
        clock.advance(19.0)
        data = await poll(c, task_id)
    assert data["status"] == "completed" and data["progress"] == 100
    assert data["completed"] - data["created"] == data["actual_time"] == 19
    assert data["cost"] == pytest.approx(0.45) and data["credits_cost"] == pytest.approx(4.5)
    (image,) = data["result"]["images"]
    assert image["expires_at"] == data["completed"] + 86400
    assert len(image["url"]) == 3 and len(set(image["url"])) == 3
    assert "error" not in data


@pytest.mark.parametrize("url_shape", ["list", "string", "entries"])
async def test_result_url_shapes_and_downloads(url_shape: str) -> None:
    """n=3 results in each URL shape; every URL serves a valid PNG without auth."""
    fake = FakeApimart(latency=Latency.zero(), variants=Variants(url_shape=url_shape))  # type: ignore[arg-type]
    async with client(fake) as c:
        task_id = await submit_id(c, model="gemini-2.5-flash-image-preview", n=3)
        images = (await poll(c, task_id))["result"]["images"]
        if url_shape == "list":
            assert len(images) == 1 and isinstance(images[0]["url"], list)
            urls = images[0]["url"]
        elif url_shape == "string":
            assert len(images) == 3 and all(isinstance(i["url"], str) for i in images)
            urls = [i["url"] for i in images]
        else:
            assert len(images) == 3 and all(len(i["url"]) == 1 for i in images)
            urls = [i["url"][0] for i in images]
        assert all(i["expires_at"] > 0 for i in images)
        assert len(set(urls)) == 3
        async with client(fake, key=None) as files:
            for url in urls:
                got = await files.get(url)
                assert got.status_code == 200
                assert got.headers["content-type"] == "image/png"
                assert got.content == RESULT_PNG
                assert assert_valid_png(got.content) == (8, 8)
    assert fake.stats.downloads == 3
    assert {r.host for r in fake.requests if r.endpoint == "download"} == {"upload.apimart.ai"}


async def test_optional_fields_can_be_dropped() -> None:
    """include_cost/include_expires_at=False drop those fields, as older responses did."""
    variants = Variants(include_cost=False, include_expires_at=False)
    fake = FakeApimart(latency=Latency.zero(), variants=variants)
    async with client(fake) as c:
        data = await poll(c, await submit_id(c))
    assert "cost" not in data and "credits_cost" not in data
    assert "expires_at" not in data["result"]["images"][0]


async def test_in_progress_spelling() -> None:
    """``processing_status="in_progress"`` reports the gpt-image-2 spelling while running."""
    clock = ManualClock()
    fake = FakeApimart(
        latency=Latency.fixed(10.0), clock=clock, variants=Variants(processing_status="in_progress")
    )
    async with client(fake) as c:
        task_id = await submit_id(c)
        clock.advance(5.0)
        data = await poll(c, task_id)
    assert (data["status"], data["progress"]) == ("in_progress", 50)


async def test_fast_default_completes_in_real_time() -> None:
    """The default profile's tasks last milliseconds; progress never goes backwards."""
    fake = FakeApimart()
    async with client(fake) as c:
        task_id = await submit_id(c)
        progress: list[int] = []
        for _ in range(5000):
            data = await poll(c, task_id)
            progress.append(data["progress"])
            if data["status"] == "completed":
                break
            await anyio.sleep(0.0005)
    assert data["status"] == "completed"
    assert progress == sorted(progress) and progress[-1] == 100
    task = fake.task(task_id)
    assert 0.002 <= task.real_duration <= 0.005 and 2.0 <= task.duration <= 5.0
    assert task.detected_at is not None and task.detected_at >= task.completes_at


async def test_zero_latency_completes_on_first_poll() -> None:
    """``Latency.zero()``: the very first poll after the submit sees ``completed``."""
    fake = FakeApimart(latency=Latency.zero())
    async with client(fake) as c:
        data = await poll(c, await submit_id(c))
    assert data["status"] == "completed"


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        (
            "int",
            {"code": 500, "message": "upstream content policy violation", "type": "task_failed"},
        ),
        (
            "string",
            {
                "code": "task_failed",
                "message": "upstream content policy violation",
                "type": "task_failed",
                "param": "",
            },
        ),
        ("plain", "upstream content policy violation"),
    ],
)
async def test_failed_task_error_variants(shape: str, expected: object) -> None:
    """A failed task carries its reason in each error variant, with credits_cost 0."""
    fake = FakeApimart(latency=Latency.zero(), variants=Variants(error_code=shape))  # type: ignore[arg-type]
    fake.script("task", ["task_failed"])
    async with client(fake) as c:
        data = await poll(c, await submit_id(c))
    assert data["status"] == "failed"
    assert data["error"] == expected
    assert data["credits_cost"] == 0 and data["cost"] == 0
    assert "result" not in data and data["actual_time"] >= 0
    assert fake.stats.faults == {"task_failed": 1}


async def test_stuck_tasks_never_finish() -> None:
    """Stuck tasks stay processing at 99%; unknown-status tasks report their odd status."""
    clock = ManualClock()
    fake = FakeApimart(latency=Latency.fixed(10.0), clock=clock)
    fake.script("task", ["task_stuck", "task_unknown_status", None])
    async with client(fake) as c:
        stuck, odd, normal = [await submit_id(c) for _ in range(3)]
        clock.advance(10_000.0)
        assert (await poll(c, stuck))["status"] == "processing"
        assert (await poll(c, stuck))["progress"] == 99
        assert (await poll(c, odd))["status"] == "queued_upstream"
        assert (await poll(c, normal))["status"] == "completed"
    assert fake.task(stuck).detected_at is None
    assert fake.status_of(odd) == "queued_upstream"


async def test_unknown_task_id_is_the_documented_400_in_english_by_default() -> None:
    """An unknown id: 400 in English by default (§6.1), ``无效的任务ID`` with ``language=zh``."""
    fake = FakeApimart()
    async with client(fake) as c:
        plain = await c.get("/v1/tasks/task_nope")
        zh = await c.get("/v1/tasks/task_nope", params={"language": "zh"})
        en = await c.get("/v1/tasks/task_nope", params={"language": "en"})
        other = await c.get("/v1/tasks/task_nope", params={"language": "ko"})
    assert plain.status_code == zh.status_code == en.status_code == other.status_code == 400
    error = plain.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error"
    assert error["message"].startswith("Invalid task ID (request id: ")
    assert zh.json()["error"]["message"].startswith("无效的任务ID (request id: ")
    assert en.json()["error"]["message"].startswith("Invalid task ID (request id: ")
    assert other.json()["error"]["message"].startswith("Invalid task ID (request id: ")
    assert fake.stats.polls == 4 and fake.stats.polls_by_task == {}


# -- idempotency ---------------------------------------------------------------------


async def test_same_key_same_body_replays_the_same_task() -> None:
    """A retried submit with the same key and body gets the original task back."""
    fake = FakeApimart()
    body = {"model": "flux-kontext-pro", "prompt": "x", "size": "16:9"}
    reordered = {"size": "16:9", "prompt": "x", "model": "flux-kontext-pro"}
    async with client(fake) as c:
        first = await c.post("/v1/images/generations", json=body, headers={"Idempotency-Key": "k1"})
        again = await c.post(
            "/v1/images/generations", json=reordered, headers={"Idempotency-Key": "k1"}
        )
    assert first.headers["idempotency-replayed"] == "false"
    assert again.headers["idempotency-replayed"] == "true"
    assert first.json() == again.json()
    assert fake.stats.tasks_created == 1 and fake.stats.replays == 1
    assert fake.stats.tasks_by_key == {"k1": [first.json()["data"][0]["task_id"]]}
    assert fake.duplicate_keys() == []


async def test_same_key_different_body_is_409() -> None:
    """Reusing a key for another request body is a 409 idempotency_key_reused."""
    fake = FakeApimart()
    async with client(fake) as c:
        ok = await c.post(
            "/v1/images/generations",
            json={"model": "imagen-4.0-apimart", "prompt": "one"},
            headers={"Idempotency-Key": "k"},
        )
        clash = await c.post(
            "/v1/images/generations",
            json={"model": "imagen-4.0-apimart", "prompt": "two"},
            headers={"Idempotency-Key": "k"},
        )
    assert ok.status_code == 200 and clash.status_code == 409
    error = clash.json()["error"]
    assert error["code"] == "idempotency_key_reused" and error["type"] == "invalid_request_error"
    assert fake.stats.tasks_created == 1 and fake.stats.conflicts == 1


async def test_ignoring_keys_creates_duplicates_and_reports_them() -> None:
    """``honour_idempotency=False``: every submit pays again; duplicate_keys() shows it."""
    fake = FakeApimart(honour_idempotency=False)
    async with client(fake) as c:
        for _ in range(2):
            response = await c.post(
                "/v1/images/generations",
                json={"model": "imagen-4.0-apimart", "prompt": "x"},
                headers={"Idempotency-Key": "job-7"},
            )
            assert "idempotency-replayed" not in response.headers
        await submit_id(c)  # no key at all
    assert fake.stats.tasks_created == 3
    assert len(fake.stats.tasks_by_key["job-7"]) == 2 and len(fake.stats.tasks_by_key[None]) == 1
    assert fake.duplicate_keys() == ["job-7"]


async def test_invalid_idempotency_key_is_400() -> None:
    """A key outside 1-191 visible ASCII characters is rejected."""
    fake = FakeApimart()
    async with client(fake) as c:
        response = await c.post(
            "/v1/images/generations",
            json={"model": "imagen-4.0-apimart", "prompt": "x"},
            headers={"Idempotency-Key": "x" * 192},
        )
    assert response.status_code == 400 and fake.stats.tasks_created == 0


# -- counters and recording ----------------------------------------------------------


async def test_max_in_flight_counts_concurrent_requests() -> None:
    """20 concurrent requests held 50 ms each are all in flight at once."""
    fake = FakeApimart(latency=Latency.fast(request_latency=(0.05, 0.05)))
    async with client(fake) as c, anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(submit, c)
    assert fake.stats.max_in_flight == 20
    assert fake.stats.in_flight == 0
    assert fake.stats.submits == fake.stats.tasks_created == 20


async def test_polls_are_counted_per_task() -> None:
    """polls counts every poll request; polls_by_task and FakeTask.polls each task's."""
    fake = FakeApimart()
    async with client(fake) as c:
        a, b = await submit_id(c), await submit_id(c)
        for _ in range(3):
            await poll(c, a)
        await poll(c, b)
    assert fake.stats.polls == 4
    assert fake.stats.polls_by_task == {a: 3, b: 1}
    assert (fake.task(a).polls, fake.task(b).polls) == (3, 1)


async def test_requests_are_recorded_with_the_key_redacted() -> None:
    """Each request is recorded with host, path, body summary; the key never appears."""
    fake = FakeApimart(api_key="sk-secret-123")
    async with client(fake, key="sk-secret-123") as c:
        await c.post("/v1/uploads/images", files={"file": ("cat.png", png())})
        task_id = await submit_id(c, prompt="p")
        await c.get(f"/v1/tasks/{task_id}", params={"language": "en"})
    upload, sub, query = fake.requests
    assert "sk-secret-123" not in repr(fake.requests)
    assert upload.endpoint == "upload" and upload.filename == "cat.png" and upload.status == 200
    assert upload.headers["authorization"] == "Bearer ***" and upload.authorized
    assert sub.json_keys == ("model", "prompt") and sub.task_id == task_id
    assert sub.host == "api.apimart.ai" and sub.body_size > 0
    assert query.path == f"/v1/tasks/{task_id}" and query.query == "language=en"
    assert all(r.finished is not None and r.finished >= r.started for r in fake.requests)


async def test_recording_can_be_disabled_but_counters_stay() -> None:
    """``record_requests=False`` keeps no log, but every counter still counts."""
    fake = FakeApimart(record_requests=False)
    async with client(fake) as c:
        await poll(c, await submit_id(c))
    assert fake.requests == []
    assert fake.stats.requests_total == 2 and fake.stats.status_counts == {200: 2}


async def test_key_sent_to_file_host_is_counted() -> None:
    """A client leaking its Authorization header to the file host is caught."""
    fake = FakeApimart(latency=Latency.zero())
    async with client(fake) as c:
        url = (await poll(c, await submit_id(c)))["result"]["images"][0]["url"][0]
        await c.get(url)  # this client sends its key everywhere
    assert fake.stats.file_requests_with_auth == 1
    assert fake.requests[-1].authorized and fake.requests[-1].host == "upload.apimart.ai"


async def test_downloads_of_unknown_files_are_404_and_head_has_no_body() -> None:
    """Unknown file paths are 404; HEAD of a result reports its length only."""
    fake = FakeApimart(latency=Latency.zero())
    async with client(fake) as c:
        task_id = await submit_id(c)
        await poll(c, task_id)
        missing = await c.get("https://upload.apimart.ai/f/image/nope.png")
        beyond = await c.get(f"https://upload.apimart.ai/f/image/{task_id}_1.png")
        head = await c.head(f"https://upload.apimart.ai/f/image/{task_id}_0.png")
    assert missing.status_code == beyond.status_code == 404
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(RESULT_PNG))


async def test_unknown_paths_and_wrong_methods() -> None:
    """Undocumented paths are 404 (as probed); a known path with the wrong verb is 405."""
    fake = FakeApimart()
    async with client(fake) as c:
        old_path = await c.get("/v1/images/generations/task_x")
        wrong_verb = await c.get("/v1/images/generations")
    assert old_path.status_code == 404 and wrong_verb.status_code == 405
    assert fake.stats.tasks_created == 0


async def test_reset_stats_keeps_tasks() -> None:
    """reset_stats() zeroes counters and the log; tasks stay queryable; reset() forgets all."""
    fake = FakeApimart()
    async with client(fake) as c:
        task_id = await submit_id(c)
        fake.reset_stats()
        assert fake.stats.requests_total == 0 and fake.requests == []
        await poll(c, task_id)
        assert fake.stats.polls_by_task == {task_id: 1}
        fake.reset()
        assert (await c.get(f"/v1/tasks/{task_id}")).status_code == 400


# -- admin endpoints -----------------------------------------------------------------


async def test_admin_stats_and_reset() -> None:
    """GET /_fake/stats reports counters and task timings; POST /_fake/reset zeroes them."""
    fake = FakeApimart(latency=Latency.zero())
    async with client(fake, key=None) as anon, client(fake) as c:
        task_id = await submit_id(c)
        await poll(c, task_id)
        stats = (await anon.get("/_fake/stats")).json()
        brief = (await anon.get("/_fake/stats", params={"tasks": "0"})).json()
        assert (await anon.post("/_fake/reset")).json() == {"ok": True}
        after = (await anon.get("/_fake/stats")).json()
    assert stats["stats"]["submits"] == 1 and stats["stats"]["polls"] == 1
    assert stats["stats"]["status_counts"] == {"200": 2}
    assert stats["tasks_summary"]["by_status"] == {"completed": 1}
    assert stats["tasks_summary"]["detection_lag"]["count"] == 1
    (task,) = stats["tasks"]
    assert task["id"] == task_id and task["polls"] == 1 and task["detected_at"] is not None
    assert "tasks" not in brief
    assert after["stats"]["requests_total"] == 0 and after["tasks_summary"]["count"] == 1
    assert fake.stats.requests_total == 0  # admin calls are not counted


async def test_admin_script_and_faults() -> None:
    """POST /_fake/script and /_fake/faults reconfigure a running fake."""
    fake = FakeApimart()
    async with client(fake) as c:
        ok = await c.post("/_fake/script", json={"endpoint": "submit", "steps": [503]})
        assert ok.status_code == 200
        assert (await submit(c)).status_code == 503
        await c.post("/_fake/faults", json={"poll": {"rate_limit": 1.0}})
        task_id = await submit_id(c)
        assert (await c.get(f"/v1/tasks/{task_id}")).status_code == 429
        bad = await c.post("/_fake/script", json={"endpoint": "nope", "steps": []})
    assert bad.status_code == 400


# -- determinism ---------------------------------------------------------------------


async def test_same_seed_same_behaviour() -> None:
    """Two fakes with one seed draw the same durations, estimates and id randomness."""

    async def run(seed: int) -> list[tuple[float, int, str]]:
        fake = FakeApimart(seed=seed, latency=Latency.realistic())
        async with client(fake) as c:
            ids = [await submit_id(c) for _ in range(5)]
        return [(fake.task(i).duration, fake.task(i).estimated_time, i[-16:]) for i in ids]

    first, second, other = await run(7), await run(7), await run(8)
    assert first == second and first != other
    assert all(2.0 <= d <= 120.0 for d, _, _ in first)


async def test_many_pipelines_in_process() -> None:
    """A thousand submit+poll round trips run in process without sockets."""
    fake = FakeApimart(latency=Latency.zero(), record_requests=False)
    async with client(fake) as c:
        for _ in range(1000):
            assert (await poll(c, await submit_id(c)))["status"] == "completed"
    assert fake.stats.tasks_created == 1000 and json.loads(json.dumps(fake.snapshot()))
