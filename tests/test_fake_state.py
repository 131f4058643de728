"""FakeApimart's state file: a fake re-created from it (even after ``kill -9``) knows the
earlier task ids, their tasks keep progressing, and keys, uploads, balance and pending
webhook callbacks carry over.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import apimart_async
from apimart_async import AsyncApimart, TaskStatus
from apimart_async.testing import FakeApimart, Fault, Latency, ManualClock, Webhooks
from tests.conftest import FAST_LIMITS, FAST_POLL

pytestmark = pytest.mark.anyio

API = "https://api.apimart.ai"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 24


def api(fake: FakeApimart) -> httpx.AsyncClient:
    """A plain httpx client to *fake*'s API with its key."""
    return httpx.AsyncClient(
        transport=fake.transport(),
        base_url=API,
        headers={"Authorization": f"Bearer {fake.api_key}"},
    )


async def submit(c: httpx.AsyncClient, key: str | None = None, **body: Any) -> httpx.Response:
    """POST a generation (imagen unless told otherwise), with an Idempotency-Key if given."""
    headers = {"Idempotency-Key": key} if key else {}
    payload = {"model": "imagen-4.0-apimart", "prompt": "x", **body}
    return await c.post("/v1/images/generations", json=payload, headers=headers)


def lines(path: Path) -> list[dict[str, Any]]:
    """The state file's records (header included)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_a_new_fake_continues_the_old_ones_tasks(tmp_path: Path) -> None:
    """Task ids, their answers, idempotency keys, uploads and the balance all survive."""
    path = tmp_path / "fake.jsonl"
    first = FakeApimart(latency=Latency.zero(), balance=1.0, state_path=path)
    async with api(first) as c:
        keyed = await submit(c, key="job-1")
        plain = (await submit(c, model="flux-kontext-pro", n=1)).json()["data"][0]["task_id"]
        upload = (await c.post("/v1/uploads/images", files={"file": ("r.png", PNG)})).json()
    keyed_id = keyed.json()["data"][0]["task_id"]
    assert first.state_path == str(path)

    second = FakeApimart(latency=Latency.zero(), balance=50.0, state_path=path)
    assert set(second.tasks) == {keyed_id, plain}
    async with api(second) as c:
        replay = await submit(c, key="job-1")
        clash = await submit(c, key="job-1", prompt="other")
        polled = (await c.get(f"/v1/tasks/{plain}")).json()["data"]
        got = await c.get(upload["url"])
    assert replay.headers["idempotency-replayed"] == "true" and replay.json() == keyed.json()
    assert clash.status_code == 409
    assert polled["status"] == "completed" and polled["cost"] == pytest.approx(0.032)
    assert got.status_code == 200 and got.content == PNG
    # The file's balance wins over the constructor's: 1.0 minus what was spent.
    assert second.balance.remaining == pytest.approx(1.0 - 0.04 - 0.032)
    assert second.stats.tasks_created == 0  # counters are per process


async def test_tasks_keep_progressing_on_wall_clock_time(tmp_path: Path) -> None:
    """Times are stored as wall-clock: the re-created task ends when the original would
    have, not a full duration after the restart."""
    path = tmp_path / "fake.jsonl"
    first = FakeApimart(latency=Latency.fixed(1000.0, time_scale=1.0), state_path=path)
    async with api(first) as c:
        task_id = (await submit(c)).json()["data"][0]["task_id"]
    original = first.task(task_id)
    ends_in_wall = original.completes_at - time.monotonic() + time.time()

    second = FakeApimart(state_path=path)
    task = second.task(task_id)
    assert task.completes_at - time.monotonic() + time.time() == pytest.approx(ends_in_wall, abs=5)
    assert (task.created_unix, task.estimated_time) == (
        original.created_unix,
        original.estimated_time,
    )
    assert second.status_of(task_id) in ("submitted", "pending", "processing")
    assert second.status_of(task_id, now=task.completes_at) == "completed"


async def test_a_failed_tasks_refund_carries_over(tmp_path: Path) -> None:
    """A task that fails after the restart is refunded by the new fake."""
    path = tmp_path / "fake.jsonl"
    first = FakeApimart(
        latency=Latency.fixed(1000.0, time_scale=1.0), balance=0.04, state_path=path
    )
    first.script("task", [Fault.TASK_FAILED])
    async with api(first) as c:
        task_id = (await submit(c)).json()["data"][0]["task_id"]
    assert first.balance.remaining == 0.0

    second = FakeApimart(state_path=path)
    assert second.balance.remaining == 0.0  # reserved until the task fails
    assert second.task(task_id).fate == "fail"
    second.set_balance(0.0)  # a balance record after the reservation: the refund still comes
    clock = ManualClock(time.monotonic())
    third = FakeApimart(state_path=path, clock=clock)
    assert third.balance.remaining == 0.0
    clock.advance(third.task(task_id).completes_at - clock())  # the task's end
    assert third.status_of(task_id) == "failed"
    assert third.balance.remaining == pytest.approx(0.04) and third.balance.used == 0


async def test_the_client_resumes_with_a_recreated_fake(tmp_path: Path) -> None:
    """The real client waits on a task id handed out by a fake that is gone."""
    path = tmp_path / "fake.jsonl"
    first = FakeApimart(api_key="test-key", latency=Latency.fixed(0.05), state_path=path)
    async with AsyncApimart(
        api_key="test-key", transport=first.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as client:
        task = await client.submit(model="gemini-3-pro-image-preview", prompt="x", n=2)

    second = FakeApimart(api_key="test-key", state_path=path)
    async with AsyncApimart(
        api_key="test-key", transport=second.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as client:
        done = await client.wait(task.id)
    assert done.status is TaskStatus.COMPLETED and len(done.image_urls) == 2


async def test_unsent_callbacks_are_sent_by_the_next_fake(tmp_path: Path) -> None:
    """A callback not delivered before the stop is delivered after the restart; a
    delivered one is not sent again."""
    path = tmp_path / "fake.jsonl"
    hook = "https://hooks.example.com/h"
    seen: list[str] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["data"]["id"])
        return httpx.Response(200)

    first = FakeApimart(latency=Latency.zero(), state_path=path, webhooks=Webhooks())
    async with api(first) as c:
        async with first.webhook_sender(transport=httpx.MockTransport(receiver)) as sender:
            delivered = (await submit(c, webhook=hook)).json()["data"][0]["task_id"]
            await sender.drain()
        waiting = (await submit(c, webhook=hook)).json()["data"][0]["task_id"]
    assert seen == [delivered] and first.pending_webhooks == 1

    second = FakeApimart(state_path=path)
    assert second.pending_webhooks == 1
    async with second.webhook_sender(transport=httpx.MockTransport(receiver)) as sender:
        await sender.drain()
    assert seen == [delivered, waiting]
    assert FakeApimart(state_path=path).pending_webhooks == 0


async def test_file_is_appended_then_compacted(tmp_path: Path) -> None:
    """Each change is one appended line; opening the file rewrites it compacted (one
    record per task and upload, one balance record)."""
    path = tmp_path / "fake.jsonl"
    fake = FakeApimart(latency=Latency.zero(), state_path=path)
    async with api(fake) as c:
        for _ in range(3):
            await submit(c)
        fake.set_balance(5.0)
        fake.set_balance(4.0)
    kinds = [r.get("t") for r in lines(path)]
    assert kinds == [None, "balance", "task", "task", "task", "balance", "balance"]
    assert lines(path)[0] == {"format": "apimart-fake-state", "version": 1}

    FakeApimart(state_path=path)
    kinds = [r.get("t") for r in lines(path)]
    assert kinds == [None, "task", "task", "task", "balance"]
    assert lines(path)[-1]["remaining"] == 4_000_000
    assert not any(p.name.startswith(".fake.jsonl.") for p in tmp_path.iterdir())


async def test_save_writes_a_snapshot_a_fake_can_continue(tmp_path: Path) -> None:
    """``save()`` of a fake without a state file; a fake from that file continues it."""
    fake = FakeApimart(latency=Latency.zero())
    async with api(fake) as c:
        task_id = (await submit(c, key="k")).json()["data"][0]["task_id"]
    fake.save(tmp_path / "snap.jsonl")
    again = FakeApimart(state_path=tmp_path / "snap.jsonl")
    assert again.task(task_id).idempotency_key == "k"
    assert again._state.idempotency["k"][1] == task_id


async def test_reset_empties_the_file(tmp_path: Path) -> None:
    """``reset()`` forgets everything, in the file too."""
    path = tmp_path / "fake.jsonl"
    fake = FakeApimart(latency=Latency.zero(), balance=2.0, state_path=path)
    async with api(fake) as c:
        await submit(c)
    fake.reset()
    assert fake.balance.remaining == 2.0
    assert FakeApimart(state_path=path).tasks == {}


def test_a_torn_last_line_is_ignored(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial last line: it is dropped (nothing that was
    never written completely was ever answered)."""
    path = tmp_path / "fake.jsonl"
    FakeApimart(state_path=path)
    with path.open("a", encoding="utf-8") as fh:
        fh.write('{"t":"task","id":"task_half')
    fake = FakeApimart(state_path=path)
    assert fake.tasks == {}
    assert path.read_text(encoding="utf-8").endswith("\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("hello\n", "not a fake state file"),
        ('{"format":"apimart-fake-state","version":99}\n', "version 99"),
        ('{"format":"apimart-fake-state","version":1}\nnope\n{"t":"balance"}\n', "line 2"),
        ('{"format":"apimart-fake-state","version":1}\n{"t":"task","id":"x"}\n', "damaged"),
        ('{"format":"apimart-fake-state","version":1}\n{"t":"mystery"}\n', "mystery"),
    ],
)
def test_a_foreign_or_damaged_file_is_an_error(tmp_path: Path, content: str, message: str) -> None:
    """Not silently starting from nothing: a clear error naming the file."""
    path = tmp_path / "fake.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as info:
        FakeApimart(state_path=path)
    assert str(path) in str(info.value)
    assert path.read_text(encoding="utf-8") == content  # left as it was


def _read_line(stream: Any, timeout: float) -> str:
    lines_: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines_.put(stream.readline()), daemon=True).start()
    try:
        return lines_.get(timeout=timeout)
    except queue.Empty:
        pytest.fail("the fake server printed no URL")


def _start(state: Path) -> tuple[subprocess.Popen[str], str]:
    root = Path(apimart_async.__file__).parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    args = [sys.executable, "-m", "apimart_async.testing", "--port", "0", "--state", str(state)]
    args += ["--latency", "fixed:2", "--time-scale", "0.05", "--balance", "10"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    assert proc.stdout is not None
    line = _read_line(proc.stdout, timeout=30.0)
    return proc, line.strip().split("=", 1)[1]


def _stop(proc: subprocess.Popen[str], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def test_kill_9_then_restart_knows_every_task_id_it_answered(tmp_path: Path) -> None:
    """``python -m apimart_async.testing --state FILE``: every task id a client received
    before ``kill -9`` is known to the restarted server, and those tasks complete."""
    state = tmp_path / "fake-state.jsonl"
    proc, url = _start(state)
    headers = {"Authorization": "Bearer test"}
    try:
        with httpx.Client(base_url=url, headers=headers) as c:
            ids = [
                c.post(
                    "/v1/images/generations",
                    json={"model": "flux-kontext-pro", "prompt": f"p{i}"},
                    headers={"Idempotency-Key": f"job-{i}"},
                ).json()["data"][0]["task_id"]
                for i in range(25)
            ]
    finally:
        _stop(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL

    proc, url = _start(state)
    try:
        with httpx.Client(base_url=url, headers=headers) as c:
            statuses: dict[str, str] = {}
            deadline = time.monotonic() + 60  # a bound, not a timing assertion
            while len(statuses) < len(ids) and time.monotonic() < deadline:
                for task_id in ids:
                    response = c.get(f"/v1/tasks/{task_id}")
                    assert response.status_code == 200, response.text
                    if response.json()["data"]["status"] == "completed":
                        statuses[task_id] = "completed"
                time.sleep(0.02)
            replay = c.post(
                "/v1/images/generations",
                json={"model": "flux-kontext-pro", "prompt": "p3"},
                headers={"Idempotency-Key": "job-3"},
            )
            balance = c.get("/v1/balance").json()
    finally:
        _stop(proc, signal.SIGTERM)
    assert len(statuses) == len(ids)
    assert replay.json()["data"][0]["task_id"] == ids[3]
    assert balance["remain_balance"] == pytest.approx(10 - 25 * 0.032)
