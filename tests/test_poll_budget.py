"""One poll budget for every task query: first attempts and retries, kept or given back.

``Limits.poll_rate`` is what a client promises the service: during a storm of 429s
and 503s the retries of task queries draw from it too (the service asked us to slow
down, so the client must not multiply its rate), and a poller cancelled while waiting
for its slot hands the slot back, so hundreds of abandoned waits (a web app's aborted
requests) do not delay the next caller.
"""

from __future__ import annotations

import anyio
import pytest

from apimart_async import AsyncApimart, Limits, RetryPolicy
from apimart_async.testing import FakeApimart, Faults, Latency

from .conftest import FAST_POLL

pytestmark = pytest.mark.anyio

KEY = "test-key"
GEM = "gemini-3.1-flash-image-preview"


async def test_a_429_503_storm_stays_within_the_budget() -> None:
    """Every answer is a 429 (Retry-After: 0) or a 503: queries stay within rate x time + burst."""
    fake = FakeApimart(api_key=KEY, latency=Latency.fixed(60.0))
    rate, burst = 200.0, 5
    limits = Limits(poll_rate=rate, poll_burst=burst)
    retry = RetryPolicy(attempts=50, wait_initial=0.0, wait_jitter=0.0)
    async with AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, limits=limits, retry=retry
    ) as client:
        tasks = [await client.submit(model=GEM, prompt=f"p{i}") for i in range(20)]
        fake.faults = Faults(
            rate_limit=0.5,
            server_error=0.5,
            retry_after=0,
            server_error_statuses=(503,),
            only=("poll",),
        )
        polls_before = fake.stats.polls
        start = anyio.current_time()
        with anyio.move_on_after(0.25):
            async with anyio.create_task_group() as tg:
                for task in tasks:
                    tg.start_soon(client.wait, task.id)
        elapsed = anyio.current_time() - start
    polls = fake.stats.polls - polls_before
    assert polls > burst  # the storm was real: retries were made
    assert polls <= burst + rate * elapsed + 1


async def test_cancelled_pollers_give_their_slots_back() -> None:
    """500 waits cancelled while queued for the budget: the next wait does not queue."""
    fake = FakeApimart(api_key=KEY)
    limits = Limits(poll_rate=50.0, poll_burst=1)
    async with AsyncApimart(
        api_key=KEY, transport=fake.transport(), poll=FAST_POLL, limits=limits
    ) as client:
        task = await client.submit(model=GEM, prompt="quick")
        with anyio.move_on_after(0.05):
            async with anyio.create_task_group() as tg:
                for _ in range(500):  # together they reserve 10 s of the budget
                    tg.start_soon(client.wait, task.id)
        polls = fake.stats.polls
        with anyio.move_on_after(2.0) as scope:  # a forfeited budget would wait ~10 s
            done = await client.wait(task.id)
    assert not scope.cancelled_caught and done.status.is_terminal
    assert fake.stats.polls == polls + 1
