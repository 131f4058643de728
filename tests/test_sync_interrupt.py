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
import logging
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
    """The fake's transport; once armed, "presses Ctrl-C" when the fake has answered the
    *nth* request to *endpoint*, and holds that answer back until the main thread has
    the interrupt."""

    def __init__(self, fake: FakeApimart, delivered: threading.Event) -> None:
        self.inner = fake.transport()
        self.delivered = delivered
        self.endpoint = ""
        self.nth = 0
        self.seen: Counter[str] = Counter()

    def arm(self, endpoint: str, nth: int = 1) -> None:
        """Interrupt on the *nth* request to *endpoint* from now on."""
        self.endpoint = endpoint
        self.nth = nth
        self.seen.clear()

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


def warned(caplog: pytest.LogCaptureFixture, task_id: str) -> bool:
    """Whether a WARNING named *task_id* (the keeper's report of an orphaned submit)."""
    return any(r.levelno == logging.WARNING and task_id in r.getMessage() for r in caplog.records)


def test_ctrl_c_during_a_submit_still_hears_the_task(
    backend: str, delivered: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    """generate() interrupted with its submit on the wire: the call's own work is cancelled
    before KeyboardInterrupt; the submit is heard out, and its task reaches on_event, the
    log and orphaned_tasks(); no request for that task follows."""
    fake = FakeApimart(api_key=KEY)
    events: list[am.Event] = []
    wire = CtrlC(fake, delivered)
    client = make(wire, NO_REPOLL)
    with client:
        wire.arm("submit")
        with pytest.raises(KeyboardInterrupt):
            client.generate(model=GEM, prompt="paid", on_event=events.append)
        assert delivered.is_set()
        # The client is intact: its submit slot and its loop work.
        second = client.submit(model=GEM, prompt="next")
        assert client.get_task(second.id).id == second.id
    # close() heard out whatever was still on the wire.
    (first,) = set(fake.tasks) - {second.id}
    assert first in submitted(events)  # on_event has the task, however it ended
    # Usually the submit was still on the wire: the keeper heard it out and made it an
    # orphan, logged. If the answer beat the interrupt (the loop may be that quick),
    # the call itself had it and told on_event; it was cancelled in its first wait.
    orphans = [t.id for t in client.orphaned_tasks()]
    assert orphans in ([first], [])
    assert warned(caplog, first) == (orphans == [first])
    assert fake.stats.polls_by_task.get(first, 0) == 0  # nothing sent for it afterwards
    assert fake.stats.in_flight == 0


def test_ctrl_c_during_a_plain_submit_leaves_an_orphan(
    backend: str, delivered: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    """submit() interrupted on the wire: its task is an orphan to collect, and logged."""
    fake = FakeApimart(api_key=KEY)
    wire = CtrlC(fake, delivered)
    client = make(wire)
    with client:
        wire.arm("submit")
        with pytest.raises(KeyboardInterrupt) as interrupt:
            client.submit(model=GEM, prompt="paid")
    (task_id,) = fake.tasks
    assert warned(caplog, task_id)
    # Usually the submit was still on the wire: an orphan, handed out once. If it had
    # just returned (the loop may be that quick), the interrupt names it instead.
    orphans = [t.id for t in client.orphaned_tasks()]
    notes = getattr(interrupt.value, "__notes__", [])
    assert orphans == [task_id] or any(task_id in note for note in notes)
    assert client.orphaned_tasks() == []


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are 3.11+")
def test_ctrl_c_as_a_submit_returns_names_its_task(
    backend: str, delivered: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    """An interrupt that lands as submit() is returning (its SubmittedEvent is being
    delivered) cannot stop it any more: the KeyboardInterrupt names the task it made."""
    fake = FakeApimart(api_key=KEY)

    def on_event(event: am.Event) -> None:
        if isinstance(event, SubmittedEvent):
            assert threading.main_thread().ident is not None
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            assert delivered.wait(10)  # the loop is held here until the interrupt lands

    with make(fake.transport()) as client:
        with pytest.raises(KeyboardInterrupt) as interrupt:
            client.submit(model=GEM, prompt="paid", on_event=on_event)
        (task_id,) = fake.tasks
        assert any(task_id in note for note in interrupt.value.__notes__)
        assert warned(caplog, task_id)
        assert client.orphaned_tasks() == []  # the caller had it: not an orphan


def test_ctrl_c_during_a_poll_cancels_the_wait(backend: str, delivered: threading.Event) -> None:
    """wait() interrupted in a query: cancelled before KeyboardInterrupt, nothing follows."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(60.0))
    wire = CtrlC(fake, delivered)
    with make(wire, NO_REPOLL) as client:
        task = client.submit(model=GEM, prompt="slow")
        idle = loop_tasks(client)
        wire.arm("poll")
        with pytest.raises(KeyboardInterrupt):
            client.wait(task.id)  # a resumed wait polls at once
        assert loop_tasks(client) == idle and fake.stats.in_flight == 0
        assert fake.stats.polls == 1
        assert client.get_task(task.id).id == task.id
    assert fake.stats.polls == 2  # only the get_task above followed


def test_ctrl_c_while_blocked_in_generate_many(backend: str, delivered: threading.Event) -> None:
    """Interrupted while waiting for an outcome (a submit on the wire): the batch has
    stopped when the interrupt leaves the block, and every task created is known."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast(request_latency=(0.001, 0.002)))
    events: list[am.Event] = []
    outcomes: list[am.Outcome] = []
    items = [{"model": GEM, "prompt": f"p{i}"} for i in range(12)]
    wire = CtrlC(fake, delivered)
    client = make(wire)
    with client:
        wire.arm("submit", nth=3)
        with (
            pytest.raises(KeyboardInterrupt),
            client.generate_many(items, concurrency=4, on_event=events.append) as stream,
        ):
            outcomes.extend(stream)
        # The batch is over when the interrupt leaves the block: none of its jobs
        # submits or polls again (its submits on the wire went on in the keeper, and
        # were counted when they arrived).
        submits, polls = fake.stats.submits, dict(fake.stats.polls_by_task)
        with client.generate_many(items[:2]) as again:
            more = list(again)
        assert [o.ok for o in more] == [True, True]
        assert fake.stats.submits == submits + 2
        assert all(fake.stats.polls_by_task.get(t, 0) == n for t, n in polls.items())
    assert fake.stats.tasks_created >= 3 and len(outcomes) < len(items)
    known = set(submitted(events)) | {t.id for t in client.orphaned_tasks()}
    known |= {o.task.id for o in [*outcomes, *more] if o.task is not None}
    assert set(fake.tasks) <= known
    assert fake.stats.in_flight == 0


def test_ctrl_c_in_the_loop_body_cancels_the_batch(backend: str) -> None:
    """A KeyboardInterrupt raised by the caller's own code mid-batch: the batch is over
    when it leaves the block, and it never reaches (or ends) the client's event loop."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.2, time_scale=0.05))
    items = [{"model": GEM, "prompt": f"p{i}"} for i in range(30)]
    with make(fake.transport()) as client:
        with pytest.raises(KeyboardInterrupt), client.generate_many(items) as stream:
            for _ in stream:
                raise KeyboardInterrupt
        sent = (fake.stats.submits, fake.stats.polls)
        assert client.get_task(next(iter(fake.tasks))).id  # the loop lives on
        assert (fake.stats.submits, fake.stats.polls) == (sent[0], sent[1] + 1)
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


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Lines of *proc*'s stdout as they come (then None), read by a daemon thread."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_sigint_to_a_script_in_generate(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT from outside) while a script's generate() has its submit on the wire:
    the script stops with KeyboardInterrupt, no request for the task follows, and on its
    way out (the client was never closed) the submit is heard out: its task reaches the
    script's on_event and the log."""
    fake = FakeApimart(api_key="test", latency=Latency.fixed(60.0))
    gate = Gate(fake.app)
    fake.app = gate
    body = f"""
        import json, signal
        from apimart_async import Apimart, PollPolicy

        def on_sigint(signum, frame):
            print("interrupted", flush=True)
            signal.default_int_handler(signum, frame)

        def on_event(event):
            print(json.dumps([event.kind, getattr(event, "task_id", None)]), flush=True)

        signal.signal(signal.SIGINT, on_sigint)
        hour = PollPolicy(first_default=3600, first_min=3600, first_max=3600)  # none due
        client = Apimart(poll=hour)  # never closed: the interpreter's exit does it
        client.generate(model={GEM!r}, prompt="paid", on_event=on_event)
    """
    with (
        served(fake) as url,
        subprocess.Popen(
            script(tmp_path, body),
            env=child_env(url),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc,
    ):
        try:
            lines = lines_of(proc)
            until(lambda: fake.stats.tasks_created == 1)  # its answer held by the gate
            proc.send_signal(signal.SIGINT)
            printed: list[str] = []
            while "interrupted" not in printed:
                line = lines.get(timeout=30)
                assert line is not None, "the script ended before its interrupt"
                printed.append(line)
            gate.opened.set()  # the answer travels back only now
            while (line := lines.get(timeout=60)) is not None:
                printed.append(line)
            proc.wait(timeout=60)
            assert proc.stderr is not None
            stderr = proc.stderr.read()
        finally:
            gate.opened.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    (task_id,) = fake.tasks
    events = [json.loads(line) for line in printed if line != "interrupted"]
    assert events == [["submitting", None], ["submitted", task_id]]
    assert printed.index("interrupted") == 1  # the task was heard after the interrupt
    assert fake.stats.polls == 0  # no request for the task after the interrupt
    assert proc.returncode == -signal.SIGINT  # died of the interrupt, as Python scripts do
    assert "KeyboardInterrupt" in stderr.splitlines()
    assert f"task {task_id} (idempotency key" in stderr  # the keeper's WARNING, at exit


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
