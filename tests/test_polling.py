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
    """5 at once (slots already due), then one every 5 ms (200/s), on the loop clock."""
    limiter = RateLimiter(rate=200.0, burst=5)
    slots = [limiter.reserve(10.0) for _ in range(8)]
    assert slots == pytest.approx([9.98, 9.985, 9.99, 9.995, 10.0, 10.005, 10.010, 10.015])


def test_released_slots_go_to_the_next_callers_at_their_own_time() -> None:
    """Ten reserved; the last one given back is simply not made; one in the middle is
    taken by the next caller at its time, never earlier (the rate always holds)."""
    limiter = RateLimiter(rate=100.0, burst=1)
    slots = [limiter.reserve(0.0) for _ in range(10)]
    assert slots == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09])
    limiter.release(slots[9])  # the latest
    limiter.release(slots[3])  # one in the middle
    assert limiter.reserve(0.0) == pytest.approx(0.03)  # the freed one
    assert limiter.reserve(0.0) == pytest.approx(0.09)  # then the queue goes on
    limiter.release(0.02)  # a freed slot already past when asked for: not reused
    assert limiter.reserve(0.05) == pytest.approx(0.10)


def test_a_window_never_sees_more_than_the_budget() -> None:
    """Cancellations anywhere in the queue: any 1 s window holds at most rate x 1 s
    grants (plus the burst), which the old give-back (rewinding the queue) broke."""
    limiter = RateLimiter(rate=10.0, burst=1)
    granted = [limiter.reserve(0.0) for _ in range(20)]
    for slot in granted[5:15]:  # ten waiters cancelled in the middle of the queue
        limiter.release(slot)
    granted = granted[:5] + granted[15:] + [limiter.reserve(0.2) for _ in range(20)]
    for start in granted:
        assert sum(start <= g < start + 1.0 for g in granted) <= 10 + 1


@pytest.mark.anyio
async def test_a_cancelled_waiter_gives_its_slot_back() -> None:
    """Cancelled while waiting for its slot (natively too): the slot is not lost."""
    limiter = RateLimiter(rate=10.0, burst=1)
    await limiter.acquire()  # the burst
    for _ in range(50):  # each would have waited 0.1 s more than the last
        with anyio.move_on_after(0):
            await limiter.acquire()
    now = anyio.current_time()
    assert limiter.reserve(now) - now <= 0.1
