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
    """A fraction of estimated_time, clamped to [first_min, first_max]; a default otherwise."""
    p = PollPolicy()
    assert schedule().first_delay(None) == p.first_default
    assert schedule().first_delay(40.0) == pytest.approx(40.0 * p.first_fraction)
    assert schedule().first_delay(1000.0) == p.first_max
    assert schedule().first_delay(0.1) == p.first_min


def test_progress_aims_just_past_the_implied_end() -> None:
    """At 5 s and 25 % done, the next poll lands a little after 20 s."""
    delay = schedule().next_delay(task(TaskStatus.PROCESSING, 25), now=5.0)
    end = 5.0 + delay
    assert 19.5 < end < 21.0


def test_overdue_task_is_checked_soon_in_proportion() -> None:
    """Past the predicted end, the next look is a few percent of the elapsed time."""
    p = PollPolicy(jitter=0.0)
    delay = schedule(p).next_delay(task(TaskStatus.PROCESSING, 99), now=10.0)
    assert delay == pytest.approx(max(p.eta_margin * 10.0, p.min_interval))


def test_no_progress_backs_off_to_the_cap() -> None:
    """Without progress the interval grows geometrically and stops at max_interval."""
    p = PollPolicy(jitter=0.0)
    s = schedule(p)
    s.first_delay(None)
    delays = [s.next_delay(task(TaskStatus.UNKNOWN), now=float(i)) for i in range(12)]
    assert delays == sorted(delays)
    assert delays[-1] == p.max_interval


def test_scaling_scales_every_interval() -> None:
    """time_scale multiplies the whole schedule."""
    fast = PollSchedule(PollPolicy(jitter=0.0).scaled(0.001), 0.0, random.Random(1))
    assert fast.first_delay(None) == pytest.approx(PollPolicy().first_default * 0.001)


@pytest.mark.anyio
async def test_rate_limiter_spaces_acquisitions() -> None:
    """After the burst, acquisitions are granted at the configured rate."""
    limiter = RateLimiter(rate=200.0, burst=5)
    start = anyio.current_time()
    for _ in range(25):
        await limiter.acquire()
    elapsed = anyio.current_time() - start
    # 20 acquisitions beyond the burst at 200/s need at least ~0.1 s.
    assert elapsed >= 19 / 200.0
