"""The fake service's memory: tasks, uploads, idempotency keys, balance, webhook schedule,
counters, the request log.

Everything a ``FakeApimart`` knows lives in one ``State`` object owned by that fake, so
two fakes never share anything. Task progress is not driven by background tasks: each
task stores when it was created and how long it lasts, and its status is computed
from the clock whenever someone asks. Refunds of failed tasks are settled the same
way, lazily, whenever the balance is looked at. That keeps the fake free of timers
(nothing to cancel, nothing to leak between tests) and makes it equally correct under
asyncio, trio and uvicorn's own loop. The one thing that must run is the webhook
sender, and only when callbacks are wanted (``_webhooks``).

With a state file (``_persist``), every change a client could observe is appended to
it before the answer that reveals it, and a new ``State`` over the same file starts
where the old one stopped.

What can go wrong: the state is mutated by whichever event loop runs the app. In
server mode that is uvicorn's thread; reading counters from another thread is fine
(single attribute reads), but do not mutate the state from two loops at once. A
damaged state file is a ``ValueError`` at construction.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ._billing import MICRO, Balance, Ledger, to_micro, to_usd
from ._options import ENDPOINTS, Endpoint, Fault, Faults, FaultsSpec, Latency, Variants, Webhooks
from ._persist import (
    StateFile,
    decode_task,
    decode_upload,
    encode_task,
    encode_upload,
)
from ._task import FakeTask, TaskFate
from ._webhooks import Dispatch

if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Iterable, Mapping

    import httpx

    from ._options import ScriptStep
    from ._persist import Record
    from ._webhooks import Rewrite

__all__ = [
    "MODELS",
    "UNKNOWN_MODEL",
    "FakeStats",
    "FakeTask",
    "ModelRules",
    "RecordedRequest",
    "State",
    "StoredUpload",
    "TaskFate",
    "canonical_faults",
]

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

    Money: *balance_reads* counts requests to the balance endpoints, *payment_required*
    every 402 answered (submits the balance cannot pay, reads of an exhausted key when
    those are refused too, scripted 402s). *schema_reads* counts ``GET /v1/model-schema`` requests.

    Webhooks: *webhook_attempts* counts attempts (including ones lost on the way and
    duplicates), *webhooks_delivered* callbacks answered 2xx (once per task),
    *webhook_duplicates* second deliveries, *webhooks_dropped* callbacks never sent
    on purpose, *webhooks_refused* webhook URLs the service does not call, and
    *webhooks_gave_up* callbacks abandoned (a 4xx, or no 2xx after every retry).
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
    balance_reads: int = 0
    payment_required: int = 0
    schema_reads: int = 0
    webhook_attempts: int = 0
    webhooks_delivered: int = 0
    webhook_duplicates: int = 0
    webhooks_dropped: int = 0
    webhooks_refused: int = 0
    webhooks_gave_up: int = 0

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
            "balance_reads": self.balance_reads,
            "payment_required": self.payment_required,
            "schema_reads": self.schema_reads,
            "webhook_attempts": self.webhook_attempts,
            "webhooks_delivered": self.webhooks_delivered,
            "webhook_duplicates": self.webhook_duplicates,
            "webhooks_dropped": self.webhooks_dropped,
            "webhooks_refused": self.webhooks_refused,
            "webhooks_gave_up": self.webhooks_gave_up,
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
        balance: float | None = None,
        prices: Mapping[str, float] | None = None,
        payment_required_on_reads: bool = False,
        webhooks: Webhooks | None = None,
        state_path: str | None = None,
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
        self.payment_required_on_reads = payment_required_on_reads
        self.webhooks = webhooks if webhooks is not None else Webhooks()
        # Where serve() sends callbacks (set by FakeApimart.serve for its lifespan sender).
        self.webhook_transport: httpx.AsyncBaseTransport | None = None
        self.webhook_rewrite: Rewrite | None = None
        # The unix time that corresponds to the clock's current reading.
        self._unix_offset = time.time() - clock()
        self.prices_micro = {
            model: to_micro(usd, f"prices[{model!r}]") for model, usd in (prices or {}).items()
        }
        self._initial_balance = None if balance is None else to_micro(balance, "balance")

        self.tasks: dict[str, FakeTask] = {}
        self.uploads: dict[str, StoredUpload] = {}
        self.idempotency: dict[str, tuple[str, str]] = {}  # key -> (body hash, task id)
        self.scripts: dict[str, deque[Fault | int | None]] = {}
        self.stats = FakeStats()
        self.requests: list[RecordedRequest] = []
        self.ledger = Ledger(self._initial_balance)
        self.dispatch = Dispatch(self)
        self._request_counter = 0
        self._task_costs: dict[str, int] = {}
        self._webhooks_done: set[str] = set()
        self.file = StateFile(state_path) if state_path is not None else None
        if self.file is not None:
            self._open_file(self.file)

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

    # -- money --------------------------------------------------------------------

    def price_micro(self, model: str, rules: ModelRules) -> int:
        """What one image of *model* costs, in micro-USD (configured, else the default)."""
        price = self.prices_micro.get(model)
        return price if price is not None else round(rules.price * MICRO)

    def balance(self) -> Balance:
        """The key's balance now (due refunds applied)."""
        self.ledger.settle(self.clock())
        return self.ledger.balance()

    def can_afford(self, amount: int) -> bool:
        """Whether a submit costing *amount* micro-USD may be accepted now."""
        self.ledger.settle(self.clock())
        return self.ledger.can_afford(amount)

    def reads_refused(self) -> bool:
        """Whether reads answer 402 now (opt-in, for an exhausted limited key)."""
        return self.payment_required_on_reads and self.balance().exhausted

    def set_balance(self, remaining: float | None) -> None:
        """Set what the key has left (``None``: unlimited); what was used stays."""
        micro = None if remaining is None else to_micro(remaining, "balance")
        self.ledger.settle(self.clock())
        self.ledger.set(micro)
        self._journal(self._balance_record())

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
        register_key: bool,
        answer: Callable[[FakeTask], dict[str, Any]],
        webhook: str | None = None,
        instant: bool = False,
    ) -> FakeTask:
        """Create, charge and record a task; *answer* builds its submit answer.

        The caller has checked ``can_afford``. *register_key* makes the task the
        answer to replays of *idempotency_key*. *instant* finishes the task at once
        (the synchronous-result answer). The task is written to the state file (if
        any) before this returns, so before any client can learn its id.
        """
        now = self.clock()
        unix = self.unix(now)
        rng = self.rng
        task_id = "task_" + ulid(rng, unix)
        while task_id in self.tasks:  # 80 random bits: never in practice, cheap to rule out
            task_id = "task_" + ulid(rng, unix)
        duration = 0.0 if instant else self.latency.sample(rng)
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
        cost = self.price_micro(model, rules) * n
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
            cost=to_usd(cost),
            webhook=webhook,
        )
        self._add_task(task, cost, registered=register_key)
        task.submit_response = answer(task)
        stats = self.stats
        stats.tasks_created += 1
        stats.tasks_by_key.setdefault(idempotency_key, []).append(task_id)
        if fate_fault is not None:
            self.count_fault(fate_fault.value)
        self._journal(
            encode_task(task, created_wall=self.unix(now), cost_micro=cost, registered=register_key)
        )
        self.dispatch.schedule(task)
        return task

    def _add_task(self, task: FakeTask, cost: int, *, registered: bool) -> None:
        """Index, charge (and, for a failing task, schedule the refund of) *task*."""
        self.tasks[task.id] = task
        self._task_costs[task.id] = cost
        self.ledger.charge(cost)
        if task.fate == "fail":
            self.ledger.refund_at(task.completes_at, cost)
        if registered and task.idempotency_key is not None:
            self.idempotency[task.idempotency_key] = (task.body_hash, task.id)

    def result_urls(self, task: FakeTask) -> list[str]:
        base = f"{self.files_base_url}/f/image/{task.id}_"
        return [f"{base}{i}.png" for i in range(task.n)]

    def add_upload(self, key: str, upload: StoredUpload) -> None:
        """Keep an upload so GETs of its URL return it (and write it to the file)."""
        self.uploads[key] = upload
        self._journal(encode_upload(key, upload.data, upload.content_type))

    def webhook_finished(self, task: FakeTask) -> None:
        """*task*'s callback is settled for good (delivered, abandoned or never sent)."""
        self._journal({"t": "webhook_done", "id": task.id})

    # -- lifecycle ------------------------------------------------------------------

    def reset_stats(self) -> None:
        in_flight = self.stats.in_flight
        self.stats = FakeStats(in_flight=in_flight, max_in_flight=in_flight)
        self.requests = []
        self.dispatch.deliveries.clear()
        for task in self.tasks.values():
            task.polls = 0

    def reset(self) -> None:
        self.reset_stats()
        self.tasks.clear()
        self.uploads.clear()
        self.idempotency.clear()
        self.scripts.clear()
        self._task_costs.clear()
        self._webhooks_done.clear()
        self.dispatch.clear()
        self.ledger = Ledger(self._initial_balance)
        if self.file is not None:
            self.file.rewrite([self._balance_record()])

    # -- the state file -------------------------------------------------------------

    def records(self) -> list[Record]:
        """Everything a new fake needs to continue from here, as state-file records."""
        out: list[Record] = []
        done = set(self._webhooks_done)
        for task in self.tasks.values():
            key = task.idempotency_key
            registered = key is not None and self.idempotency.get(key, ("", ""))[1] == task.id
            out.append(
                encode_task(
                    task,
                    created_wall=self.unix(task.created_at),
                    cost_micro=self._task_costs[task.id],
                    registered=registered,
                )
            )
        out.extend(encode_upload(k, u.data, u.content_type) for k, u in self.uploads.items())
        out.extend({"t": "webhook_done", "id": task_id} for task_id in sorted(done))
        out.append(self._balance_record())
        return out

    def save(self, path: str) -> None:
        """Write a compacted state file at *path*, atomically."""
        StateFile(path).rewrite(self.records())

    def _balance_record(self) -> Record:
        self.ledger.settle(self.clock())
        return {
            "t": "balance",
            "at": self.unix(),
            "remaining": self.ledger.remaining,
            "used": self.ledger.used,
        }

    def _journal(self, record: Record) -> None:
        if record.get("t") == "webhook_done":
            self._webhooks_done.add(str(record["id"]))
        if self.file is not None:
            self.file.append(record)

    def _open_file(self, file: StateFile) -> None:
        """Continue from *file* if it holds a state, then rewrite it compacted."""
        records = file.read()
        if records:
            try:
                self._restore(records)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{file.path}: damaged state record: {exc!r}") from None
        file.rewrite(self.records())

    def _restore(self, records: list[Record]) -> None:
        offset = self._unix_offset
        done: set[str] = set()
        for record in records:
            kind = record["t"]
            if kind == "task":
                task, cost, registered = decode_task(record, clock_of_wall=offset)
                self._add_task(task, cost, registered=registered)
            elif kind == "upload":
                key, data, content_type = decode_upload(record)
                self.uploads[key] = StoredUpload(data, content_type)
            elif kind == "balance":
                self.ledger.settle(float(record["at"]) - offset)
                remaining = record["remaining"]
                self.ledger.set(None if remaining is None else int(remaining), int(record["used"]))
            elif kind == "webhook_done":
                done.add(str(record["id"]))
            else:
                raise ValueError(f"unknown record type {kind!r}")
        self._webhooks_done = done
        # Callbacks not yet settled are scheduled again: a new sender delivers them.
        for task in self.tasks.values():
            if task.webhook is not None and task.id not in done:
                self.dispatch.schedule(task)

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
        balance = self.balance()
        out: dict[str, Any] = {
            "now": now,
            "stats": self.stats.as_dict(),
            "balance": {
                "remaining": balance.remaining,
                "used": balance.used,
                "unlimited": balance.unlimited,
            },
            "webhooks_pending": self.dispatch.pending,
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
