"""The adaptive poll schedule and the client-wide poll budget, in isolation."""

from __future__ import annotations

import random

import anyio
import pytest

from apimart_async import PollPolicy, Task, TaskStatus
from apimart_async._polling import PollSchedule, RateLimiter


def schedule(policy: PollPolicy | None = None) -> PollSchedule:
    """A schedule started at t=0 with a seeded RNG."""
    return PollSchedule(policy or PollPolicy(jitter=0.0), 0.0, random.Random(1))


def task(status: TaskStatus, progress: int | None = None, estimated: float | None = None) -> Task:
    """A task snapshot."""
    return Task(id="t", status=status, progress=progress, estimated_time=estimated)


def test_first_poll_uses_the_estimate_clamped() -> None:
    """20% of estimated_time, clamped to [1 s, 15 s]; 3 s without an estimate."""
    assert schedule().first_delay(None) == 3.0
    assert schedule().first_delay(40.0) == pytest.approx(8.0)
    assert schedule().first_delay(1000.0) == 15.0
    assert schedule().first_delay(0.1) == 1.0


def test_progress_aims_just_past_the_implied_end() -> None:
    """At 5 s and 25 % done, the next poll lands a little after 20 s."""
    delay = schedule().next_delay(task(TaskStatus.PROCESSING, 25), now=5.0)
    end = 5.0 + delay
    assert 19.5 < end < 21.0


def test_overdue_task_is_checked_soon_in_proportion() -> None:
    """At 99 %, the next look is just past the implied end (100.5 s at 100 s), and
    never sooner than 0.5 s (at 10 s the implied end is 10.05 s)."""
    assert schedule().next_delay(task(TaskStatus.PROCESSING, 99), now=10.0) == 0.5
    late = schedule().next_delay(task(TaskStatus.PROCESSING, 99), now=100.0)
    assert late == pytest.approx(4.5226, rel=1e-4)


def test_no_progress_backs_off_to_the_cap() -> None:
    """Without progress the interval grows by 1.6x from the first 3 s, up to 15 s."""
    s = schedule()
    s.first_delay(None)
    delays = [s.next_delay(task(TaskStatus.UNKNOWN), now=float(i)) for i in range(6)]
    assert delays == pytest.approx([4.8, 7.68, 12.288, 15.0, 15.0, 15.0])


def test_scaling_scales_every_interval() -> None:
    """time_scale multiplies the whole schedule."""
    fast = PollSchedule(PollPolicy(jitter=0.0).scaled(0.001), 0.0, random.Random(1))
    assert fast.first_delay(None) == pytest.approx(0.003)


def test_rate_limiter_grants_the_burst_then_the_rate() -> None:
    """5 at once, then one every 5 ms (200/s), on the loop clock."""
    limiter = RateLimiter(rate=200.0, burst=5)
    delays = [limiter.reserve(10.0) for _ in range(8)]
    assert delays == pytest.approx([0.0] * 5 + [0.005, 0.010, 0.015])


def test_a_released_slot_goes_to_the_next_caller() -> None:
    """Ten reserved, five given back: the next caller waits as if five had never asked."""
    limiter = RateLimiter(rate=100.0, burst=1)
    assert [limiter.reserve(0.0) for _ in range(10)] == pytest.approx(
        [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]
    )
    for _ in range(5):
        limiter.release()
    assert limiter.reserve(0.0) == pytest.approx(0.05)


@pytest.mark.anyio
async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    """Cancelled while waiting for its slot (natively too): the slot is not lost."""
    limiter = RateLimiter(rate=10.0, burst=1)
    await limiter.acquire()  # the burst
    for _ in range(50):  # each would have waited 0.1 s more than the last
        with anyio.move_on_after(0):
            await limiter.acquire()
    assert limiter.reserve(anyio.current_time()) <= 0.1
