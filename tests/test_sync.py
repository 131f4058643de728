"""The blocking client ``Apimart``: the async client's behaviour, from plain threads.

Every test drives the real client against ``FakeApimart`` and runs twice, with the
client's own event loop on asyncio and on trio (the ``backend`` fixture). Each test
also checks that no thread is left behind once its clients are closed.
"""

from __future__ import annotations

import gc
import inspect
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest

import apimart_async as am
from apimart_async import Apimart, AsyncApimart, Limits
from apimart_async.testing import FakeApimart, Fault, Latency, Webhooks
from apimart_async.types import FailedEvent, SubmittedEvent
from apimart_async.webhooks import WebhookReceiver

from .conftest import FAST_LIMITS, FAST_POLL
from .images import png

KEY = "test-key"
GEM = "gemini-3.1-flash-image-preview"


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The event loop the client runs in its thread: asyncio, then trio."""
    monkeypatch.setattr(Apimart, "_backend", request.param)
    return str(request.param)


@pytest.fixture(autouse=True)
def _no_thread_left() -> Iterator[None]:
    """Whatever a test started, no thread outlives it (clients are closed in the test).

    Trio keeps one process-wide cache of idle worker threads (they exit after 10 s
    idle) that every ``trio.run`` shares: those belong to trio, not to a client.
    """
    before = set(threading.enumerate())
    yield
    gc.collect()  # a client dropped without close() is closed by its finalizer
    assert [t.name for t in set(threading.enumerate()) - before if not trio_cache(t)] == []


def trio_cache(thread: threading.Thread) -> bool:
    """Whether *thread* is one of trio's process-wide cached worker threads."""
    return thread.daemon and thread.name.startswith("Trio thread")


def make(fake: FakeApimart | httpx.AsyncBaseTransport, **kw: Any) -> Apimart:
    """A blocking client on the fake (or a transport), with the test timings."""
    transport = fake.transport() if isinstance(fake, FakeApimart) else fake
    kw.setdefault("limits", FAST_LIMITS)
    kw.setdefault("poll", FAST_POLL)
    return Apimart(api_key=KEY, transport=transport, **kw)


def jobs(count: int, **extra: Any) -> list[dict[str, Any]]:
    """*count* valid requests."""
    return [{"model": GEM, "prompt": f"picture {i}", **extra} for i in range(count)]


def loop_tasks(client: Apimart) -> int:
    """How many tasks the client's event loop is running right now."""
    portal = client._runner._portal  # pyright: ignore[reportPrivateUsage]
    return portal.call(lambda: len(anyio.get_running_tasks()))


def idle_tasks(client: Apimart, fake: FakeApimart) -> int:
    """The client's loop tasks at rest, its submit keeper started.

    The keeper (the long-lived task that runs paid submits) starts with the first
    submit; one the fake refuses starts it without creating a task.
    """
    fake.script("submit", [400])
    with pytest.raises(am.BadRequestError):
        client.submit(model=GEM, prompt="refused")
    fake.reset_stats()
    return loop_tasks(client)


def unknown_tasks(fake: FakeApimart, events: list[am.Event], outcomes: Any = ()) -> list[str]:
    """Tasks the fake created that the caller neither heard of nor got reported uncertain."""
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


# -- the API is the async client's ------------------------------------------------------

METHODS = [
    "upload_image",
    "submit",
    "get_task",
    "balance",
    "wait",
    "generate",
    "download",
    "generate_many",
]


def test_every_public_method_has_its_blocking_twin() -> None:
    """The same public methods and properties as AsyncApimart (close() for aclose())."""
    public_async = {n for n in dir(AsyncApimart) if not n.startswith("_")} - {"aclose"}
    public_sync = {n for n in dir(Apimart) if not n.startswith("_")} - {"close"}
    assert public_sync == public_async
    assert set(METHODS) <= public_sync


@pytest.mark.parametrize("name", ["__init__", *METHODS])
def test_signatures_match_the_async_client(name: str) -> None:
    """Same parameters (names, kinds, defaults, annotations) and return types."""
    sync = inspect.signature(getattr(Apimart, name))
    asyn = inspect.signature(getattr(AsyncApimart, name))
    assert list(sync.parameters) == list(asyn.parameters)
    for param, twin in zip(sync.parameters.values(), asyn.parameters.values(), strict=True):
        assert (param.kind, param.default) == (twin.kind, twin.default), param.name
        if name == "generate_many" and param.name == "requests":
            assert (param.annotation, twin.annotation) == (
                "Iterable[Any]",
                "Iterable[Any] | AsyncIterable[Any]",
            )
        else:
            assert param.annotation == twin.annotation, param.name
    if name == "generate_many":
        assert sync.return_annotation == "AbstractContextManager[OutcomeIterator]"
        assert asyn.return_annotation == "AbstractAsyncContextManager[OutcomeStream]"
    else:
        assert sync.return_annotation == asyn.return_annotation
    assert not inspect.iscoroutinefunction(getattr(Apimart, name))


def test_every_method_blocks_and_returns_the_async_results(backend: str, tmp_path: Path) -> None:
    """upload_image → submit → get_task → wait → download, then generate, blocking."""
    fake = FakeApimart(api_key=KEY)
    ref = tmp_path / "ref.png"
    ref.write_bytes(png(seed=3))
    before = set(threading.enumerate())
    with make(fake) as client:
        up = client.upload_image(png(seed=1))
        assert isinstance(up, am.UploadedImage) and fake.stored_upload(up.url) == png(seed=1)
        task = client.submit(model=GEM, prompt="blue", image_urls=[up.url])
        assert isinstance(task, am.Task) and list(fake.tasks) == [task.id]
        assert client.get_task(task.id).id == task.id
        done = client.wait(task, timeout=10)
        assert done.status is am.TaskStatus.COMPLETED and done.image_urls
        paths = client.download(done, tmp_path / "out")
        assert [p.name for p in paths] == [f"{task.id}_0.png"]
        assert paths[0].read_bytes().startswith(b"\x89PNG")
        again = client.generate(model=GEM, prompt="from a file", image_urls=[ref])
        assert again.status is am.TaskStatus.COMPLETED
    assert fake.stats.uploads == 2 and fake.stats.tasks_created == 2
    # The file was read in a worker thread of the client's loop: gone with the client.
    assert [t.name for t in set(threading.enumerate()) - before if not trio_cache(t)] == []


def test_balance_and_a_batch_budget(backend: str) -> None:
    """balance(), and generate_many's caps and spending report, through the blocking client."""
    fake = FakeApimart(api_key=KEY, balance=10.0)
    price = fake.price_of(GEM)
    with make(fake) as client:
        with client.generate_many(jobs(5, n=2), concurrency=1, max_images=5) as outcomes:
            taken = list(outcomes)
        assert sum(o.ok for o in taken) == 2  # 2 jobs of 2 images; a third would pass 5
        refused = [o for o in taken if not o.ok]
        assert all(isinstance(o.error, am.BudgetExceededError) for o in refused)
        assert isinstance(outcomes.stopped, am.BudgetExceededError)
        assert outcomes.spent == pytest.approx(4 * price) and outcomes.cost_unknown == 0
        balance = client.balance()
        assert balance.remaining == pytest.approx(10.0 - 4 * price)
        assert client.balance(account=True).remaining == pytest.approx(balance.remaining)


def test_webhook_pushes_end_the_waits(backend: str) -> None:
    """webhooks= and generate_many(webhook=) reach the async client: pushed results end
    generate and a batch without a single poll (the safety-net poll is far off)."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.02), webhooks=Webhooks(delay=0.01))
    receiver = WebhookReceiver(public_url="https://hooks.example.com/apimart")
    other = WebhookReceiver(public_url="https://hooks.example.com/other")
    push_poll = am.PollPolicy().scaled(0.01)  # its safety-net poll comes after ~1.8 s
    with make(fake, poll=push_poll, webhooks=receiver) as client:
        # The fake's callbacks are sent from the client's own loop: a fake is driven
        # from one event loop at a time.
        portal = client._runner._portal  # pyright: ignore[reportPrivateUsage]
        to_receivers = httpx.ASGITransport(app=_Route(receiver, other))
        with portal.wrap_async_context_manager(fake.webhook_sender(transport=to_receivers)):
            assert client.generate(model=GEM, prompt="pushed").status is am.TaskStatus.COMPLETED
            with client.generate_many(jobs(4), webhook=other) as outcomes:
                assert [o.ok for o in outcomes] == [True] * 4
    assert fake.stats.polls == 0
    hooks = [r.json_body["webhook"] for r in fake.requests if r.endpoint == "submit"]
    assert hooks == [receiver.webhook_url] + [other.webhook_url] * 4


class _Route:
    """ASGI: each callback to the receiver whose webhook URL it is under."""

    def __init__(self, *receivers: WebhookReceiver) -> None:
        self.receivers = {httpx.URL(r.webhook_url).path: r for r in receivers}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Hand the request to its receiver."""
        (receiver,) = [r for p, r in self.receivers.items() if scope["path"].startswith(p)]
        await receiver(scope, receive, send)


def test_errors_are_the_async_clients(backend: str) -> None:
    """Bad input fails before any request; service and task errors keep their classes."""
    fake = FakeApimart(api_key=KEY)
    with make(fake) as client:
        with pytest.raises(am.InvalidRequestError, match="n"):
            client.submit(model=GEM, prompt="x", n=5)
        with pytest.raises(am.UnknownModelError):
            client.generate(model="no-such-model", prompt="x")
        assert fake.stats.requests_total == 0
        with pytest.raises(am.BadRequestError):
            client.get_task("task_unknown")
        fake.script("task", [Fault.TASK_FAILED])
        with pytest.raises(am.TaskFailedError) as failed:
            client.generate(model=GEM, prompt="doomed")
        assert failed.value.task_id in fake.tasks


def test_constructor_errors_come_from_the_constructor(backend: str) -> None:
    """A missing key or a bad argument is raised by Apimart(...) before any thread starts."""
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="APIMART_API_KEY"):
        Apimart()
    with pytest.raises(ValueError, match="base_url"):
        Apimart(api_key=KEY, base_url="ftp://example.test")
    with pytest.raises(ValueError, match="http_client or transport"):
        Apimart(api_key=KEY, http_client=httpx.AsyncClient(), transport=httpx.MockTransport(len))
    # Only threads that appeared count: an earlier test's idle worker may end meanwhile.
    assert set(threading.enumerate()) - before == set()


def test_constructor_arguments_reach_the_async_client(backend: str) -> None:
    """base_url, limits, max_connections, poll, headers and wait_timeout are forwarded."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(60.0))  # tasks never finish here
    limits = Limits(uploads=3, poll_rate=1_000.0)
    with make(
        fake,
        base_url="https://api.apimart.ai/",
        limits=limits,
        max_connections=7,
        headers={"X-Trace": "t-1"},
        wait_timeout=0.05,
    ) as client:
        assert str(client.base_url) == "https://api.apimart.ai/"
        assert client.limits.uploads == 3 and client.limits.connections == 7
        assert client.poll_policy == FAST_POLL
        with pytest.raises(am.TaskTimeoutError):
            client.generate(model=GEM, prompt="slow")  # the client's default deadline
        assert fake.requests[0].headers["x-trace"] == "t-1"
        assert KEY not in repr(client) and repr(client).startswith("<Apimart base_url=")


# -- lifecycle -----------------------------------------------------------------------------


def test_close_stops_the_thread_and_refuses_calls(backend: str) -> None:
    """After close(): calls and `with` raise RuntimeError; close() again is a no-op."""
    fake = FakeApimart(api_key=KEY)
    before = set(threading.enumerate())
    client = make(fake)
    (thread,) = set(threading.enumerate()) - before
    assert thread.daemon and thread.name.startswith("apimart-sync")
    client.generate(model=GEM, prompt="x")
    assert not client.is_closed
    client.close()
    assert client.is_closed and not thread.is_alive()
    assert "state=closed" in repr(client)
    with pytest.raises(RuntimeError, match="closed"):
        client.get_task("task_1")
    with pytest.raises(RuntimeError, match="closed"), client.generate_many(jobs(1)):
        pass
    with pytest.raises(RuntimeError, match="closed"), client:
        pass
    client.close()


def test_with_block_closes_on_error(backend: str) -> None:
    """Leaving the block by an exception closes the client too."""
    fake = FakeApimart(api_key=KEY)
    with pytest.raises(KeyError), make(fake) as client:
        client.generate(model=GEM, prompt="x")
        raise KeyError("in the block")
    assert client.is_closed


def test_a_dropped_client_is_closed_by_the_garbage_collector(backend: str) -> None:
    """A client never closed stops its thread when it is collected."""
    fake = FakeApimart(api_key=KEY)
    before = set(threading.enumerate())
    client = make(fake)
    client.generate(model=GEM, prompt="x")
    (thread,) = set(threading.enumerate()) - before
    del client
    gc.collect()
    assert not thread.is_alive()


def test_a_client_collected_on_its_own_thread_is_closed_from_another(backend: str) -> None:
    """Collected by a gc pass on the client's own thread (which cannot join itself):
    the close is handed to a short-lived thread, and the client's thread still ends."""
    fake = FakeApimart(api_key=KEY)
    client = make(fake)
    client.generate(model=GEM, prompt="x")
    runner = client._runner  # pyright: ignore[reportPrivateUsage]
    (thread,) = [t for t in threading.enumerate() if t.ident == runner.thread_id]
    client.cycle = client  # type: ignore[attr-defined]  # only the cyclic GC frees it
    del client
    gc.disable()  # no collection before the one on the client's thread
    try:
        runner._portal.call(gc.collect)  # pyright: ignore[reportPrivateUsage]
    finally:
        gc.enable()
    thread.join(10)
    assert not thread.is_alive() and runner.closed
    for helper in [t for t in threading.enumerate() if t.name == "apimart-sync-close"]:
        helper.join(10)


# -- generate_many ---------------------------------------------------------------------


def test_generate_many_is_a_plain_iterator_reading_input_lazily(backend: str) -> None:
    """One Outcome per input, from a plain iterator; the input is pulled as slots free."""
    fake = FakeApimart(api_key=KEY)
    pulled = 0

    def source() -> Iterator[dict[str, Any]]:
        nonlocal pulled
        for item in jobs(30):
            pulled += 1
            yield item

    taken: list[am.Outcome] = []
    with make(fake) as client, client.generate_many(source(), concurrency=4) as outcomes:
        assert not hasattr(outcomes, "__anext__")
        for outcome in outcomes:
            taken.append(outcome)
            # A job holds its slot until its outcome is taken (the blocking iterator takes
            # up to 8 ahead of the caller), so the input is read at most that far ahead.
            assert pulled <= len(taken) + 4 + 8
    assert sorted(o.index for o in taken) == list(range(30))
    assert all(o.ok and o.task is not None for o in taken)
    assert fake.stats.tasks_created == 30
    assert fake.stats.max_in_flight <= 4  # the service never saw more than concurrency


def test_a_slow_reader_parks_the_batch_and_wakes_it(backend: str) -> None:
    """A reader that falls behind: the batch stops once 8 outcomes wait for it, resumes
    as they are read, and every outcome arrives exactly once."""
    fake = FakeApimart(api_key=KEY)
    with make(fake) as client, client.generate_many(jobs(40), concurrency=2) as outcomes:
        first = next(outcomes)
        batch = outcomes._batch  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while batch._parked is None:  # the read-ahead is full: the pump waits for us
            assert time.monotonic() < deadline, "the batch never parked"
            time.sleep(0.001)
        assert batch.items.qsize() == 8
        created = fake.stats.tasks_created
        assert created <= 1 + 8 + 2  # read, read ahead, and the two slots
        rest = list(outcomes)
    assert sorted(o.index for o in [first, *rest]) == list(range(40))
    assert fake.stats.tasks_created == 40


def test_generate_many_early_exit_cancels_the_rest(backend: str) -> None:
    """break after the first outcome: the rest is cancelled, nothing runs, nothing is lost."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.2, time_scale=0.05))
    events: list[am.Event] = []
    with make(fake) as client:
        idle = idle_tasks(client, fake)
        with client.generate_many(
            jobs(40, image_urls=[png(seed=9)]), concurrency=10, on_event=events.append
        ) as outcomes:
            first = next(outcomes)
        assert loop_tasks(client) == idle  # nothing of the batch is left running
        assert fake.stats.in_flight == 0
        assert fake.stats.tasks_created < 40
        assert unknown_tasks(fake, events, [first]) == []
        with pytest.raises(anyio.ClosedResourceError):
            next(outcomes)  # the stream closed with the block, as in the async client
        # Every slot came back: a new batch runs to the end.
        with client.generate_many(jobs(3)) as again:
            assert [o.ok for o in again] == [True, True, True]


def test_an_error_in_the_block_cancels_the_batch_and_propagates(backend: str) -> None:
    """An exception raised while iterating leaves the block as itself, batch cancelled."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.2, time_scale=0.05))
    problem = LookupError("the caller's own bug")
    with make(fake) as client:
        idle = idle_tasks(client, fake)
        with pytest.raises(LookupError) as raised, client.generate_many(jobs(20)) as outcomes:
            for _ in outcomes:
                raise problem
        assert raised.value is problem  # itself: not wrapped in an ExceptionGroup
        assert loop_tasks(client) == idle and fake.stats.in_flight == 0


def test_generate_many_reports_bad_input_and_options(backend: str) -> None:
    """A broken input iterator is raised after the jobs it started; bad options at entry."""
    fake = FakeApimart(api_key=KEY)

    def broken() -> Iterator[dict[str, Any]]:
        yield jobs(1)[0]
        raise KeyError("bad line")

    seen: list[am.Outcome] = []
    with make(fake) as client:
        with pytest.raises(KeyError, match="bad line"), client.generate_many(broken()) as outs:
            seen.extend(outs)
        assert [o.ok for o in seen] == [True]
        with (
            pytest.raises(ValueError, match="concurrency"),
            client.generate_many(jobs(1), concurrency=0),
        ):
            pass
        outcomes = []
        with client.generate_many([{"model": GEM, "prompt": "x", "n": 9}, *jobs(1)]) as outs:
            outcomes = list(outs)
        errors = sorted((o.index, type(o.error)) for o in outcomes)
        assert errors == [(0, am.InvalidRequestError), (1, type(None))]


def test_generate_many_downloads_and_fails_fast(backend: str, tmp_path: Path) -> None:
    """download_to and fail_fast behave as in the async client."""
    fake = FakeApimart(api_key=KEY)
    with make(fake) as client:
        with client.generate_many(jobs(3, n=2), download_to=tmp_path) as outcomes:
            files = [path for o in outcomes for path in o.files]
        assert len(files) == 6 and all(p.parent == tmp_path for p in files)
        fake.script("task", [Fault.TASK_FAILED])
        with client.generate_many(jobs(1), fail_fast=True) as outcomes:
            (only,) = list(outcomes)
        assert isinstance(only.error, am.TaskFailedError)


def test_callbacks_run_on_the_clients_thread(backend: str) -> None:
    """on_event and the input iterator run on the client's thread, one thread for all."""
    fake = FakeApimart(api_key=KEY)
    threads: set[int] = set()

    def on_event(event: am.Event) -> None:
        threads.add(threading.get_ident())

    def source() -> Iterator[dict[str, Any]]:
        for item in jobs(3):
            threads.add(threading.get_ident())
            yield item

    with make(fake) as client:
        client.generate(model=GEM, prompt="x", on_event=on_event)
        with client.generate_many(source(), on_event=on_event) as outcomes:
            assert all(o.ok for o in outcomes)
        assert threads == {client._runner.thread_id}  # pyright: ignore[reportPrivateUsage]
    assert threading.get_ident() not in threads


def test_async_callbacks_are_awaited_on_the_clients_loop(backend: str) -> None:
    """A coroutine on_event works too: it is awaited on the client's loop."""
    fake = FakeApimart(api_key=KEY)
    kinds: list[str] = []

    async def on_event(event: am.Event) -> None:
        await anyio.lowlevel.checkpoint()
        kinds.append(event.kind)

    with make(fake) as client:
        client.generate(model=GEM, prompt="x", on_event=on_event)
    assert kinds[:2] == ["submitting", "submitted"] and kinds[-1] == "completed"


@pytest.mark.parametrize("kind", ["submitting", "completed"])
@pytest.mark.parametrize("handler", ["sync", "async"])
def test_system_exit_from_a_callback_reaches_the_caller(
    backend: str, kind: str, handler: str
) -> None:
    """sys.exit() in an on_event callback, in the submit keeper or the caller's task, sync
    or async: raised in the caller's thread, and the client's loop lives on."""
    fake = FakeApimart(api_key=KEY)

    def exit_on(event: am.Event) -> None:
        if event.kind == kind:
            raise SystemExit(3)

    async def exit_on_async(event: am.Event) -> None:
        await anyio.lowlevel.checkpoint()
        exit_on(event)

    on_event = exit_on if handler == "sync" else exit_on_async
    with make(fake) as client:
        with pytest.raises(SystemExit) as raised:
            client.generate(model=GEM, prompt="x", on_event=on_event)
        assert raised.value.code == 3
        with pytest.raises(SystemExit), client.generate_many(jobs(3), on_event=on_event) as outs:
            list(outs)
        assert client.generate(model=GEM, prompt="still works").status is am.TaskStatus.COMPLETED


def test_system_exit_from_the_input_reaches_the_caller(backend: str) -> None:
    """sys.exit() in generate_many's input iterator (on the client's thread): raised in
    the caller's thread when the block ends; the client's loop lives on."""
    fake = FakeApimart(api_key=KEY)

    def source() -> Iterator[dict[str, Any]]:
        yield jobs(1)[0]
        raise SystemExit(4)

    with make(fake) as client:
        with pytest.raises(SystemExit) as raised, client.generate_many(source()) as outcomes:
            list(outcomes)
        assert raised.value.code == 4
        assert client.generate(model=GEM, prompt="still works").status is am.TaskStatus.COMPLETED


# -- threads -------------------------------------------------------------------------------


class _SubmitGauge(httpx.AsyncBaseTransport):
    """The fake's transport, counting submits in flight at once (on the client's loop)."""

    def __init__(self, fake: FakeApimart) -> None:
        self.inner = fake.transport()
        self.now = 0
        self.peak = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Forward to the fake; count submits."""
        if request.url.path != "/v1/images/generations":
            return await self.inner.handle_async_request(request)
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.now -= 1


def in_threads(count: int, work: Any) -> list[Any]:
    """Run ``work(i)`` in *count* threads at once; their results, or raise the first error."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def test_threads_sharing_a_client_share_its_submit_limit(backend: str) -> None:
    """Six threads calling generate at once: never more submits in flight than the limit."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fast(request_latency=(0.005, 0.01)))
    gauge = _SubmitGauge(fake)
    limits = Limits(submits=2, poll_rate=100_000.0, poll_burst=1_000)
    with make(gauge, limits=limits) as client:
        tasks = in_threads(
            6, lambda i: [client.generate(model=GEM, prompt=f"{i}-{j}") for j in range(3)]
        )
    assert len({t.id for batch in tasks for t in batch}) == 18
    assert gauge.peak == 2  # reached (the threads did overlap) and never exceeded


def test_threads_sharing_a_client_share_its_poll_budget(backend: str) -> None:
    """Four threads' batches together stay within one poll budget (rate x time + burst)."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(0.2, time_scale=1.0))
    limits = Limits(poll_rate=200.0, poll_burst=5)

    def batch(i: int) -> list[bool]:
        with client.generate_many(jobs(8), concurrency=8) as outcomes:
            return [o.ok for o in outcomes]

    with make(fake, limits=limits) as client:
        started = time.monotonic()
        results = in_threads(4, batch)
        elapsed = time.monotonic() - started
    assert all(all(r) and len(r) == 8 for r in results)
    # The tasks alone would poll at ~1,000/s each on this schedule; one budget binds them.
    assert fake.stats.polls <= 200.0 * elapsed + 5


def test_close_from_another_thread_cancels_running_calls(backend: str) -> None:
    """close() while other threads wait: their calls end with RuntimeError, nothing is left."""
    fake = FakeApimart(api_key=KEY)
    fake.script("task", [Fault.TASK_STUCK, Fault.TASK_STUCK])
    client = make(fake)
    stuck = client.submit(model=GEM, prompt="never ends")
    batch_started = threading.Event()
    outcome: list[BaseException] = []

    def wait_forever() -> None:
        try:
            client.wait(stuck, timeout=None)
        except RuntimeError as exc:
            outcome.append(exc)

    def batch_forever() -> None:
        try:
            with client.generate_many(jobs(1)) as outcomes:
                batch_started.set()
                next(outcomes)
        except RuntimeError as exc:
            outcome.append(exc)

    waiters = [threading.Thread(target=wait_forever), threading.Thread(target=batch_forever)]
    for waiter in waiters:
        waiter.start()
    assert batch_started.wait(10)
    deadline = time.monotonic() + 10
    while fake.stats.polls_by_task.get(stuck.id, 0) < 2:  # the wait is polling
        assert time.monotonic() < deadline, "the wait never polled"
        time.sleep(0.001)
    client.close()
    for waiter in waiters:
        waiter.join(10)
    assert [str(e) for e in outcome] == [
        "the Apimart client was closed (or its event loop ended) while this call ran"
    ] * 2
    assert fake.stats.in_flight == 0


# -- inside a running event loop (Jupyter) ---------------------------------------------------


@pytest.mark.anyio
async def test_works_where_an_event_loop_already_runs(anyio_backend: str) -> None:
    """Built and called inside a running loop (asyncio or trio), where asyncio.run fails."""
    fake = FakeApimart(api_key=KEY)
    with make(fake) as client:
        task = client.generate(model=GEM, prompt="in a notebook cell")
        with client.generate_many(jobs(3)) as outcomes:
            assert [o.ok for o in outcomes] == [True, True, True]
        assert task.status is am.TaskStatus.COMPLETED
        # The caller's loop never ran the client: the client's thread did.
        assert client._runner.thread_id != threading.get_ident()  # pyright: ignore[reportPrivateUsage]
    with pytest.raises(ValueError, match="APIMART_API_KEY"):
        Apimart()  # built on the client's thread here, still raised by the constructor


def test_generate_many_without_with_says_how_to_use_it() -> None:
    fake = FakeApimart(api_key="test-key")
    with (
        Apimart(api_key="test-key", transport=fake.transport()) as client,
        pytest.raises(TypeError, match="with client.generate_many"),
    ):
        for _ in client.generate_many([]):  # type: ignore[attr-defined]
            pass
