"""The fake service's memory: tasks, uploads, idempotency keys, counters, the request log.

Everything a ``FakeApimart`` knows lives in one ``State`` object owned by that fake, so
two fakes never share anything. Task progress is not driven by background tasks: each
task stores when it was created and how long it lasts, and its status is computed
from the clock whenever someone asks. That keeps the fake free of timers (nothing to
cancel, nothing to leak between tests) and makes it equally correct under asyncio,
trio and uvicorn's own loop.

What can go wrong: the state is mutated by whichever event loop runs the app. In
server mode that is uvicorn's thread; reading counters from another thread is fine
(single attribute reads), but do not mutate the state from two loops at once.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._options import ENDPOINTS, Endpoint, Fault, Faults, FaultsSpec, Latency, Variants

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Iterable, Mapping

    from ._options import ScriptStep

__all__ = [
    "MODELS",
    "FakeStats",
    "FakeTask",
    "ModelRules",
    "RecordedRequest",
    "State",
    "TaskFate",
]

TaskFate = Literal["complete", "fail", "stuck", "unknown_status"]
Family = Literal["flux", "imagen", "gemini", "other"]


@dataclass(frozen=True, slots=True)
class ModelRules:
    """What the service checks for one model id, and what an image costs (USD)."""

    family: Family
    max_images: int
    max_n: int
    price: float


_GEMINI_PRICES = {
    "gemini-3-pro-image-preview": 0.15,
    "gemini-2.5-flash-image-preview": 0.0125,
    "gemini-3.1-flash-image-preview": 0.015,
}
MODELS: dict[str, ModelRules] = {
    "flux-kontext-pro": ModelRules("flux", 1, 4, 0.032),
    "flux-kontext-max": ModelRules("flux", 1, 4, 0.064),
    "imagen-4.0-apimart": ModelRules("imagen", 0, 1, 0.04),
    **{m: ModelRules("gemini", 14, 4, p) for m, p in _GEMINI_PRICES.items()},
    **{f"{m}-official": ModelRules("gemini", 14, 4, p) for m, p in _GEMINI_PRICES.items()},
}
"""The model ids the fake accepts (apimart-api.md §4) and their limits."""
UNKNOWN_MODEL = ModelRules("other", 16, 10, 0.05)

# Crockford's base32, as ULIDs use it.
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid(rng: random.Random, unix: float) -> str:
    """A 26-character ULID: 48 bits of milliseconds, 80 random bits from *rng*."""
    value = (int(unix * 1000) & 0xFFFF_FFFF_FFFF) << 80 | rng.getrandbits(80)
    chars: list[str] = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass(slots=True, eq=False)
class FakeTask:
    """One generation task as the fake knows it (read it; do not mutate it).

    Times named ``*_at`` are on the fake's clock (``time.monotonic`` unless a clock was
    injected), in real seconds, so benchmarks can compare them with their own
    monotonic readings: *completes_at* is when the task finishes (for stuck tasks:
    when it would have), *detected_at* when a poll first reported it finished. The
    detection lag of a client is ``detected_at - completes_at``. *duration* is in
    service seconds (what ``actual_time`` reports), *real_duration* in real seconds.
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

    @property
    def completes_at(self) -> float:
        """Clock time at which the task finishes (or would, if it were not stuck)."""
        return self.created_at + self.real_duration

    @property
    def completed_unix(self) -> int:
        """The ``completed`` field: creation plus the duration, in service seconds."""
        return self.created_unix + math.ceil(self.duration)

    def phase(self, now: float, variants: Variants, unknown_status: str) -> tuple[str, int]:
        """``(status, progress)`` at clock time *now*.

        Pending for the first 10% of the duration (``submitted`` in its first 3%), then
        processing with progress rising linearly (1..99), then the terminal state.
        """
        elapsed = now - self.created_at
        duration = self.real_duration
        if elapsed >= duration and self.fate in ("complete", "fail"):
            return ("completed", 100) if self.fate == "complete" else ("failed", 100)
        if elapsed < 0.03 * duration:
            return "submitted", 0
        if elapsed < 0.1 * duration:
            return "pending", 0
        progress = min(99, max(1, int(100 * elapsed / duration))) if duration > 0 else 99
        if self.fate == "unknown_status":
            return unknown_status, progress
        return variants.processing_status, progress


@dataclass(slots=True)
class RecordedRequest:
    """One request as the fake saw it; *status*/*fault*/*finished* are filled in when
    it was answered (*status* stays ``None`` for dropped connections).

    *headers* are lower-cased, with the ``Authorization`` value replaced by
    ``"Bearer ***"``; *authorized* says whether an Authorization header was present at
    all (a client that sends it to the file host is leaking its key). *json_body* is
    the parsed JSON of API requests; *filename* and *body_size* describe uploads.
    """

    method: str
    host: str
    path: str
    query: str
    headers: dict[str, str]
    authorized: bool
    endpoint: str
    body_size: int
    started: float
    json_body: dict[str, Any] | None = None
    filename: str | None = None
    idempotency_key: str | None = None
    task_id: str | None = None
    status: int | None = None
    fault: str | None = None
    finished: float | None = None

    @property
    def json_keys(self) -> tuple[str, ...]:
        """The sorted top-level keys of the JSON body (empty if none)."""
        return tuple(sorted(self.json_body)) if self.json_body else ()


@dataclass(slots=True)
class FakeStats:
    """Counters kept for every request, whether or not requests are recorded.

    *uploads*, *submits*, *polls* and *downloads* count requests that reached each
    endpoint (including ones answered with a fault or an error); *tasks_created*
    counts tasks actually created; *replays* idempotent replays and *conflicts* 409s.
    *polls_by_task* counts polls answered with a task's state; *tasks_by_key* maps
    each ``Idempotency-Key`` (``None``: no key) to the tasks created under it.
    *file_requests_with_auth* counts file GETs that carried an Authorization header.
    """

    requests_total: int = 0
    uploads: int = 0
    submits: int = 0
    tasks_created: int = 0
    polls: int = 0
    downloads: int = 0
    replays: int = 0
    conflicts: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    file_requests_with_auth: int = 0
    status_counts: dict[int, int] = field(default_factory=dict[int, int])
    faults: dict[str, int] = field(default_factory=dict[str, int])
    polls_by_task: dict[str, int] = field(default_factory=dict[str, int])
    tasks_by_key: dict[str | None, list[str]] = field(default_factory=dict[str | None, list[str]])

    def duplicate_keys(self) -> list[str]:
        """Idempotency keys under which more than one task was created (paid twice)."""
        return sorted(k for k, ids in self.tasks_by_key.items() if k is not None and len(ids) > 1)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (dict keys become strings)."""
        return {
            "requests_total": self.requests_total,
            "uploads": self.uploads,
            "submits": self.submits,
            "tasks_created": self.tasks_created,
            "polls": self.polls,
            "downloads": self.downloads,
            "replays": self.replays,
            "conflicts": self.conflicts,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "file_requests_with_auth": self.file_requests_with_auth,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "faults": dict(sorted(self.faults.items())),
            "polls_by_task": dict(self.polls_by_task),
            "tasks_by_key": {("" if k is None else k): v for k, v in self.tasks_by_key.items()},
            "duplicate_keys": self.duplicate_keys(),
        }


@dataclass(slots=True)
class StoredUpload:
    """An uploaded file kept so that GETs of its URL return it."""

    data: bytes
    content_type: str


def _normalise_faults(spec: FaultsSpec) -> dict[str, Faults]:
    if isinstance(spec, Faults):
        return dict.fromkeys(ENDPOINTS, spec)
    unknown = set(spec) - set(ENDPOINTS)
    if unknown:
        raise ValueError(f"unknown endpoints in faults: {sorted(unknown)}; use {ENDPOINTS}")
    for value in spec.values():
        if not isinstance(value, Faults):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"faults values must be Faults, got {type(value).__name__}")
    return {endpoint: spec.get(endpoint, Faults()) for endpoint in ENDPOINTS}


def _normalise_step(step: ScriptStep) -> Fault | int | None:
    if step is None or isinstance(step, Fault):
        return step
    if isinstance(step, bool):
        raise TypeError("a script step is a Fault, its name, an HTTP status or None")
    if isinstance(step, int):
        if not 400 <= step <= 599:
            raise ValueError(f"a scripted status must be an HTTP error (400-599), got {step}")
        return step
    try:
        return Fault(step)
    except ValueError:
        names = ", ".join(f.value for f in Fault)
        raise ValueError(f"unknown fault {step!r}; use one of: {names}") from None


class State:
    """Configuration and mutable state of one fake (see the module docstring)."""

    def __init__(
        self,
        *,
        api_key: str,
        latency: Latency,
        faults: FaultsSpec,
        variants: Variants,
        honour_idempotency: bool,
        accept_unknown_models: bool,
        record_requests: bool,
        store_uploads: bool,
        seed: int | None,
        clock: Callable[[], float],
        files_base_url: str,
        rng: random.Random,
    ) -> None:
        self.api_key = api_key
        self.latency = latency
        self.faults_spec: FaultsSpec = faults
        self.faults_by_endpoint = _normalise_faults(faults)
        self.variants = variants
        self.honour_idempotency = honour_idempotency
        self.accept_unknown_models = accept_unknown_models
        self.record_requests = record_requests
        self.store_uploads = store_uploads
        self.seed = seed
        self.clock = clock
        self.files_base_url = files_base_url.rstrip("/")
        self.rng = rng
        # The unix time that corresponds to the clock's current reading.
        self._unix_offset = time.time() - clock()

        self.tasks: dict[str, FakeTask] = {}
        self.uploads: dict[str, StoredUpload] = {}
        self.idempotency: dict[str, tuple[str, str]] = {}  # key -> (body hash, task id)
        self.scripts: dict[str, deque[Fault | int | None]] = {}
        self.stats = FakeStats()
        self.requests: list[RecordedRequest] = []
        self._request_counter = 0

    # -- time and ids ---------------------------------------------------------------

    def unix(self, at: float | None = None) -> float:
        """Unix time of clock reading *at* (default: now)."""
        return (self.clock() if at is None else at) + self._unix_offset

    def request_id(self) -> str:
        """A fresh request id for an error message, like the service's."""
        self._request_counter += 1
        return f"req_{self._request_counter:08d}{self.rng.getrandbits(48):012x}"

    # -- faults ---------------------------------------------------------------------

    @property
    def task_faults(self) -> Faults:
        """The Faults whose task fate probabilities apply (the submit endpoint's)."""
        return self.faults_by_endpoint["submit"]

    def set_faults(self, spec: FaultsSpec) -> None:
        self.faults_by_endpoint = _normalise_faults(spec)
        self.faults_spec = spec

    def add_script(self, endpoint: str, steps: Iterable[ScriptStep]) -> None:
        if endpoint not in (*ENDPOINTS, "task"):
            raise ValueError(f"unknown endpoint {endpoint!r}; use {(*ENDPOINTS, 'task')}")
        normalised = [_normalise_step(s) for s in steps]
        for step in normalised:
            is_fate = isinstance(step, Fault) and step.is_task_fate
            if endpoint == "task" and step is not None and not is_fate:
                raise ValueError(f"the 'task' script takes task fates or None, not {step!r}")
            if endpoint != "task" and is_fate:
                raise ValueError(f"{step!r} is a task fate; script it on 'task'")
        self.scripts.setdefault(endpoint, deque()).extend(normalised)

    def next_request_fault(self, endpoint: Endpoint) -> Fault | int | None:
        """The scripted step for this request, else a probabilistic draw, else None."""
        script = self.scripts.get(endpoint)
        if script:
            return script.popleft()
        faults = self.faults_by_endpoint[endpoint]
        if faults.has_request_faults and faults.applies_to(endpoint):
            return faults.draw_request_fault(endpoint, self.rng)
        return None

    def next_task_fate(self) -> Fault | None:
        script = self.scripts.get("task")
        if script:
            step = script.popleft()
            return step if isinstance(step, Fault) else None
        faults = self.task_faults
        return faults.draw_task_fate(self.rng) if faults.has_task_faults else None

    def count_fault(self, name: str) -> None:
        faults = self.stats.faults
        faults[name] = faults.get(name, 0) + 1

    # -- tasks ----------------------------------------------------------------------

    def create_task(
        self,
        *,
        model: str,
        prompt: str,
        n: int,
        image_urls: tuple[str, ...],
        rules: ModelRules,
        idempotency_key: str | None,
        body_hash: str,
    ) -> FakeTask:
        now = self.clock()
        unix = self.unix(now)
        rng = self.rng
        task_id = "task_" + ulid(rng, unix)
        while task_id in self.tasks:  # 80 random bits: never in practice, cheap to rule out
            task_id = "task_" + ulid(rng, unix)
        duration = self.latency.sample(rng)
        # A noisy but informative estimate, as the service's is: within ~±35% usually.
        estimate = max(1, math.ceil(duration * rng.lognormvariate(0.0, 0.3)))
        fate_fault = self.next_task_fate()
        faults = self.task_faults
        fate: TaskFate = "complete"
        reason: str | None = None
        if fate_fault is Fault.TASK_FAILED:
            fate, reason = "fail", faults.failure_reason
        elif fate_fault is Fault.TASK_STUCK:
            fate = "stuck"
        elif fate_fault is Fault.TASK_UNKNOWN_STATUS:
            fate = "unknown_status"
        task = FakeTask(
            id=task_id,
            model=model,
            prompt=prompt,
            n=n,
            image_urls=image_urls,
            idempotency_key=idempotency_key,
            body_hash=body_hash,
            created_at=now,
            duration=duration,
            real_duration=duration * self.latency.time_scale,
            created_unix=int(unix),
            estimated_time=estimate,
            fate=fate,
            reason=reason,
            cost=round(rules.price * n, 6),
        )
        self.tasks[task_id] = task
        stats = self.stats
        stats.tasks_created += 1
        stats.tasks_by_key.setdefault(idempotency_key, []).append(task_id)
        if fate_fault is not None:
            self.count_fault(fate_fault.value)
        return task

    def result_urls(self, task: FakeTask) -> list[str]:
        base = f"{self.files_base_url}/f/image/{task.id}_"
        return [f"{base}{i}.png" for i in range(task.n)]

    def reset_stats(self) -> None:
        in_flight = self.stats.in_flight
        self.stats = FakeStats(in_flight=in_flight, max_in_flight=in_flight)
        self.requests = []
        for task in self.tasks.values():
            task.polls = 0

    def reset(self) -> None:
        self.reset_stats()
        self.tasks.clear()
        self.uploads.clear()
        self.idempotency.clear()
        self.scripts.clear()

    # -- reporting ------------------------------------------------------------------

    def snapshot(self, *, include_tasks: bool = True) -> dict[str, Any]:
        """The JSON of ``GET /_fake/stats`` (see ``FakeApimart.snapshot``)."""
        now = self.clock()
        variants = self.variants
        unknown = self.task_faults.unknown_status
        by_status: dict[str, int] = {}
        lags: list[float] = []
        items: list[dict[str, Any]] = []
        for task in self.tasks.values():
            status = task.phase(now, variants, unknown)[0]
            by_status[status] = by_status.get(status, 0) + 1
            if task.detected_at is not None:
                lags.append(task.detected_at - task.completes_at)
            if include_tasks:
                items.append(
                    {
                        "id": task.id,
                        "model": task.model,
                        "n": task.n,
                        "status": status,
                        "fate": task.fate,
                        "duration": task.duration,
                        "real_duration": task.real_duration,
                        "created_at": task.created_at,
                        "completes_at": task.completes_at,
                        "detected_at": task.detected_at,
                        "polls": task.polls,
                    }
                )
        out: dict[str, Any] = {
            "now": now,
            "stats": self.stats.as_dict(),
            "tasks_summary": {
                "count": len(self.tasks),
                "by_status": dict(sorted(by_status.items())),
                "detection_lag": _summary(lags),
            },
        }
        if include_tasks:
            out["tasks"] = items
        return out


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "max": None}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": ordered[-1],
    }


def canonical_faults(spec: Mapping[str, Any]) -> FaultsSpec:
    """Faults from JSON: either Faults fields, or a mapping of endpoint to fields."""
    if spec and all(k in ENDPOINTS for k in spec):
        return {k: Faults.from_dict(v) for k, v in spec.items()}  # type: ignore[misc]
    return Faults.from_dict(spec)
