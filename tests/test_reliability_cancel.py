"""Cancellation at every stage: nothing left running, no partial file, no lost submit.

A ``Tripwire`` transport sits between the client and the fake. It lets the fake act on
a request first (the upload is stored, the task is created) and then cancels the
caller while the answer is still "on the wire", which is the moment a careless client
loses a paid task. Every test then checks the same things: the caller was cancelled,
no task or request is left running, the download folder holds only whole files, every
task the fake created is known to the caller (a ``SubmittedEvent``, a returned task) or
reported as uncertain, and the client still works afterwards.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

import apimart_async as am
from apimart_async import AsyncApimart, Limits
from apimart_async.testing import FakeApimart, Latency
from apimart_async.types import FailedEvent, SubmittedEvent

from .conftest import FAST_LIMITS, FAST_POLL, until
from .images import png

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup

pytestmark = [
    pytest.mark.anyio,
    # When the client abandons a body mid-stream (over a cap, not an image, cancelled),
    # httpx's inner generators (Response.aiter_raw, its stream's __aiter__) are left to
    # the garbage collector, which trio reports. That part is httpx's; the iterator the
    # client owns is closed (test_rejected_bodies_close_their_stream checks it).
    pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning"),
]

KEY = "test-key"
GEM = "gemini-3.1-flash-image-preview"
# One request in flight per stage: a slot that a cancellation failed to give back
# would make the next batch hang (caught by its fail_after).
ONE_SLOT = Limits(
    uploads=1, submits=1, downloads=1, polls_in_flight=1, poll_rate=100_000.0, poll_burst=1_000
)


def endpoint_of(url: httpx.URL) -> str:
    """Which service endpoint a URL is for."""
    path = url.path
    if path.startswith("/v1/uploads/"):
        return "upload"
    if path == "/v1/images/generations":
        return "submit"
    if path.startswith("/v1/tasks/"):
        return "poll"
    return "download" if path.startswith("/f/") else "other"


class _Trickle(httpx.AsyncByteStream):
    """A body that arrives in two halves, calling *middle* in between."""

    def __init__(self, body: bytes, middle: Callable[[], None], pause: float) -> None:
        self._body = body
        self._middle = middle
        self._pause = pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        half = len(self._body) // 2
        yield self._body[:half]
        self._middle()
        await anyio.sleep(self._pause)
        yield self._body[half:]


class Tripwire(httpx.AsyncBaseTransport):
    """The fake's transport; cancels the caller once the fake acted on a chosen request.

    When the *nth* request to *endpoint* has been answered by the fake, *scope* is
    cancelled (or, for native asyncio cancellation, *task*), and the answer is held
    back for *hold* seconds; a download body is cut in half around the cancel instead.
    """

    def __init__(self, fake: FakeApimart, endpoint: str | None = None, nth: int = 1) -> None:
        self.inner = fake.transport()
        self.endpoint = endpoint
        self.nth = nth
        self.hold = 0.02
        self.seen: Counter[str] = Counter()
        self.scope: anyio.CancelScope | None = None
        self.task: asyncio.Task[Any] | None = None
        self.fired = False

    def fire(self) -> None:
        """Cancel the caller (once)."""
        if self.fired:
            return
        self.fired = True
        if self.task is not None:
            self.task.cancel()
        elif self.scope is not None:
            self.scope.cancel()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Forward to the fake; trip on the chosen request."""
        kind = endpoint_of(request.url)
        self.seen[kind] += 1
        number = self.seen[kind]
        response = await self.inner.handle_async_request(request)
        if kind != self.endpoint or number != self.nth:
            return response
        if kind == "download":
            body = await response.aread()
            stream = _Trickle(body, self.fire, self.hold)
            return httpx.Response(response.status_code, headers=response.headers, stream=stream)
        self.fire()
        await anyio.sleep(self.hold)
        return response


def task_ids() -> set[int]:
    """Ids of every task running in this event loop (asyncio and trio)."""
    return {t.id for t in anyio.get_running_tasks()}


def make(transport: httpx.AsyncBaseTransport, limits: Limits = FAST_LIMITS) -> AsyncApimart:
    """A client over *transport* with the test timings."""
    return AsyncApimart(api_key=KEY, transport=transport, poll=FAST_POLL, limits=limits)


def unknown_tasks(fake: FakeApimart, events: list[am.Event], outcomes: Any = ()) -> list[str]:
    """Tasks the fake created that the caller neither learned of nor got reported uncertain."""
    known = {e.task_id for e in events if isinstance(e, SubmittedEvent)}
    known |= {o.task.id for o in outcomes if o.task is not None}
    uncertain = {
        e.error.idempotency_key
        for e in events
        if isinstance(e, FailedEvent) and isinstance(e.error, am.SubmissionUncertainError)
    }
    return [
        t.id
        for t in fake.tasks.values()
        if t.id not in known and t.idempotency_key not in uncertain
    ]


def check_folder(folder: Path, n: int) -> None:
    """Only whole PNGs, in whole sets of *n* per task, and no hidden temporary file."""
    if not folder.exists():
        return
    names = [p.name for p in folder.iterdir()]
    assert not [name for name in names if name.startswith(".")], names
    for path in folder.iterdir():
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82"), path
    per_task = Counter(name.rsplit("_", 1)[0] for name in names)
    assert all(count == n for count in per_task.values()), per_task


@pytest.mark.parametrize("stage", ["upload", "submit", "poll", "poll-sleep"])
async def test_generate_cancelled_at_each_stage(stage: str) -> None:
    """generate() cancelled during upload, submit, a poll or a poll sleep: clean, nothing lost."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.05))
    tripwire = Tripwire(fake, None if stage == "poll-sleep" else stage)
    events: list[am.Event] = []

    def on_event(event: am.Event) -> None:
        events.append(event)
        if stage == "poll-sleep" and event.kind == "progress":
            tripwire.fire()  # the next checkpoint is the sleep before the next poll

    before = task_ids()
    async with make(tripwire, limits=ONE_SLOT) as client:
        with anyio.CancelScope() as scope:
            tripwire.scope = scope
            await client.generate(
                model=GEM, prompt="x", image_urls=[png(seed=1)], on_event=on_event
            )
        assert scope.cancelled_caught
        assert fake.stats.tasks_created == (0 if stage == "upload" else 1)
        # Every slot, the poll budget and the upload single-flight were released.
        with anyio.fail_after(10):
            again = await client.generate(
                model=GEM, prompt="again", image_urls=[png(seed=1)], on_event=events.append
            )
        assert again.status is am.TaskStatus.COMPLETED
        orphans = client.orphaned_tasks()
    # Closing heard out the submit the cancel left on the wire.
    assert fake.stats.in_flight == 0
    assert unknown_tasks(fake, events) == []
    first = [t.id for t in fake.tasks.values() if t.id != again.id]
    # Cancelled once its task existed (on the wire, or waiting): the client keeps it.
    assert [t.id for t in orphans] == ([] if stage == "upload" else first)
    assert task_ids() <= before


@pytest.mark.parametrize("stage", ["upload", "submit", "poll", "download"])
async def test_generate_many_cancelled_at_each_stage(tmp_path: Path, stage: str) -> None:
    """A batch cancelled while its 3rd upload/submit/poll/download is in flight: clean."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast(request_latency=(0.001, 0.002)))
    tripwire = Tripwire(fake, stage, nth=3)
    events: list[am.Event] = []
    outcomes: list[am.Outcome] = []
    items = [
        {"model": GEM, "prompt": f"job {i}", "image_urls": [png(seed=i)], "n": 2} for i in range(8)
    ]
    before = task_ids()
    async with make(tripwire, limits=ONE_SLOT) as client:
        with anyio.CancelScope() as scope:
            tripwire.scope = scope
            async with client.generate_many(
                items, concurrency=4, download_to=tmp_path, on_event=events.append
            ) as stream:
                async for outcome in stream:
                    outcomes.append(outcome)
        assert scope.cancelled_caught and len(outcomes) < len(items)
        check_folder(tmp_path, n=2)
        with anyio.fail_after(10):  # every slot came back: the client still works
            async with client.generate_many(items[:2], on_event=events.append) as stream:
                assert all([o.ok async for o in stream])
    assert fake.stats.in_flight == 0
    assert unknown_tasks(fake, events, outcomes) == []
    assert task_ids() <= before


async def test_cancelled_submit_hands_its_task_over(caplog: pytest.LogCaptureFixture) -> None:
    """submit() cancelled while its answer travels back: the caller is cancelled at once,
    and the created task reaches on_event, a WARNING naming it, and orphaned_tasks()."""
    fake = FakeApimart(api_key=KEY)
    tripwire = Tripwire(fake, "submit")
    tripwire.hold = 0.2  # the answer is on its way back for a while
    events: list[am.Event] = []
    got: am.Task | None = None
    async with make(tripwire) as client:
        with anyio.CancelScope() as scope:
            tripwire.scope = scope
            got = await client.submit(
                model=GEM, prompt="x", idempotency_key="key-orphan", on_event=events.append
            )
        assert scope.cancelled_caught and got is None
        assert events == [e for e in events if e.kind == "submitting"]  # no answer yet
        await until(lambda: any(isinstance(e, SubmittedEvent) for e in events))
        orphans = client.orphaned_tasks()
        assert client.orphaned_tasks() == []  # each orphan is handed over once
    (task_id,) = list(fake.tasks)
    assert [t.id for t in orphans] == [task_id]
    assert [e.task_id for e in events if isinstance(e, SubmittedEvent)] == [task_id]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(task_id in m and "key-orphan" in m for m in warnings), warnings


NATIVE_CANCELS = ["wait_for", "timeout", "task_cancel", "task_group_sibling"]


class Announced:
    """An ``on_event`` handler that keeps the events and notes the submit's answer."""

    def __init__(self) -> None:
        self.events: list[am.Event] = []
        self.answered = anyio.Event()

    def __call__(self, event: am.Event) -> None:
        self.events.append(event)
        if isinstance(event, SubmittedEvent):
            self.answered.set()


async def cancel_natively(
    how: str, call: Callable[[], Coroutine[Any, Any, None]], arrived: Callable[[], Awaitable[None]]
) -> None:
    """Cancel *call* as asyncio users do: ``wait_for`` / ``asyncio.timeout`` (0.4 s), or
    ``Task.cancel()`` / a failing ``TaskGroup`` sibling once *arrived()* returns."""
    if how == "wait_for":
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call(), timeout=0.4)
    elif how == "timeout":
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.4):
                await call()
    elif how == "task_cancel":
        job = asyncio.ensure_future(call())
        await arrived()
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
    else:

        async def failing_sibling() -> None:
            await arrived()
            raise LookupError("a sibling failed")

        with pytest.raises(ExceptionGroup) as info:
            async with asyncio.TaskGroup() as group:
                group.create_task(call())
                group.create_task(failing_sibling())
        assert info.group_contains(LookupError)


def check_orphan_reported(
    fake: FakeApimart, announced: Announced, orphans: list[am.Task], key: str, caplog: Any
) -> None:
    """The one task the fake created reached on_event, orphaned_tasks() and a WARNING."""
    (task_id,) = list(fake.tasks)
    assert [t.id for t in orphans] == [task_id]
    assert unknown_tasks(fake, announced.events) == []
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(task_id in m and key in m for m in warnings), warnings


@pytest.mark.parametrize("how", NATIVE_CANCELS)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_cancel_of_a_submit_is_not_lost(
    how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """wait_for, asyncio.timeout, Task.cancel() and a failing TaskGroup sibling, during
    a submit: the caller is cancelled before the answer arrives, and the created task
    still reaches on_event, the log (task id and idempotency key) and orphaned_tasks()."""
    fake = FakeApimart(api_key=KEY)
    tripwire = Tripwire(fake, "submit")
    tripwire.hold = 1.0  # the answer comes a second after the task was created
    tripwire.fire = lambda: None  # type: ignore[method-assign]  # cancelled natively below
    announced = Announced()
    async with make(tripwire) as client:

        async def generate() -> None:
            await client.generate(
                model=GEM, prompt="x", idempotency_key="key-n", on_event=announced
            )

        await cancel_natively(how, generate, lambda: until(lambda: fake.tasks))
        assert not announced.answered.is_set()  # the caller left before the answer came back
        assert fake.stats.tasks_created == 1
        with anyio.fail_after(5):
            await announced.answered.wait()
        orphans = client.orphaned_tasks()
    check_orphan_reported(fake, announced, orphans, "key-n", caplog)


@pytest.mark.parametrize("how", NATIVE_CANCELS)
@pytest.mark.parametrize("transport_backend", ["aiohttp", "httpx"])
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_cancel_over_real_http_is_not_lost(
    how: str, transport_backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same four cancellations through the production transport (aiohttp) and
    httpx's pool, over a real socket: the service has the submit and answers a second
    later; the caller is gone by then, and the task still reaches on_event, the log and
    orphaned_tasks(), with no further request sent for it."""
    pytest.importorskip("uvicorn")
    if transport_backend == "aiohttp":
        pytest.importorskip("aiohttp")
    # Every request is answered a second after it arrived (counted on arrival).
    fake = FakeApimart(api_key=KEY, latency=Latency.fast(request_latency=(1.0, 1.0)))
    announced = Announced()
    async with fake.serve() as base_url:
        async with AsyncApimart(
            api_key=KEY,
            base_url=base_url,
            transport_backend=transport_backend,  # type: ignore[arg-type]
            poll=FAST_POLL,
            limits=FAST_LIMITS,
        ) as client:

            async def generate() -> None:
                await client.generate(
                    model=GEM, prompt="x", idempotency_key="key-h", on_event=announced
                )

            await cancel_natively(how, generate, lambda: until(lambda: fake.stats.submits))
            assert fake.stats.submits == 1  # on the wire when the caller left...
            assert not announced.answered.is_set()  # ...and not answered yet
            with anyio.fail_after(10):
                await announced.answered.wait()
            orphans = client.orphaned_tasks()
        requests_after = fake.stats.requests_total
    check_orphan_reported(fake, announced, orphans, "key-h", caplog)
    assert requests_after == 1  # the submit only: the orphan was never polled


async def test_download_cancelled_mid_file_leaves_nothing(tmp_path: Path) -> None:
    """A download cancelled halfway through an image leaves no file, hidden or whole."""
    fake = FakeApimart(api_key=KEY)
    tripwire = Tripwire(fake, "download", nth=2)
    before = task_ids()
    async with make(tripwire, limits=ONE_SLOT) as client:
        task = await client.generate(model=GEM, prompt="three", n=3)
        with anyio.CancelScope() as scope:
            tripwire.scope = scope
            await client.download(task, tmp_path)
        assert scope.cancelled_caught
        assert list(tmp_path.iterdir()) == []
        with anyio.fail_after(10):  # and it works again: the download slot came back
            assert len(await client.download(task, tmp_path)) == 3
    assert fake.stats.in_flight == 0
    assert task_ids() <= before


async def test_wait_cancelled_at_random_points_then_resumed() -> None:
    """wait() cancelled repeatedly (in polls and sleeps) leaks nothing; a later wait finishes."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.2, request_latency=(0.001, 0.004)))
    rng = random.Random(1234)
    before = task_ids()
    async with make(fake.transport()) as client:
        task = await client.submit(model=GEM, prompt="slow")
        for _ in range(10):
            with anyio.move_on_after(rng.uniform(0.0, 0.02)) as scope:
                await client.wait(task)
            assert scope.cancelled_caught
            assert fake.stats.in_flight == 0
        done = await client.wait(task.id, timeout=5)
    assert done.status is am.TaskStatus.COMPLETED
    assert task_ids() <= before


async def test_generate_many_cancelled_at_random_points(tmp_path: Path) -> None:
    """Batches cancelled at random moments: no leak, only whole files, every task known."""
    fake = FakeApimart(
        api_key=KEY,
        latency=Latency.fast(request_latency=(0.001, 0.004)),
        honour_idempotency=False,
    )
    rng = random.Random(99)
    before = task_ids()
    events: list[am.Event] = []
    outcomes: list[am.Outcome] = []
    async with make(fake.transport(), limits=ONE_SLOT) as client:
        for trial in range(8):
            folder = tmp_path / f"trial{trial}"
            items = [
                {
                    "model": GEM,
                    "prompt": f"t{trial} j{j}",
                    "image_urls": [png(width=1 + trial, seed=j)],
                    "n": 2,
                }
                for j in range(24)
            ]
            with anyio.move_on_after(rng.uniform(0.005, 0.12)):
                async with client.generate_many(
                    items, concurrency=8, download_to=folder, on_event=events.append
                ) as stream:
                    async for outcome in stream:
                        outcomes.append(outcome)
            # Submits on the wire are heard out, then reported.
            await until(
                lambda: not fake.stats.in_flight and not unknown_tasks(fake, events, outcomes)
            )
            assert all(0 <= e.job < 24 for e in events if isinstance(e, SubmittedEvent))
            check_folder(folder, n=2)
            assert len(task_ids() - before) <= 1  # the client's own submit host, no more
        # One slot per stage: a slot leaked by any cancellation would hang this batch.
        final = [
            {"model": GEM, "prompt": f"final {i}", "image_urls": [png(seed=i)]} for i in range(3)
        ]
        with anyio.fail_after(10):
            async with client.generate_many(final, download_to=tmp_path / "final") as stream:
                assert all([o.ok async for o in stream])
    assert fake.duplicate_keys() == []


@pytest.mark.parametrize("handler_kind", ["sync", "async"])
async def test_submit_outliving_its_shield_is_reported_uncertain(handler_kind: str) -> None:
    """A cancelled generate() whose submit gets no answer within the shield: the caller
    leaves at once; the job's on_event then hears SubmissionUncertainError (with its key)."""
    fake = FakeApimart(api_key=KEY)
    fake.script("submit", ["stall"])  # the task is created, the answer never comes
    seen, handler = _recorder(handler_kind)
    client = AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, submit_shield=0.2
    )
    async with client, anyio.create_task_group() as tg:
        scope = anyio.CancelScope()
        tg.start_soon(cancel_when, scope, lambda: fake.stats.submits >= 1)
        with scope:
            await client.generate(model=GEM, prompt="x", on_event=handler)
        assert scope.cancelled_caught
    assert fake.stats.tasks_created == 1 and fake.stats.in_flight == 0
    reported = [e.error for e in seen if isinstance(e, FailedEvent)]
    assert [type(e) for e in reported] == [am.SubmissionUncertainError]
    assert unknown_tasks(fake, seen) == []


@pytest.mark.parametrize("handler_kind", ["sync", "async"])
async def test_many_submit_outliving_its_shield_is_reported_uncertain(handler_kind: str) -> None:
    """Same in generate_many: the job's on_event hears SubmissionUncertainError, with its index."""
    fake = FakeApimart(api_key=KEY)
    fake.script("submit", [None, "stall", None])
    seen, handler = _recorder(handler_kind)
    client = AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, submit_shield=0.2
    )
    async with client, anyio.create_task_group() as tg:
        scope = anyio.CancelScope()
        tg.start_soon(cancel_when, scope, lambda: fake.stats.submits >= 3)
        with scope:
            items = [{"model": GEM, "prompt": f"p{i}"} for i in range(3)]
            async with client.generate_many(items, concurrency=3, on_event=handler) as stream:
                async for _ in stream:
                    await anyio.sleep(10)  # hold the batch open until the cancel
    assert fake.stats.tasks_created == 3 and fake.stats.in_flight == 0
    uncertain = [e for e in seen if isinstance(e, FailedEvent)]
    assert [type(e.error) for e in uncertain] == [am.SubmissionUncertainError]
    assert uncertain[0].job is not None
    assert unknown_tasks(fake, seen) == []


async def cancel_when(scope: anyio.CancelScope, sent: Callable[[], bool]) -> None:
    """Cancel *scope* once *sent()* (the submits are on the wire), not after a fixed
    time: on a loaded machine they may take longer to leave."""
    await until(sent)
    scope.cancel()


def _recorder(kind: str) -> tuple[list[am.Event], Callable[[am.Event], Any]]:
    """An event list and a sync or async handler appending to it."""
    seen: list[am.Event] = []
    if kind == "sync":
        return seen, seen.append

    async def handler(event: am.Event) -> None:
        await anyio.lowlevel.checkpoint()  # e.g. a journal write
        seen.append(event)

    return seen, handler
