"""Chaos at small size: the ``benchmarks/chaos.py`` scenario with a few hundred pipelines.

The scenario (fault mix, requests, invariants) lives in ``benchmarks.chaos`` so that
this test and the 2,000-pipeline benchmark cannot drift apart; here it runs on both
backends, in-process and over real HTTP, and every invariant is asserted.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from pathlib import Path

import httpx
import pytest
import stamina

import apimart_async as am
from apimart_async import AsyncApimart, Limits, PollPolicy
from apimart_async.testing import FakeApimart, Faults, Latency
from benchmarks.chaos import (
    CHAOS_FAULTS,
    MODES,
    ChaosConfig,
    ChaosRun,
    count_sockets,
    run_chaos,
    settle_sockets,
)

from .images import png

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

pytestmark = [
    pytest.mark.anyio,
    # When the client abandons a body mid-stream (over a cap, not an image, cancelled),
    # httpx's inner generators (Response.aiter_raw, its stream's __aiter__) are left to
    # the garbage collector, which trio reports. That part is httpx's; the iterator the
    # client owns is closed (test_rejected_bodies_close_their_stream checks it).
    pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning"),
]

# The deadline ends the stuck tasks; jobs whose tasks complete (in milliseconds, after
# a few instant retries) must never reach it, even on a loaded 2-core machine.
SMALL = ChaosConfig(jobs=200, concurrency=50, timeout=4.0)
# Over real HTTP (uvicorn in a thread shares the GIL) timings are looser: no stuck
# tasks there (the in-process runs cover them), and a deadline nothing else reaches.
OVER_HTTP = dataclasses.replace(
    SMALL,
    jobs=100,
    server=True,
    timeout=30.0,
    faults=dataclasses.replace(CHAOS_FAULTS, task_stuck=0.0),
)


def check_common(run: ChaosRun) -> None:
    """The invariants both modes share, asserted one by one for readable failures."""
    assert run.violations() == []
    assert Counter(o.index for o in run.outcomes) == Counter(range(SMALL.jobs))
    for outcome in run.outcomes:
        assert outcome.ok or isinstance(outcome.error, am.ApimartError), outcome.error
        assert not isinstance(outcome.error, BaseExceptionGroup)
    assert run.fake.duplicate_keys() == []
    assert run.leaked_tasks == 0 and run.fake.stats.in_flight == 0 and run.client_closed
    injected = run.fake.stats.faults
    assert {"server_error", "rate_limit", "reset", "task_failed"} <= set(injected)
    assert not [p for p in run.download_dir.iterdir() if p.name.startswith(".")]


async def test_chaos_keys_ignored_never_pays_twice(tmp_path: Path) -> None:
    """Fake ignores keys: one outcome each, typed errors, 0 duplicates, ambiguity surfaced."""
    with stamina.set_testing(True, attempts=SMALL.retry_attempts, cap=True):
        run = await run_chaos(SMALL, "keys-ignored", tmp_path)
    check_common(run)
    uncertain = [o for o in run.outcomes if isinstance(o.error, am.SubmissionUncertainError)]
    assert {o.idempotency_key for o in uncertain} == run.ambiguous_keys()
    by_key = run.fake.stats.tasks_by_key
    assert all(len(by_key.get(o.idempotency_key, ())) <= 1 for o in run.outcomes)
    assert run.completed() and uncertain


async def test_chaos_keys_honoured_with_retry_completes_each_job_once(tmp_path: Path) -> None:
    """Fake honours keys + retry_uncertain_submits: exactly one task per job, none uncertain."""
    with stamina.set_testing(True, attempts=SMALL.retry_attempts, cap=True):
        run = await run_chaos(SMALL, "keys-honoured", tmp_path)
    check_common(run)
    by_key = run.fake.stats.tasks_by_key
    assert all(len(by_key[o.idempotency_key]) == 1 for o in run.outcomes)
    assert run.fake.stats.tasks_created == SMALL.jobs
    assert not any(isinstance(o.error, am.SubmissionUncertainError) for o in run.outcomes)
    fates = Counter(run.fake.tasks[o.task.id].fate for o in run.outcomes if o.task)
    assert len(run.completed()) == fates["complete"]
    created_then_lost = {
        r.idempotency_key
        for r in run.fake.requests
        if r.endpoint == "submit" and r.fault in ("drop_after_submit", "malformed_json")
    }
    assert run.fake.stats.replays >= len(created_then_lost)  # resent, and replayed


@pytest.mark.parametrize("mode", MODES)
async def test_chaos_over_real_http_closes_every_socket(tmp_path: Path, mode: str) -> None:
    """Over uvicorn: same invariants, and no socket stays open once the client closed."""
    with stamina.set_testing(True, attempts=OVER_HTTP.retry_attempts, cap=True):
        run = await run_chaos(OVER_HTTP, mode, tmp_path)
    assert run.violations() == []
    assert run.open_sockets == 0
    assert run.fake.duplicate_keys() == []


async def test_pool_connections_are_idle_after_a_faulty_batch() -> None:
    """An httpx pool against a real server has no active connection after a faulty batch."""
    fake = FakeApimart(
        api_key="test-key", faults=Faults(reset=0.1, drop_after_submit=0.05, server_error=0.1)
    )
    transport = httpx.AsyncHTTPTransport(retries=0)
    async with fake.serve() as base_url:
        before = count_sockets()
        async with httpx.AsyncClient(transport=transport) as http:
            async with AsyncApimart(
                api_key="test-key",
                base_url=base_url,
                http_client=http,
                poll=PollPolicy().scaled(0.001),
                limits=Limits(poll_rate=100_000.0, poll_burst=1_000),
            ) as client:
                items = [{"model": "imagen-4.0-apimart", "prompt": f"p{i}"} for i in range(60)]
                async with client.generate_many(items, concurrency=20) as outcomes:
                    async for _ in outcomes:
                        pass
            connections = transport._pool.connections
            assert connections and all(c.is_idle() or c.is_closed() for c in connections)
        assert transport._pool.connections == []
        assert fake.stats.in_flight == 0
        assert await settle_sockets(before) in (0, None)


async def test_rate_limit_near_the_deadline_is_a_timeout() -> None:
    """A 429 whose Retry-After outlasts the wait deadline still ends as TaskTimeoutError."""
    fake = FakeApimart(api_key="test-key", latency=Latency.fixed(60.0))
    async with AsyncApimart(
        api_key="test-key",
        transport=fake.transport(),
        poll=PollPolicy().scaled(0.001),
        limits=Limits(poll_rate=100_000.0, poll_burst=1_000),
    ) as client:
        task = await client.submit(model="imagen-4.0-apimart", prompt="slow")
        fake.faults = Faults(rate_limit=1.0, retry_after=30.0, only=("poll",))
        with pytest.raises(am.TaskTimeoutError) as info:
            await client.wait(task, timeout=0.3)
    assert info.value.task_id == task.id


async def test_channel_failed_400_is_retried_by_safe_calls(tmp_path: Path) -> None:
    """400 get_channel_failed (documented as retryable) on an upload or a poll is retried."""
    # Only API calls: the result host is a file server, where a 400 is a 400.
    fake = FakeApimart(api_key="test-key")
    as_400 = Faults(channel_failed_statuses=(400,))
    fake.faults = {"upload": as_400, "poll": as_400}
    for endpoint in ("upload", "poll", "poll"):
        fake.script(endpoint, ["channel_failed"])
    async with AsyncApimart(
        api_key="test-key",
        transport=fake.transport(),
        poll=PollPolicy().scaled(0.001),
        limits=Limits(poll_rate=100_000.0, poll_burst=1_000),
    ) as client:
        task = await client.generate(
            model="gemini-3-pro-image-preview", prompt="x", image_urls=[png()]
        )
        files = await client.download(task, tmp_path)
    assert len(files) == 1
    assert fake.stats.faults == {"channel_failed": 3}
    assert fake.stats.status_counts[400] == 3


async def test_deadline_passing_during_upload_is_a_typed_error() -> None:
    """A pipeline deadline that ends mid-upload is an ApimartError (and a TimeoutError)."""
    fake = FakeApimart(api_key="test-key", latency=Latency.fast(request_latency=(0.3, 0.3)))
    async with AsyncApimart(
        api_key="test-key", transport=fake.transport(), poll=PollPolicy().scaled(0.001)
    ) as client:
        request = {"model": "gemini-3-pro-image-preview", "prompt": "x"}
        with pytest.raises(am.ApimartError) as info:
            await client.generate(request, image_urls=[png(seed=1)], timeout=0.05)
        assert isinstance(info.value, TimeoutError)
        async with client.generate_many(
            [{**request, "image_urls": [png(seed=2)]}], timeout=0.05
        ) as outcomes:
            [outcome] = [o async for o in outcomes]
    assert isinstance(outcome.error, am.ApimartError), repr(outcome.error)
    assert fake.stats.submits == 0
