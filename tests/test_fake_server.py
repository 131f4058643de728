"""FakeApimart over real loopback HTTP: ``fake.serve()`` and ``python -m apimart_async.testing``.

These start uvicorn (the ``server`` extra), so they are the slowest fake tests; each
server lives well under a second.
"""

from __future__ import annotations

import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

import apimart_async
from apimart_async.testing import FakeApimart, Faults, Latency, Webhooks

pytestmark = pytest.mark.anyio

PNG = (
    b"\x89PNG\r\n\x1a\n"
    + struct.pack(">I", 13)
    + b"IHDR"
    + struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    + struct.pack(">I", zlib.crc32(b"IHDR" + struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)))
)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each async test once per backend."""
    return str(request.param)


def is_png(data: bytes) -> bool:
    """A PNG whose chunks all carry correct CRCs, ending in IEND."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos, kind = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            return False
        pos += 12 + length
    return kind == b"IEND"


async def test_full_pipeline_over_loopback() -> None:
    """upload -> submit -> poll -> download over real HTTP, then /_fake/stats and reset."""
    fake = FakeApimart(api_key="k")
    async with fake.serve() as base_url:
        assert base_url.startswith("http://127.0.0.1:") and fake.base_url == base_url
        port = base_url.rsplit(":", 1)[1]
        assert fake.files_base_url == f"http://localhost:{port}"
        auth = {"Authorization": "Bearer k"}
        async with (
            httpx.AsyncClient(base_url=base_url, headers=auth) as api,
            httpx.AsyncClient() as files,
        ):
            up = await api.post("/v1/uploads/images", files={"file": ("ref.png", PNG)})
            assert up.status_code == 200, up.text
            ref_url = up.json()["url"]
            assert ref_url.startswith(f"http://localhost:{port}/f/image/")
            assert (await files.get(ref_url)).content == PNG

            sub = await api.post(
                "/v1/images/generations",
                json={
                    "model": "gemini-3-pro-image-preview",
                    "prompt": "x",
                    "n": 2,
                    "image_urls": [ref_url],
                },
            )
            task_id = sub.json()["data"][0]["task_id"]
            for _ in range(2000):
                data = (await api.get(f"/v1/tasks/{task_id}")).json()["data"]
                if data["status"] == "completed":
                    break
                await anyio.sleep(0.001)
            assert data["status"] == "completed"
            urls = data["result"]["images"][0]["url"]
            assert len(urls) == 2
            for url in urls:
                got = await files.get(url)
                assert got.status_code == 200 and got.headers["content-type"] == "image/png"
                assert is_png(got.content)

            stats = (await files.get(f"{base_url}/_fake/stats")).json()
            assert (await files.post(f"{base_url}/_fake/reset")).json() == {"ok": True}
            after = (await files.get(f"{base_url}/_fake/stats")).json()

    counters = stats["stats"]
    assert counters["uploads"] == 1 and counters["submits"] == 1
    assert counters["tasks_created"] == 1 and counters["downloads"] == 3
    assert counters["file_requests_with_auth"] == 0
    assert counters["polls_by_task"][task_id] == counters["polls"] >= 1
    (task,) = stats["tasks"]
    assert task["status"] == "completed" and task["detected_at"] >= task["completes_at"]
    assert after["stats"]["requests_total"] == 0 and fake.requests == []
    # Back to the in-process origins once the server is gone.
    assert fake.base_url == "https://api.apimart.ai"
    assert fake.files_base_url == "https://upload.apimart.ai"


async def test_api_and_file_hosts_are_recorded() -> None:
    """Requests to the API and to the file origin arrive with their own Host."""
    fake = FakeApimart(latency=Latency.zero())
    body = {"model": "imagen-4.0-apimart", "prompt": "x"}
    auth = {"Authorization": "Bearer test"}
    async with fake.serve() as base_url, httpx.AsyncClient(base_url=base_url, headers=auth) as c:
        submitted = (await c.post("/v1/images/generations", json=body)).json()
        task = (await c.get(f"/v1/tasks/{submitted['data'][0]['task_id']}")).json()["data"]
        await c.get(task["result"]["images"][0]["url"][0])  # leaks the key on purpose
    hosts = [r.host.split(":")[0] for r in fake.requests]
    assert hosts == ["127.0.0.1", "127.0.0.1", "localhost"]
    assert fake.stats.file_requests_with_auth == 1


async def test_faults_over_real_http() -> None:
    """Drops surface as truncated responses, a stall as a read timeout, 429 intact."""
    fake = FakeApimart(faults=Faults(stall_seconds=30.0, retry_after=1.0))
    fake.script("submit", ["drop_after_submit", "reset", "stall", "rate_limit", None])
    body = {"model": "imagen-4.0-apimart", "prompt": "x"}
    async with fake.serve() as base_url:
        auth = {"Authorization": "Bearer test"}
        async with httpx.AsyncClient(base_url=base_url, headers=auth, timeout=10.0) as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.post("/v1/images/generations", json=body)
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                await c.post("/v1/images/generations", json=body)
            with pytest.raises(httpx.ReadTimeout):
                await c.post(
                    "/v1/images/generations", json=body, timeout=httpx.Timeout(5, read=0.2)
                )
            limited = await c.post("/v1/images/generations", json=body)
            ok = await c.post("/v1/images/generations", json=body)
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert ok.status_code == 200
    # The drop and the stall acted; the reset and the 429 did not.
    assert fake.stats.tasks_created == 3
    assert fake.stats.faults == {"drop_after_submit": 1, "reset": 1, "stall": 1, "rate_limit": 1}


def _read_line(stream: Any, timeout: float) -> str:
    """One line from *stream*, or fail after *timeout* seconds."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        pytest.fail("the fake server printed no URL")


def test_cli_prints_its_url_serves_and_exits_cleanly() -> None:
    """``python -m apimart_async.testing --port 0`` prints one URL line and exits 0 on SIGTERM."""
    root = Path(apimart_async.__file__).parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    args = [
        sys.executable,
        "-m",
        "apimart_async.testing",
        "--port",
        "0",
        "--api-key",
        "cli-key",
        "--latency",
        "zero",
        "--faults",
        '{"poll": {"rate_limit": 0.0}}',
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        line = _read_line(proc.stdout, timeout=30.0)
        assert line.startswith("APIMART_FAKE_URL=http://127.0.0.1:") and line.endswith("\n")
        url = line.strip().split("=", 1)[1]
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer cli-key"}) as c:
            sub = c.post(
                "/v1/images/generations", json={"model": "flux-kontext-pro", "prompt": "x"}
            )
            task_id = sub.json()["data"][0]["task_id"]
            data = c.get(f"/v1/tasks/{task_id}").json()["data"]
            stats = c.get("/_fake/stats").json()
        assert data["status"] == "completed"
        assert data["result"]["images"][0]["url"][0].startswith("http://localhost:")
        assert stats["stats"]["tasks_created"] == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # The URL again as the variable the client reads; nothing else on stdout.
        assert proc.stdout.read() == f"APIMART_BASE_URL={url}\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_cli_arguments_build_the_fake() -> None:
    """Each CLI option maps onto the fake's configuration; bad values are errors."""
    from apimart_async.testing.__main__ import build_parser, fake_from_args, webhook_rewrites

    parser = build_parser()
    fake = fake_from_args(
        parser.parse_args(
            [
                "--latency",
                "fixed:20",
                "--time-scale",
                "0.5",
                "--request-latency",
                "0.001,0.002",
                "--faults",
                '{"submit": {"rate_limit": 0.2}}',
                "--variants",
                '{"url_shape": "string", "submit_shape": "object"}',
                "--ignore-idempotency",
                "--accept-unknown-models",
                "--seed",
                "9",
                "--balance",
                "2.5",
                "--price",
                "flux-kontext-pro=0.5",
                "--price",
                "my-model=0.01",
                "--payment-required-on-reads",
                "--webhooks",
                '{"drop": 0.01, "retry_delays": [1, 2, 3]}',
            ]
        )
    )
    assert fake.latency == Latency.fixed(20.0, time_scale=0.5, request_latency=(0.001, 0.002))
    assert fake.faults == {"submit": Faults(rate_limit=0.2)}
    assert fake.variants.url_shape == "string" and fake.variants.submit_shape == "object"
    assert not fake.honour_idempotency
    assert fake.balance.remaining == 2.5 and fake.payment_required_on_reads
    assert fake.price_of("flux-kontext-pro") == 0.5 and fake.price_of("my-model") == 0.01
    assert fake.webhooks == Webhooks(drop=0.01, retry_delays=(1, 2, 3))
    plain = fake_from_args(parser.parse_args([]))
    assert plain.latency == Latency.fast() and plain.balance.unlimited
    assert plain.state_path is None and plain.webhooks == Webhooks()
    rewrites = webhook_rewrites(
        parser.parse_args(["--webhook-rewrite", "https://h.example.com=http://127.0.0.1:9"])
    )
    assert rewrites == {"https://h.example.com": "http://127.0.0.1:9"}
    for bad in (
        ["--latency", "slow"],
        ["--faults", "[1]"],
        ["--faults", "{"],
        ["--variants", '{"x": 1}'],
        ["--price", "flux-kontext-pro"],
        ["--price", "flux-kontext-pro=cheap"],
        ["--price", "flux-kontext-pro=-1"],
        ["--balance", "-3"],
        ["--webhooks", '{"drop": 2}'],
    ):
        with pytest.raises((ValueError, TypeError)):
            fake_from_args(parser.parse_args(bad))
    with pytest.raises(ValueError, match="--webhook-rewrite"):
        webhook_rewrites(parser.parse_args(["--webhook-rewrite", "nothing"]))
