"""generate / generate_many / download end to end through the real client and the fake."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

import apimart_async as am
from apimart_async import AsyncApimart, Limits, Outcome
from apimart_async.testing import FakeApimart, Faults, RecordedRequest

from .conftest import FAST_LIMITS, FAST_POLL, ClientFor
from .images import png

pytestmark = pytest.mark.anyio

GEM = "gemini-3-pro-image-preview"


def requests(count: int, **extra: Any) -> list[dict[str, Any]]:
    """*count* valid gemini requests."""
    return [{"model": GEM, "prompt": f"picture {i}", **extra} for i in range(count)]


def recorded(fake: FakeApimart, endpoint: str) -> list[RecordedRequest]:
    """The requests the fake saw on *endpoint*."""
    return [r for r in fake.requests if r.endpoint == endpoint]


async def collect(client: AsyncApimart, items: Any, **kw: Any) -> list[Outcome]:
    """Run generate_many to the end and return every outcome."""
    out: list[Outcome] = []
    async with client.generate_many(items, **kw) as outcomes:
        async for outcome in outcomes:
            out.append(outcome)
    return out


async def test_generate_uploads_local_images_first(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path
) -> None:
    """Path and bytes entries are uploaded, then submitted as URLs, then waited."""
    path = tmp_path / "ref.png"
    path.write_bytes(png(seed=1))
    events: list[str] = []
    task = await client.generate(
        model=GEM,
        prompt="merge",
        image_urls=[path, png(seed=2), "https://example.test/c.png"],
        on_event=lambda e: events.append(e.kind),
    )
    assert task.status is am.TaskStatus.COMPLETED and task.image_urls
    assert fake.stats.uploads == 2
    body = recorded(fake, "submit")[0].json_body
    assert body is not None
    assert body["image_urls"][2] == "https://example.test/c.png"
    assert all(u.startswith("https://") for u in body["image_urls"])
    assert events.count("uploaded") == 2 and "submitted" in events and events[-1] == "completed"


async def test_generate_call_options_are_not_fields(
    client: AsyncApimart, fake: FakeApimart
) -> None:
    """timeout / idempotency_key / on_event never end up in the body."""
    await client.generate(model=GEM, prompt="x", timeout=30, idempotency_key="k-1")
    request = recorded(fake, "submit")[0]
    assert request.json_body is not None and set(request.json_body) == {"model", "prompt"}
    assert request.headers["idempotency-key"] == "k-1"


async def test_many_respects_concurrency(fake: FakeApimart, client_for: ClientFor) -> None:
    """1,000 pipelines at concurrency 50 never have more than 50 jobs' requests in flight."""
    async with client_for(fake) as client:
        outcomes = await collect(client, requests(1000), concurrency=50)
    assert len(outcomes) == 1000
    assert sorted(o.index for o in outcomes) == list(range(1000))
    assert all(o.ok for o in outcomes)
    assert fake.stats.max_in_flight <= 50
    assert fake.stats.submits == 1000


async def test_many_exact_outcomes_under_faults(client_for: ClientFor) -> None:
    """Random faults: still exactly one outcome per input, each completed or a typed error."""
    fake = FakeApimart(
        api_key="test-key",
        faults=Faults(server_error=0.1, rate_limit=0.05, reset=0.03, task_failure=0.1),
        seed=7,
    )
    async with client_for(fake) as client:
        outcomes = await collect(client, requests(300), concurrency=40)
    assert Counter(o.index for o in outcomes) == Counter(range(300))
    for o in outcomes:
        assert o.ok or isinstance(o.error, am.ApimartError | ValueError), o.error
        if o.ok:
            assert o.task is not None and o.task.status is am.TaskStatus.COMPLETED
    assert any(not o.ok for o in outcomes) and any(o.ok for o in outcomes)


async def test_bad_items_become_outcomes(client: AsyncApimart) -> None:
    """Invalid requests are that item's outcome (a ValueError), siblings still run."""
    items = [{"model": GEM, "prompt": "ok"}, {"model": GEM, "prompt": ""}, {"model": "nope"}]
    outcomes = {o.index: o for o in await collect(client, items)}
    assert outcomes[0].ok
    assert isinstance(outcomes[1].error, am.InvalidRequestError)
    assert isinstance(outcomes[2].error, am.UnknownModelError)


async def test_fail_fast_stops_the_rest(fake: FakeApimart, client_for: ClientFor) -> None:
    """With fail_fast the first error is delivered and the remaining jobs are cancelled."""
    items = [{"model": "nope", "prompt": "x"}] + requests(200)
    async with client_for(fake) as client:
        outcomes = await collect(client, items, concurrency=10, fail_fast=True)
    assert any(isinstance(o.error, am.UnknownModelError) for o in outcomes)
    assert len(outcomes) < len(items)
    assert fake.stats.in_flight == 0


async def test_lazy_input_is_read_with_bounded_read_ahead(client: AsyncApimart) -> None:
    """A huge generator is consumed only as slots free up."""
    pulled = 0

    def endless() -> Any:
        nonlocal pulled
        while True:
            pulled += 1
            yield {"model": GEM, "prompt": f"n{pulled}"}

    seen = 0
    async with client.generate_many(endless(), concurrency=8) as outcomes:
        async for _ in outcomes:
            seen += 1
            if seen == 20:
                break
    assert pulled <= 20 + 8 + 8 + 1


async def test_break_out_cancels_everything(fake: FakeApimart) -> None:
    """Leaving the loop early cancels in-flight work; nothing keeps running."""
    slow = FakeApimart(api_key="test-key", latency=_latency_fixed(0.5))
    async with AsyncApimart(
        api_key="test-key", transport=slow.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as client:
        with anyio.fail_after(5):
            async with client.generate_many(requests(100), concurrency=20) as outcomes:
                async for _ in outcomes:
                    break
                await anyio.sleep(0.05)
        assert slow.stats.in_flight == 0
        submits = slow.stats.submits
        await anyio.sleep(0.05)
        assert slow.stats.submits == submits  # nothing runs after the block


async def test_outer_cancellation_leaves_nothing_running() -> None:
    """Cancelling the surrounding scope ends the batch promptly and cleanly."""
    slow = FakeApimart(api_key="test-key", latency=_latency_fixed(10.0))
    async with AsyncApimart(
        api_key="test-key", transport=slow.transport(), poll=FAST_POLL, limits=FAST_LIMITS
    ) as client:
        with anyio.move_on_after(0.2) as scope:
            await collect(client, requests(50), concurrency=50)
        assert scope.cancelled_caught
        assert slow.stats.in_flight == 0


async def test_async_iterable_input(client: AsyncApimart) -> None:
    """An async generator of requests works like a list."""

    async def source() -> Any:
        for item in requests(10):
            yield item

    outcomes = await collect(client, source())
    assert sorted(o.index for o in outcomes) == list(range(10))


async def test_broken_input_iterable_raises_plainly(client: AsyncApimart) -> None:
    """An iterable that raises surfaces its own exception, not an ExceptionGroup."""

    def broken() -> Any:
        yield {"model": GEM, "prompt": "one"}
        raise KeyError("bad line")

    with pytest.raises(KeyError):
        await collect(client, broken())


async def test_poll_budget_holds_across_many_waits() -> None:
    """2,000 waiting tasks never exceed the client's poll rate (plus its burst)."""
    fake = FakeApimart(api_key="test-key", latency=_latency_fixed(0.3))
    limits = Limits(poll_rate=2000.0, poll_burst=50, submits=200)
    async with AsyncApimart(
        api_key="test-key", transport=fake.transport(), poll=FAST_POLL, limits=limits
    ) as client:
        start = anyio.current_time()
        outcomes = await collect(client, requests(2000), concurrency=2000)
        elapsed = anyio.current_time() - start
    assert all(o.ok for o in outcomes)
    polls = fake.stats.polls
    assert polls <= 2000.0 * elapsed + 50


async def test_waiting_jobs_hold_no_task_each() -> None:
    """400 jobs waiting on the service are heap records, not 400 suspended tasks."""
    fake = FakeApimart(api_key="test-key", latency=_latency_fixed(0.5))
    limits = Limits(poll_rate=10_000.0, poll_burst=100)  # default stage limits
    done: list[Outcome] = []
    async with AsyncApimart(
        api_key="test-key", transport=fake.transport(), poll=FAST_POLL, limits=limits
    ) as client:
        baseline = len(anyio.get_running_tasks())

        async def run() -> None:
            done.extend(await collect(client, requests(400), concurrency=400))

        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(5):
                while fake.stats.tasks_created < 400:  # noqa: ASYNC110 - the fake has no event
                    await anyio.sleep(0.01)
            alive = len(anyio.get_running_tasks()) - baseline
    assert len(done) == 400 and all(o.ok for o in done)
    # starters (uploads + submits), poll workers, the scheduler and the run itself
    assert alive <= limits.uploads + limits.submits + limits.polls_in_flight + 4


async def test_many_deadline_ends_waiting_jobs_promptly(client_for: ClientFor) -> None:
    """A batch deadline shorter than the tasks: every job is a TaskTimeoutError, on time."""
    fake = FakeApimart(api_key="test-key", latency=_latency_fixed(30.0))
    async with client_for(fake) as client:
        with anyio.fail_after(10):  # a hang guard; the 30 s tasks would take far longer
            outcomes = await collect(client, requests(50), concurrency=50, timeout=0.3)
    assert len(outcomes) == 50
    for o in outcomes:
        assert isinstance(o.error, am.TaskTimeoutError), o.error
        assert o.task is not None and o.error.task_id == o.task.id and o.error.timeout == 0.3
        assert "wait" in o.timings
    assert fake.stats.submits == 50  # each task was created once, and is still known


async def test_one_upload_for_a_thousand_jobs(fake: FakeApimart, client_for: ClientFor) -> None:
    """1,000 jobs sharing one reference image cause exactly one upload."""
    ref = png(seed=42)
    async with client_for(fake) as client:
        outcomes = await collect(client, requests(1000, image_urls=[ref]), concurrency=100)
    assert all(o.ok for o in outcomes)
    assert fake.stats.uploads == 1


async def test_download_all_images_atomically(
    client: AsyncApimart, fake: FakeApimart, tmp_path: Path
) -> None:
    """n=3 downloads three valid files named <task>_<i>.png; no key to the file host."""
    task = await client.generate(model=GEM, prompt="three", n=3)
    paths = await client.download(task, tmp_path / "out")
    assert [p.name for p in paths] == [f"{task.id}_{i}.png" for i in range(3)]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
    downloads = recorded(fake, "download")
    assert len(downloads) == 3 and not any(r.authorized for r in downloads)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


async def test_failed_download_leaves_no_file(tmp_path: Path, client_for: ClientFor) -> None:
    """A download that keeps failing mid-stream leaves nothing in dest."""
    fake = FakeApimart(api_key="test-key", faults=Faults(reset=1.0, only=("download",)))
    async with client_for(fake) as client:
        task = await client.generate(model=GEM, prompt="x", n=2)
        with pytest.raises(am.APIConnectionError):
            await client.download(task, tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_many_with_download(fake: FakeApimart, tmp_path: Path, client_for: ClientFor) -> None:
    """download_to saves each job's images and reports them on the outcome."""
    events: list[str] = []
    async with client_for(fake) as client:
        outcomes = await collect(
            client, requests(5, n=2), download_to=tmp_path, on_event=lambda e: events.append(e.kind)
        )
    assert all(len(o.files) == 2 and all(f.exists() for f in o.files) for o in outcomes)
    assert len(list(tmp_path.iterdir())) == 10
    assert events.count("downloaded") == 5
    assert all(set(o.timings) >= {"submit", "wait", "download"} for o in outcomes)


async def test_async_event_handler(client: AsyncApimart) -> None:
    """An async callback is awaited for every event."""
    seen: list[str] = []

    async def handler(event: am.Event) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(event.kind)

    await client.generate(model=GEM, prompt="x", on_event=handler)
    assert seen[:2] == ["submitting", "submitted"] and seen[-1] == "completed"


def _latency_fixed(seconds: float) -> Any:
    from apimart_async.testing import Latency

    return Latency.fixed(seconds)


async def test_an_error_in_the_callers_block_is_raised_as_it_is(client: AsyncApimart) -> None:
    """Not wrapped in an ExceptionGroup by the pipeline's task group."""
    with pytest.raises(LookupError) as info:
        async with client.generate_many(requests(3)) as stream:
            async for _ in stream:
                raise LookupError("the caller's own")
    assert type(info.value) is LookupError


async def test_system_exit_from_the_input_is_raised_plainly(client: AsyncApimart) -> None:
    def items() -> Any:
        yield {"model": GEM, "prompt": "one"}
        raise SystemExit(3)

    with pytest.raises(SystemExit) as info:
        async with client.generate_many(items()) as stream:
            async for _ in stream:
                pass
    assert type(info.value) is SystemExit and info.value.code == 3
    assert (await client.generate(model=GEM, prompt="still works")).status.is_terminal


async def test_system_exit_from_an_event_handler_during_a_submit(client: AsyncApimart) -> None:
    """The handler runs in the client's submit task; its SystemExit reaches the caller
    and the event loop goes on."""

    def handler(event: am.Event) -> None:
        if event.kind == "submitting":
            raise SystemExit(4)

    with pytest.raises(SystemExit):
        await client.generate(model=GEM, prompt="x", on_event=handler)
    assert (await client.generate(model=GEM, prompt="still works")).status.is_terminal


async def test_a_handler_failing_on_failed_events_loses_no_outcome(client_for: ClientFor) -> None:
    """A broken progress callback: every job still gets its outcome, with its task."""
    from apimart_async.testing import Faults

    events: list[str] = []

    def handler(event: am.Event) -> None:
        events.append(event.kind)
        if event.kind == "failed":
            raise RuntimeError("bug in my progress bar")

    fake = FakeApimart(api_key="test-key", faults=Faults(task_failure=1.0))
    async with client_for(fake) as failing:
        outcomes = await collect(failing, requests(10), on_event=handler)
    assert len(outcomes) == 10
    assert all(isinstance(o.error, am.TaskFailedError) and o.task for o in outcomes)
    assert events.count("failed") == 10


async def test_generate_many_without_with_says_how_to_use_it(client: AsyncApimart) -> None:
    with pytest.raises(TypeError, match="async with client.generate_many"):
        async for _ in client.generate_many(requests(1)):  # type: ignore[attr-defined]
            pass
