"""Public result types: what the client hands back and what it reports while working.

``UploadedImage`` and ``Task`` are frozen pydantic models built from every documented
response variant (see ``_parsing``); ``Outcome`` and the progress events are small frozen
dataclasses because they are created once per job or state change on hot paths.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = [
    "AccountBalance",
    "CompletedEvent",
    "DownloadedEvent",
    "Event",
    "FailedEvent",
    "Outcome",
    "ProgressEvent",
    "SubmittedEvent",
    "SubmittingEvent",
    "Task",
    "TaskErrorInfo",
    "TaskStatus",
    "UploadedEvent",
    "UploadedImage",
]


class TaskStatus(str, enum.Enum):
    """Where a task is. Terminal: ``COMPLETED``, ``FAILED``, ``CANCELLED``."""

    SUBMITTED = "submitted"
    """Accepted by the service, not yet queued (the submit response says this)."""
    PENDING = "pending"
    """Queued upstream."""
    PROCESSING = "processing"
    """Being generated; ``progress`` rises."""
    IN_PROGRESS = "in_progress"
    """Another spelling of processing used by some model pages."""
    COMPLETED = "completed"
    """Done; ``image_urls`` holds the results (valid about 24 h)."""
    FAILED = "failed"
    """Ended with an error; reserved credits are refunded by the service."""
    CANCELLED = "cancelled"
    """Cancelled on the service side."""
    UNKNOWN = "unknown"
    """A status string no documentation lists; treated as still running until the deadline."""

    def __str__(self) -> str:
        # The wire value ("completed"), as a StrEnum prints, on every Python version.
        return self.value

    @property
    def is_terminal(self) -> bool:
        """Whether polling can stop."""
        return self in _TERMINAL

    @classmethod
    def parse(cls, value: object) -> TaskStatus:
        """Map a status string, including undocumented aliases, onto a member."""
        if not isinstance(value, str):
            return cls.UNKNOWN
        key = value.strip().lower()
        try:
            return cls(key)
        except ValueError:
            return _ALIASES.get(key, cls.UNKNOWN)


_TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
# Never documented by APIMart, handled defensively by its clients (apimart-api.md §6.2).
_ALIASES = {
    "succeeded": TaskStatus.COMPLETED,
    "success": TaskStatus.COMPLETED,
    "failure": TaskStatus.FAILED,
    "error": TaskStatus.FAILED,
    "expired": TaskStatus.FAILED,
    "canceled": TaskStatus.CANCELLED,
    "queued": TaskStatus.PENDING,
    "running": TaskStatus.PROCESSING,
}


class _Frozen(BaseModel):
    # Built on first use, not at import (see models.py).
    model_config = ConfigDict(frozen=True, extra="ignore", defer_build=True)


class AccountBalance(_Frozen):
    """What ``AsyncApimart.balance()`` read: the key's (or the account's) balance.

    *remaining* and *used* are in *unit* (the service's configured unit, ``None`` when
    its answer does not say; APIMart's default is USD). *unlimited* is True for keys
    without a quota, where *remaining* is None (the service says ``-1``).
    """

    remaining: float | None
    used: float | None
    unlimited: bool
    unit: str | None = None
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)


class UploadedImage(_Frozen):
    """A file stored by ``POST /v1/uploads/images``; *url* is public for 72 hours."""

    url: str
    filename: str
    content_type: str
    bytes: int
    created_at: datetime
    expires_at: datetime
    sha256: str | None = None
    """Hex digest of the content, when the client computed it (for dedup)."""

    def expires_within(self, seconds: float, *, now: datetime | None = None) -> bool:
        """Whether the URL dies within *seconds* from *now*."""
        now = now or datetime.now(self.expires_at.tzinfo)
        return self.expires_at - now <= timedelta(seconds=seconds)


class TaskErrorInfo(_Frozen):
    """The ``error`` of a failed task; *code* may be an int, a string or empty."""

    message: str
    code: int | str | None = None
    type: str | None = None


class Task(_Frozen):
    """A generation task as last seen on the service.

    *image_urls* is flattened, in order, from every result shape the service has sent
    (``result.images[].url`` as a string or a list, and the defensive fallbacks), so
    ``n > 1`` yields every image. *raw* is the task object as received.
    """

    id: str
    status: TaskStatus
    progress: int | None = None
    image_urls: tuple[str, ...] = ()
    expires_at: datetime | None = None
    created: datetime | None = None
    completed: datetime | None = None
    estimated_time: float | None = None
    actual_time: float | None = None
    cost: float | None = None
    credits_cost: float | None = None
    error: TaskErrorInfo | None = None
    raw: dict[str, Any] = Field(default_factory=dict, repr=False)

    @property
    def is_terminal(self) -> bool:
        """Whether the task has finished (completed, failed or cancelled)."""
        return self.status.is_terminal


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of one job of ``generate_many``: exactly one per input item.

    *index* is the item's position in the input. Exactly one of *task* (completed) and
    *error* is meaningful: *error* is an ``ApimartError`` or a ``ValueError`` subclass,
    never a bare ``ExceptionGroup``; *task* may also be set on error when the task was
    known (a failed or timed-out task). *timings* maps phase (``upload``, ``submit``,
    ``wait``, ``download``) to seconds; *files* lists downloaded paths.
    """

    index: int
    request: Any
    task: Task | None = None
    error: BaseException | None = None
    timings: Mapping[str, float] = field(default_factory=dict[str, float])
    files: tuple[Path, ...] = ()
    idempotency_key: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the job completed."""
        return self.error is None

    @property
    def cost(self) -> float | None:
        """What the task cost in USD, as the service reported it (None: not said).

        0 for a failed task (the service refunds it); None when no task was created
        or the service did not say.
        """
        return self.task.cost if self.task is not None else None

    @property
    def credits_cost(self) -> float | None:
        """The same cost in the service's credits (10 credits = 1 USD), if reported."""
        return self.task.credits_cost if self.task is not None else None


@dataclass(frozen=True, slots=True)
class UploadedEvent:
    """A local reference image is available at *image.url* (possibly from the cache)."""

    image: UploadedImage
    elapsed: float
    job: int | None = None
    cached: bool = False
    kind: Literal["uploaded"] = "uploaded"


@dataclass(frozen=True, slots=True)
class SubmittingEvent:
    """A submit attempt is about to be sent under *idempotency_key* with exactly *body*.

    Emitted before every attempt (retries too), in the task that sends it. A handler
    that raises stops the attempt: it is never sent, and the submit fails with that
    error. That is how a journal records "maybe created" before it can be true.
    """

    idempotency_key: str
    body: bytes
    job: int | None = None
    kind: Literal["submitting"] = "submitting"


@dataclass(frozen=True, slots=True)
class SubmittedEvent:
    """The service accepted the request as task *task_id*."""

    task_id: str
    elapsed: float
    job: int | None = None
    kind: Literal["submitted"] = "submitted"


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """A poll saw *status* and *progress* (percent, if the service reported it)."""

    task_id: str
    status: TaskStatus
    progress: int | None
    elapsed: float
    job: int | None = None
    kind: Literal["progress"] = "progress"


@dataclass(frozen=True, slots=True)
class CompletedEvent:
    """The task completed; *task.image_urls* holds the results."""

    task: Task
    elapsed: float
    job: int | None = None
    kind: Literal["completed"] = "completed"

    @property
    def cost(self) -> float | None:
        """What the task cost in USD, if the service said (``task.cost``)."""
        return self.task.cost


@dataclass(frozen=True, slots=True)
class FailedEvent:
    """The job failed with *error*; *task_id* is set when a task existed."""

    error: BaseException
    task_id: str | None
    elapsed: float
    job: int | None = None
    kind: Literal["failed"] = "failed"


@dataclass(frozen=True, slots=True)
class DownloadedEvent:
    """Every image of *task_id* was written to *paths*."""

    task_id: str
    paths: tuple[Path, ...]
    elapsed: float
    job: int | None = None
    kind: Literal["downloaded"] = "downloaded"


Event = (
    UploadedEvent
    | SubmittingEvent
    | SubmittedEvent
    | ProgressEvent
    | CompletedEvent
    | FailedEvent
    | DownloadedEvent
)
"""Any progress event; switch on ``event.kind``."""

# The package root re-exports these: they show as ``apimart_async.X`` in reprs and
# tracebacks however they were first imported (see ``apimart_async.__init__``).
for _public in (AccountBalance, Outcome, Task, TaskStatus, UploadedImage):
    _public.__module__ = "apimart_async"
del _public
