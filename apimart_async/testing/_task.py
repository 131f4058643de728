"""One task of the fake service: its fixed timeline, and the status it shows at a moment.

A task is decided entirely when it is created (duration, fate, cost, webhook), and its
status at any moment is computed from the clock, so nothing has to run in the
background for tasks to progress (see ``_state``).

What can go wrong: times named ``*_at`` are on the owning fake's clock, which is only
meaningful inside one process; the state file stores wall-clock times instead and
converts them back when a fake is re-created from it (``_persist``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._options import Variants

__all__ = ["TERMINAL_FATES", "FakeTask", "TaskFate"]

TaskFate = Literal["complete", "fail", "stuck", "unknown_status"]
TERMINAL_FATES: frozenset[str] = frozenset({"complete", "fail"})
"""Fates that end in a terminal state (and so in a webhook callback)."""


@dataclass(slots=True, eq=False)
class FakeTask:
    """One generation task as the fake knows it (read it; do not mutate it).

    Times named ``*_at`` are on the fake's clock (``time.monotonic`` unless a clock was
    injected), in real seconds, so benchmarks can compare them with their own
    monotonic readings: *completes_at* is when the task finishes (for stuck tasks:
    when it would have), *detected_at* when a poll first reported it finished, and
    *delivered_at* when a webhook callback for it was first answered with a 2xx. The
    detection lag of a client is ``detected_at - completes_at``. *duration* is in
    service seconds (what ``actual_time`` reports), *real_duration* in real seconds.
    *cost* is what the task costs in USD (price x n); a failed task is refunded.
    *webhook* is the base URL the submit asked callbacks for (``None``: none).
    """

    id: str
    model: str
    prompt: str
    n: int
    image_urls: tuple[str, ...]
    idempotency_key: str | None
    body_hash: str
    created_at: float
    duration: float
    real_duration: float
    created_unix: int
    estimated_time: int
    fate: TaskFate
    reason: str | None
    cost: float
    submit_response: dict[str, Any] = field(default_factory=dict[str, Any], repr=False)
    polls: int = 0
    detected_at: float | None = None
    webhook: str | None = None
    delivered_at: float | None = None

    @property
    def completes_at(self) -> float:
        """Clock time at which the task finishes (or would, if it were not stuck)."""
        return self.created_at + self.real_duration

    @property
    def completed_unix(self) -> int:
        """The ``completed`` field: creation plus the duration, in service seconds."""
        return self.created_unix + math.ceil(self.duration)

    @property
    def terminal(self) -> bool:
        """Whether the task ever reaches ``completed`` or ``failed``."""
        return self.fate in TERMINAL_FATES

    def phase(self, now: float, variants: Variants, unknown_status: str) -> tuple[str, int]:
        """``(status, progress)`` at clock time *now*.

        Pending for the first 10% of the duration (``submitted`` in its first 3%), then
        processing with progress rising linearly (1..99), then the terminal state.
        """
        elapsed = now - self.created_at
        duration = self.real_duration
        if elapsed >= duration and self.fate in TERMINAL_FATES:
            return ("completed", 100) if self.fate == "complete" else ("failed", 100)
        if elapsed < 0.03 * duration:
            return "submitted", 0
        if elapsed < 0.1 * duration:
            return "pending", 0
        progress = min(99, max(1, int(100 * elapsed / duration))) if duration > 0 else 99
        if self.fate == "unknown_status":
            return unknown_status, progress
        return variants.processing_status, progress
