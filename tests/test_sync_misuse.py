"""Misuse of the clients across threads and event loops gets a clear error, not a hang.

The first tests are the blocking client's own. The last one is the async client's side
of issue 16: an ``AsyncApimart`` used on another event loop than the one it first ran
on (the core's check, which points to ``Apimart``).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trio

import apimart_async as am
from apimart_async import Apimart, AsyncApimart
from apimart_async.testing import FakeApimart

from .conftest import FAST_LIMITS, FAST_POLL

KEY = "test-key"
GEM = "gemini-3.1-flash-image-preview"


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The event loop the client runs in its thread: asyncio, then trio."""
    monkeypatch.setattr(Apimart, "_backend", request.param)
    return str(request.param)


def make(fake: FakeApimart) -> Apimart:
    """A blocking client on the fake, with the test timings."""
    return Apimart(api_key=KEY, transport=fake.transport(), poll=FAST_POLL, limits=FAST_LIMITS)


def test_calling_the_client_from_its_callback_is_refused(backend: str) -> None:
    """A callback runs on the client's thread: calling back in is an error, not a deadlock."""
    fake = FakeApimart(api_key=KEY)
    with make(fake) as client:

        def on_event(event: am.Event) -> None:
            if isinstance(event, am.types.SubmittedEvent):
                client.get_task(event.task_id)

        with pytest.raises(RuntimeError, match="from its own thread"):
            client.generate(model=GEM, prompt="x", on_event=on_event)

        def source() -> Iterator[dict[str, Any]]:
            yield {"model": GEM, "prompt": "first"}
            client.close()

        with (
            pytest.raises(RuntimeError, match="closed from its own thread"),
            client.generate_many(source()) as outcomes,
        ):
            list(outcomes)
        assert not client.is_closed
        assert client.generate(model=GEM, prompt="still fine").status is am.TaskStatus.COMPLETED


def test_close_from_two_threads_at_once(backend: str) -> None:
    """Two threads closing together: both return once the client's thread has ended."""
    fake = FakeApimart(api_key=KEY)
    client = make(fake)
    client.generate(model=GEM, prompt="x")
    (loop_thread,) = [
        t
        for t in threading.enumerate()
        if t.ident == client._runner.thread_id  # pyright: ignore[reportPrivateUsage]
    ]
    ended: list[bool] = []
    start = threading.Barrier(2)

    def close() -> None:
        start.wait()
        client.close()
        ended.append(not loop_thread.is_alive())

    closers = [threading.Thread(target=close) for _ in range(2)]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join(10)
    assert ended == [True, True]


def test_a_client_whose_loop_ended_says_so(backend: str) -> None:
    """Should the client's loop end on its own, calls fail clearly and close() still works."""
    fake = FakeApimart(api_key=KEY)
    client = make(fake)
    task = client.submit(model=GEM, prompt="x")
    portal = client._runner._portal  # pyright: ignore[reportPrivateUsage]
    portal.call(portal.stop)  # the loop ends under the client's feet
    with pytest.raises(RuntimeError, match="event loop of this Apimart client has ended"):
        client.get_task(task.id)
    assert client.orphaned_tasks() == []
    client.close()
    assert client.is_closed
    with pytest.raises(RuntimeError, match="closed"):
        client.get_task(task.id)


@pytest.mark.parametrize("second", ["asyncio", "trio"])
def test_async_client_on_another_event_loop_is_a_clear_error(second: str) -> None:
    """Issue 16: a module-level AsyncApimart driven by two asyncio.run calls (or asyncio
    then trio) raises a RuntimeError naming the class, the loop binding and the way out."""
    fake = FakeApimart(api_key=KEY)
    client = AsyncApimart(api_key=KEY, transport=fake.transport(), poll=FAST_POLL)

    async def generate() -> am.Task:
        return await client.generate(model=GEM, prompt="x")

    assert asyncio.run(generate()).status is am.TaskStatus.COMPLETED
    with pytest.raises(RuntimeError) as raised:
        asyncio.run(generate()) if second == "asyncio" else trio.run(generate)
    message = str(raised.value)
    assert "AsyncApimart" in message and "bound to another event loop" in message
    assert re.search(r"\bApimart\b", message)  # the way out: the blocking client
