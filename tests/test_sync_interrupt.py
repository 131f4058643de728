"""Ctrl-C in a blocking call, and a process that exits without closing its client.

In-process tests deliver a real SIGINT to the main thread (``signal.pthread_kill``) at
a chosen request, from the client's own thread, and hold that request's answer back
until the main thread has received it: the interrupt lands while the request is on the
wire, every time. Each test then checks that the work was cancelled before
``KeyboardInterrupt`` was raised (the client's loop is idle, the fake has nothing in
flight), that a paid submit already sent was still heard (its ``SubmittedEvent``), that
no request for the task followed, and that the client still works.

The subprocess tests run scripts the way a user would: Ctrl-C (SIGINT from outside)
during a ``generate`` against the fake served over real HTTP, and a script that never
calls ``close()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.from_thread import start_blocking_portal

import apimart_async as am
from apimart_async import Apimart, PollPolicy
from apimart_async.testing import FakeApimart, Latency
from apimart_async.types import SubmittedEvent

from .conftest import FAST_LIMITS, FAST_POLL

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
GEM = "gemini-3.1-flash-image-preview"


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The event loop the client runs in its thread: asyncio, then trio."""
    monkeypatch.setattr(Apimart, "_backend", request.param)
    return str(request.param)


@pytest.fixture
def delivered() -> Iterator[threading.Event]:
    """SIGINT raises KeyboardInterrupt as by default, and also sets the event yielded."""
    seen = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        seen.set()
        signal.default_int_handler(signum, frame)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def endpoint_of(url: httpx.URL) -> str:
    """Which service endpoint a URL is for."""
    if url.path.startswith("/v1/uploads/"):
        return "upload"
    if url.path == "/v1/images/generations":
        return "submit"
    return "poll" if url.path.startswith("/v1/tasks/") else "other"


class CtrlC(httpx.AsyncBaseTransport):
    """The fake's transport; "presses Ctrl-C" once the fake answered the *nth* request to
    *endpoint*, and holds that answer back until the main thread has the interrupt."""

    def __init__(self, fake: FakeApimart, delivered: threading.Event, endpoint: str, nth: int = 1):
        self.inner = fake.transport()
        self.delivered = delivered
        self.endpoint = endpoint
        self.nth = nth
        self.seen: Counter[str] = Counter()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Forward to the fake; interrupt the main thread on the chosen request."""
        kind = endpoint_of(request.url)
        self.seen[kind] += 1
        number = self.seen[kind]
        response = await self.inner.handle_async_request(request)
        if kind == self.endpoint and number == self.nth:
            assert threading.main_thread().ident is not None
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            with anyio.fail_after(10):
                while not self.delivered.is_set():  # noqa: ASYNC110 - set by a signal handler
                    await anyio.sleep(0.001)
        return response


# A schedule whose first poll after a submit, and every poll after the first, is an
# hour away: whatever the machine's load, a test sees exactly the polls it caused.
NO_REPOLL = PollPolicy(
    first_default=3600.0,
    first_min=3600.0,
    first_max=3600.0,
    min_interval=3600.0,
    max_interval=3600.0,
)


def make(transport: httpx.AsyncBaseTransport, poll: PollPolicy = FAST_POLL) -> Apimart:
    """A blocking client over *transport*, with the test timings."""
    return Apimart(api_key=KEY, transport=transport, poll=poll, limits=FAST_LIMITS)


def loop_tasks(client: Apimart) -> int:
    """How many tasks the client's event loop is running right now."""
    portal = client._runner._portal  # pyright: ignore[reportPrivateUsage]
    return portal.call(lambda: len(anyio.get_running_tasks()))


def settled_tasks(client: Apimart) -> int:
    """How many tasks the client's event loop runs once every task is blocked."""

    async def count() -> int:
        await anyio.wait_all_tasks_blocked()
        return len(anyio.get_running_tasks())

    return client._runner._portal.call(count)  # pyright: ignore[reportPrivateUsage]


def submitted(events: list[am.Event]) -> list[str]:
    """Task ids from the SubmittedEvents."""
    return [e.task_id for e in events if isinstance(e, SubmittedEvent)]


def test_ctrl_c_during_a_submit_still_hears_the_task(
    backend: str, delivered: threading.Event
) -> None:
    """generate() interrupted with its submit on the wire: the task id reaches on_event,
    nothing is left running and no request for that task is sent."""
    fake = FakeApimart(api_key=KEY)
    events: list[am.Event] = []
    with make(CtrlC(fake, delivered, "submit"), NO_REPOLL) as client:
        idle = loop_tasks(client)
        with pytest.raises(KeyboardInterrupt):
            client.generate(model=GEM, prompt="paid", on_event=events.append)
        assert delivered.is_set()
        assert submitted(events) == list(fake.tasks)  # the one task created, heard
        assert loop_tasks(client) == idle and fake.stats.in_flight == 0
        # The client is intact: its submit slot and the loop work.
        second = client.submit(model=GEM, prompt="next")
        assert client.get_task(second.id).id == second.id
    (first,) = submitted(events)
    assert fake.stats.polls_by_task.get(first, 0) == 0  # nothing sent for it afterwards


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are 3.11+")
def test_ctrl_c_during_a_plain_submit_names_the_task(
    backend: str, delivered: threading.Event
) -> None:
    """submit() has no on_event: the interrupt carries the task it created, in a note."""
    fake = FakeApimart(api_key=KEY)
    with make(CtrlC(fake, delivered, "submit")) as client, pytest.raises(KeyboardInterrupt) as ki:
        client.submit(model=GEM, prompt="paid")
    (task_id,) = fake.tasks
    assert any(task_id in note for note in ki.value.__notes__)


def test_ctrl_c_during_a_poll_cancels_the_wait(backend: str, delivered: threading.Event) -> None:
    """wait() interrupted in a query: cancelled at once, and no further query follows."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(60.0))
    with make(CtrlC(fake, delivered, "poll"), NO_REPOLL) as client:
        task = client.submit(model=GEM, prompt="slow")
        idle = loop_tasks(client)
        with pytest.raises(KeyboardInterrupt):
            client.wait(task.id)  # a resumed wait polls at once
        assert loop_tasks(client) == idle and fake.stats.in_flight == 0
        assert fake.stats.polls == 1
        assert client.get_task(task.id).id == task.id
    assert fake.stats.polls == 2  # only the get_task above followed


def test_ctrl_c_while_blocked_in_generate_many(backend: str, delivered: threading.Event) -> None:
    """Interrupted while waiting for an outcome (a submit on the wire): the batch is
    cancelled before KeyboardInterrupt, and every task created was heard."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast(request_latency=(0.001, 0.002)))
    events: list[am.Event] = []
    outcomes: list[am.Outcome] = []
    items = [{"model": GEM, "prompt": f"p{i}"} for i in range(12)]
    with make(CtrlC(fake, delivered, "submit", nth=3)) as client:
        idle = loop_tasks(client)
        with (
            pytest.raises(KeyboardInterrupt),
            client.generate_many(items, concurrency=4, on_event=events.append) as stream,
        ):
            outcomes.extend(stream)
        assert loop_tasks(client) == idle and fake.stats.in_flight == 0
        assert fake.stats.tasks_created >= 3 and len(outcomes) < len(items)
        known = set(submitted(events)) | {o.task.id for o in outcomes if o.task}
        assert set(fake.tasks) <= known
        with client.generate_many(items[:2]) as stream:
            assert [o.ok for o in stream] == [True, True]


def test_ctrl_c_in_the_loop_body_cancels_the_batch(backend: str) -> None:
    """A KeyboardInterrupt raised by the caller's own code mid-batch: batch cancelled, the
    interrupt propagates, and it never reaches (or ends) the client's event loop."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.2, time_scale=0.05))
    items = [{"model": GEM, "prompt": f"p{i}"} for i in range(30)]
    with make(fake.transport()) as client:
        idle = loop_tasks(client)
        with pytest.raises(KeyboardInterrupt), client.generate_many(items) as stream:
            for _ in stream:
                raise KeyboardInterrupt
        assert loop_tasks(client) == idle and fake.stats.in_flight == 0
        assert client.generate(model=GEM, prompt="after").status is am.TaskStatus.COMPLETED


@pytest.mark.parametrize("when", ["before", "after"])
def test_ctrl_c_while_the_call_is_being_spawned(
    backend: str, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt inside the portal's spawn, before or after it handed the call over:
    no hang, and the call never runs (before) or is cancelled and waited for (after)."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(60.0))
    with make(fake.transport(), NO_REPOLL) as client:
        task = client.submit(model=GEM, prompt="slow")
        idle = loop_tasks(client)
        portal = client._runner._portal  # pyright: ignore[reportPrivateUsage]
        spawn = portal.start_task_soon

        def interrupted_spawn(*args: Any) -> Any:
            if when == "after":
                spawn(*args)
            raise KeyboardInterrupt

        polls = fake.stats.polls
        monkeypatch.setattr(portal, "start_task_soon", interrupted_spawn)
        with pytest.raises(KeyboardInterrupt):
            client.wait(task.id)  # polls at once when it runs
        monkeypatch.undo()
        # A call aborted before its first step does nothing there but end.
        assert settled_tasks(client) == idle and fake.stats.in_flight == 0
        # "before": it never ran; "after": at most the one poll it began before its abort.
        assert fake.stats.polls - polls <= (0 if when == "before" else 1)
        assert client.get_task(task.id).id == task.id


# -- real processes --------------------------------------------------------------------


@contextlib.contextmanager
def served(fake: FakeApimart) -> Iterator[str]:
    """Serve *fake* over HTTP (uvicorn in a thread) and yield its base URL."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(fake.serve()) as url,
    ):
        yield url


def script(tmp_path: Path, body: str) -> list[str]:
    """The command running *body* as a script (this checkout first on the path)."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, "-W", "error", str(path)]


def child_env(url: str) -> dict[str, str]:
    """The environment of a user's script pointed at the fake at *url*."""
    return {
        **os.environ,
        "APIMART_API_KEY": "test",
        "APIMART_BASE_URL": url,
        "PYTHONPATH": str(ROOT),
    }


class Gate:
    """ASGI middleware over the fake: holds the answer to the first submit (the task is
    already created) until ``opened`` is set."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.opened = threading.Event()
        self.held = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Pass through, except the first submit's answer, which waits for the gate."""
        if scope["type"] != "http" or scope["path"] != "/v1/images/generations" or self.held:
            await self.app(scope, receive, send)
            return
        self.held = True
        answer: list[Any] = []

        async def keep(message: Any) -> None:
            answer.append(message)

        await self.app(scope, receive, keep)
        with anyio.fail_after(30):
            while not self.opened.is_set():  # noqa: ASYNC110 - set from the test's thread
                await anyio.sleep(0.005)
        for message in answer:
            await send(message)


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """Lines of *proc*'s stdout as they come, read by a daemon thread."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_sigint_to_a_script_in_generate(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT from outside) while a script's generate() has its submit on the wire:
    the script hears the task, sends nothing more, and exits by KeyboardInterrupt."""
    fake = FakeApimart(api_key="test", latency=Latency.fixed(60.0))
    gate = Gate(fake.app)
    fake.app = gate
    body = f"""
        import json, signal
        from apimart_async import Apimart, PollPolicy

        def on_sigint(signum, frame):
            print("interrupted", flush=True)
            signal.default_int_handler(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)
        events = []
        hour = PollPolicy(first_default=3600, first_min=3600, first_max=3600)  # none due
        client = Apimart(poll=hour)  # never closed: the exit does it
        try:
            client.generate(model={GEM!r}, prompt="paid", on_event=events.append)
        except KeyboardInterrupt:
            print(json.dumps([[e.kind, getattr(e, "task_id", None)] for e in events]), flush=True)
            raise
    """
    with served(fake) as url:
        proc = subprocess.Popen(
            script(tmp_path, body),
            env=child_env(url),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            lines = lines_of(proc)
            until(lambda: fake.stats.tasks_created == 1)  # its answer held by the gate
            proc.send_signal(signal.SIGINT)
            assert lines.get(timeout=30) == "interrupted"
            gate.opened.set()  # the answer travels back only now
            events = json.loads(lines.get(timeout=30))
            _, stderr = proc.communicate(timeout=60)
        finally:
            gate.opened.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (task_id,) = fake.tasks
    assert events == [["submitted", task_id]]
    assert fake.stats.polls == 0  # no request for the task after the interrupt
    assert proc.returncode == -signal.SIGINT  # died of the interrupt, as Python scripts do
    assert stderr.rstrip().splitlines()[-1] == "KeyboardInterrupt"


def until(condition: Callable[[], bool]) -> None:
    """Wait until *condition* holds (the fake serves from another thread); 30 s at most."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the fake"
        time.sleep(0.002)


def test_a_script_that_never_closes_its_client_exits_cleanly(tmp_path: Path) -> None:
    """No close(), real HTTP through the default transport: the script exits at once with
    status 0 and nothing on stderr (no traceback, no unclosed-session warning), and its
    client was closed on the way out."""
    fake = FakeApimart(api_key="test")
    body = f"""
        import threading
        from apimart_async import Apimart, PollPolicy

        client = Apimart(poll=PollPolicy().scaled(0.001))
        client.generate(model={GEM!r}, prompt="one")
        with client.generate_many([{{"model": {GEM!r}, "prompt": "two"}}] * 3) as outcomes:
            assert all(o.ok for o in outcomes)

        inner = client._client  # report, on stdout, the close that exit performs
        close = inner.aclose

        async def reported_close():
            await close()
            print("closed at exit", flush=True)

        inner.aclose = reported_close
        print("done", flush=True)
    """
    with served(fake) as url:
        done = subprocess.run(
            script(tmp_path, body),
            env=child_env(url),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == ["done", "closed at exit"]
    assert fake.stats.tasks_created == 4 and fake.stats.in_flight == 0
