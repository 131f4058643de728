"""When to ask the service about a task again, and how many asks a client may make.

Two pieces, kept apart so each can be tested alone:

``PollSchedule`` decides the next delay for one task. It polls first at a fraction of
the task's ``estimated_time`` (the service's estimates run long: 60-100 s for tasks that
take 10-20 s, apimart-api.md §8). Once the task reports progress, it extrapolates the
completion time from progress and elapsed time and aims just past it, so a typical task
costs two or three queries and is noticed within a few percent of its duration. Without
progress it backs off geometrically with jitter, up to a cap.

``RateLimiter`` is the client-wide poll budget: every task query on a client (each
attempt, retries included) draws from one token bucket, so 10,000 waiting tasks cost
the same request rate as 100 (they are noticed later instead), and a storm of 429s or
503s is retried within the budget, not on top of it. It computes each caller's slot
arithmetically under no lock and sleeps outside it, so waiting tasks cost nothing but
their sleep.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

import anyio

from ._clock import now
from .types import Task, TaskStatus

if TYPE_CHECKING:
    import random

    from ._config import PollPolicy

__all__ = ["PollSchedule", "RateLimiter"]


class PollSchedule:
    """The adaptive delays (in real seconds) between polls of one task.

    *started* is the local ``now()`` when the task was submitted (or
    when waiting began, for a task submitted elsewhere).
    """

    __slots__ = ("_last_delay", "_policy", "_pushes", "_random", "_started")

    def __init__(
        self, policy: PollPolicy, started: float, rng: random.Random, *, pushes: bool = False
    ) -> None:
        # *rng* is the client's: a Random per schedule would cost 2.5 KB per waiting task.
        self._policy = policy
        self._started = started
        self._random = rng
        self._last_delay = 0.0
        self._pushes = pushes  # the result will be pushed: polls are a safety net only

    def first_delay(self, estimated_time: float | None) -> float:
        """Delay before the first poll, from the service's estimate if it gave one."""
        p = self._policy
        if self._pushes:
            expected = estimated_time or p.push_expected_time
            return max(p.push_safety_min, expected * p.push_safety_factor) * p.time_scale
        guess = p.first_default if estimated_time is None else estimated_time * p.first_fraction
        delay = min(max(guess, p.first_min), p.first_max) * p.time_scale
        self._last_delay = delay
        return delay

    def next_delay(self, task: Task, now: float) -> float:
        """Delay after seeing *task* at local time *now*."""
        p = self._policy
        scale = p.time_scale
        if self._pushes:
            return self._jittered(p.push_safety_interval * scale)
        elapsed = max(now - self._started, 0.0)
        progress = task.progress or 0
        floor = p.min_interval * scale
        cap = p.max_interval * scale
        if task.status in (TaskStatus.PROCESSING, TaskStatus.IN_PROGRESS) and 0 < progress < 100:
            # Progress tends to be reported as a floor, so (progress + 0.5) is the middle
            # of what it could mean; aim a little past that.
            eta = elapsed * 100.0 / (progress + 0.5)
            remaining = eta - elapsed + p.eta_margin * eta
            if remaining > floor:
                delay = min(remaining, cap)
                self._last_delay = delay
                return delay
            # The predicted end has passed: look again soon, in proportion to the task.
            delay = min(max(p.eta_margin * elapsed, floor), cap)
            self._last_delay = delay
            return delay
        estimated = task.estimated_time
        if task.status in (TaskStatus.SUBMITTED, TaskStatus.PENDING) and estimated:
            # Still queued: wait for a slice of the estimate rather than hammering.
            remaining_estimate = estimated * scale - elapsed
            if remaining_estimate > 0:
                delay = min(max(remaining_estimate * p.first_fraction, floor), cap)
                self._last_delay = delay
                return self._jittered(delay)
        delay = min(max(self._last_delay * p.backoff, floor), cap)
        self._last_delay = delay
        return self._jittered(delay)

    def requery_delay(self) -> float:
        """A short look again (a task completed without its result URLs yet)."""
        p = self._policy
        return p.first_min * p.time_scale

    def _jittered(self, delay: float) -> float:
        jitter = self._policy.jitter
        if not jitter:
            return delay
        return delay * (1.0 + self._random.uniform(-jitter, jitter))


class RateLimiter:
    """A token bucket shared by every task query of one client: *rate* per second, *burst*.

    ``acquire`` reserves the next free slot (virtual scheduling) and sleeps until it;
    there is no queue to drain and no background task. A caller cancelled while
    waiting for its slot gives it back: the next caller takes it, so cancelled pollers
    never make the others wait longer, and the budget is never exceeded (a freed slot
    is reused at its own time, never earlier).
    """

    __slots__ = ("_burst", "_freed", "_interval", "_next")

    def __init__(self, rate: float, burst: int) -> None:
        self._interval = 1.0 / rate
        self._burst = burst
        self._next = float("-inf")
        self._freed: list[float] = []  # future slots given back, earliest first

    def reserve(self, current: float) -> float:
        """Reserve a slot at loop time *current*; return it (a time, maybe in the past)."""
        freed = self._freed
        while freed:
            slot = heapq.heappop(freed)
            if slot >= current:  # a freed slot still ahead: the earliest one is ours
                return slot
        # Unused capacity accumulates only up to the burst size.
        slot = max(self._next, current - (self._burst - 1) * self._interval)
        self._next = slot + self._interval
        return slot

    async def acquire(self) -> None:
        """Wait for this caller's slot."""
        current = now()
        slot = self.reserve(current)
        if slot > current:
            try:
                await anyio.sleep(slot - current)
            except BaseException:  # cancelled, natively too: the slot goes back
                self.release(slot)
                raise

    def release(self, slot: float) -> None:
        """Give back *slot*, reserved but not used for a request."""
        if math.isclose(slot + self._interval, self._next):
            self._next = slot  # the latest reservation: simply not made
        else:
            heapq.heappush(self._freed, slot)
