"""How a ``FakeApimart`` behaves: latency profiles, faults, response variants, webhook
delivery, clocks.

These are small frozen value objects so one configuration can be shared by many fakes
(or rebuilt from JSON for the server CLI) without any of them mutating it. They hold
no state and draw no random numbers themselves: every draw goes through the owning
fake's seeded ``random.Random``, which is what makes a seeded run repeatable.

What can go wrong: probabilities outside ``[0, 1]`` or request-level probabilities that
add up to more than 1 are rejected at construction, because silently clipping them
would make a chaos run inject fewer faults than its author believes.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import random

__all__ = [
    "ENDPOINTS",
    "Endpoint",
    "Fault",
    "Faults",
    "FaultsSpec",
    "Latency",
    "ManualClock",
    "ScriptStep",
    "Variants",
    "Webhooks",
]

Endpoint = Literal["upload", "submit", "poll", "download", "balance"]
"""The service endpoints a fault can be scoped to (``balance``: both balance reads)."""
ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)


class Fault(str, enum.Enum):
    """Names of the faults the fake can inject, usable in ``FakeApimart.script``.

    Request-level faults (one request on one endpoint):

    - ``CONNECT_ERROR``: the request never reaches the service (nothing recorded,
      nothing done); in process the transport raises ``httpx.ConnectError``.
    - ``RESET``: the service saw the request but did not act on it and dropped the
      connection before any response (``httpx.ReadError`` in process).
    - ``RATE_LIMIT``: 429 with a ``Retry-After`` header; nothing done.
    - ``SERVER_ERROR``: 500, 502 or 503 in the error envelope; nothing done.
    - ``CHANNEL_FAILED``: 500 or 400 with code ``get_channel_failed``; nothing done.
    - ``ERROR_IN_200``: HTTP 200 whose body is an ``error`` envelope; nothing done.
    - ``STALL``: the request is processed, then the answer is held back for
      ``Faults.stall_seconds`` so the client's read timeout trips.
    - ``DROP_AFTER_SUBMIT``: the request is processed (a submit creates its task), then
      the connection drops mid-response: the ambiguous case for paid submits.
    - ``MALFORMED_JSON``: the request is processed, but the 200 body is truncated JSON
      or an HTML page (as a misbehaving gateway would send).

    Task fates (scripted on the pseudo-endpoint ``"task"``, one per created task):

    - ``TASK_FAILED``: the task ends ``failed`` with ``Faults.failure_reason``.
    - ``TASK_STUCK``: the task stays ``processing`` forever.
    - ``TASK_UNKNOWN_STATUS``: the task reports ``Faults.unknown_status`` forever.
    """

    CONNECT_ERROR = "connect_error"
    RESET = "reset"
    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    CHANNEL_FAILED = "channel_failed"
    ERROR_IN_200 = "error_in_200"
    STALL = "stall"
    DROP_AFTER_SUBMIT = "drop_after_submit"
    MALFORMED_JSON = "malformed_json"
    BALANCE_FAILED = "balance_failed"
    TASK_FAILED = "task_failed"
    TASK_STUCK = "task_stuck"
    TASK_UNKNOWN_STATUS = "task_unknown_status"

    @property
    def is_task_fate(self) -> bool:
        """Whether this fault applies to a created task rather than to a request."""
        return self in _TASK_FATES


_TASK_FATES = frozenset({Fault.TASK_FAILED, Fault.TASK_STUCK, Fault.TASK_UNKNOWN_STATUS})

ScriptStep = Fault | str | int | None
"""One scripted answer: a ``Fault`` (or its name), an HTTP error status to answer with
in the service's error envelope (e.g. ``402``, ``503``), or ``None`` for "no fault"."""

# Request-level faults in the order the cumulative probability walk checks them.
_REQUEST_FAULTS: tuple[Fault, ...] = (
    Fault.CONNECT_ERROR,
    Fault.RESET,
    Fault.RATE_LIMIT,
    Fault.SERVER_ERROR,
    Fault.CHANNEL_FAILED,
    Fault.ERROR_IN_200,
    Fault.STALL,
    Fault.DROP_AFTER_SUBMIT,
    Fault.MALFORMED_JSON,
    Fault.BALANCE_FAILED,
)
# Request-level faults that exist on one endpoint only.
_ENDPOINT_ONLY: dict[Fault, Endpoint] = {
    Fault.DROP_AFTER_SUBMIT: "submit",
    Fault.BALANCE_FAILED: "balance",
}


@dataclass(frozen=True, slots=True)
class Latency:
    """How long tasks take, and how long each request takes to be answered.

    A task's duration is drawn in *service seconds* (what ``estimated_time`` and
    ``actual_time`` report) and lasts ``duration * time_scale`` seconds of real time,
    so ``time_scale=0.001`` runs a "20 s" task in 20 ms. *request_latency* is a
    ``(low, high)`` range of real seconds slept (uniformly drawn) before each request
    is handled; ``(0, 0)`` means none, which is what keeps the default fake fast.

    Use the constructors: ``fast()`` (default; tasks of 2-5 ms), ``zero()`` (the first
    poll already sees ``completed``), ``fixed(seconds)`` and ``realistic()`` (lognormal
    around a 15 s median with a tail to 120 s).
    """

    name: str = "fast"
    low: float = 2.0
    high: float = 5.0
    median: float | None = None
    sigma: float = 0.0
    time_scale: float = 0.001
    request_latency: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if not (0.0 <= self.low <= self.high) or not math.isfinite(self.high):
            raise ValueError(f"Latency needs 0 <= low <= high < inf, got {self.low}, {self.high}")
        if self.median is not None and not (self.median > 0 and self.sigma >= 0):
            raise ValueError("Latency.median must be > 0 and sigma >= 0")
        if not (self.time_scale >= 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"Latency.time_scale must be >= 0, got {self.time_scale}")
        lo, hi = self.request_latency
        if not 0.0 <= lo <= hi:
            raise ValueError(f"request_latency needs 0 <= low <= high, got {lo}, {hi}")

    @classmethod
    def fast(cls, *, request_latency: tuple[float, float] = (0.0, 0.0)) -> Latency:
        """Tasks of 2-5 service seconds scaled to 2-5 ms: pipelines finish in milliseconds."""
        return cls("fast", 2.0, 5.0, None, 0.0, 0.001, request_latency)

    @classmethod
    def zero(cls) -> Latency:
        """No latency anywhere: the first poll after a submit sees ``completed``."""
        return cls("zero", 0.0, 0.0, None, 0.0, 1.0, (0.0, 0.0))

    @classmethod
    def fixed(
        cls,
        seconds: float,
        *,
        time_scale: float = 1.0,
        request_latency: tuple[float, float] = (0.0, 0.0),
    ) -> Latency:
        """Every task takes exactly *seconds* service seconds (times *time_scale* real)."""
        return cls("fixed", seconds, seconds, None, 0.0, time_scale, request_latency)

    @classmethod
    def realistic(
        cls,
        *,
        median: float = 15.0,
        sigma: float = 0.6,
        minimum: float = 2.0,
        maximum: float = 120.0,
        time_scale: float = 0.001,
        request_latency: tuple[float, float] = (0.0, 0.0),
    ) -> Latency:
        """Lognormal durations around *median* clipped to ``[minimum, maximum]``.

        The defaults mirror observed completions (10-20 s typical, 4K renders past
        120 s are clipped) and run 1,000 times faster than real time.
        """
        return cls("realistic", minimum, maximum, median, sigma, time_scale, request_latency)

    @classmethod
    def parse(cls, spec: str, *, time_scale: float | None = None) -> Latency:
        """Build a profile from the CLI's spelling: ``fast``, ``zero``, ``fixed:20``,
        ``realistic`` or ``realistic:MEDIAN``; *time_scale* overrides the profile's."""
        name, _, arg = spec.partition(":")
        if name == "fast" and not arg:
            latency = cls.fast()
        elif name == "zero" and not arg:
            latency = cls.zero()
        elif name == "fixed" and arg:
            latency = cls.fixed(float(arg))
        elif name == "realistic":
            latency = cls.realistic(median=float(arg)) if arg else cls.realistic()
        else:
            raise ValueError(
                f"unknown latency {spec!r}; use fast, zero, fixed:SECONDS or realistic[:MEDIAN]"
            )
        return latency if time_scale is None else latency.scaled(time_scale)

    def scaled(self, time_scale: float) -> Latency:
        """This profile with another *time_scale*."""
        return dataclasses.replace(self, time_scale=time_scale)

    def with_request_latency(self, low: float, high: float | None = None) -> Latency:
        """This profile plus a request latency uniform in ``[low, high]`` real seconds."""
        return dataclasses.replace(self, request_latency=(low, low if high is None else high))

    def sample(self, rng: random.Random) -> float:
        """Draw one task duration in service seconds."""
        if self.median is not None:
            value = rng.lognormvariate(math.log(self.median), self.sigma)
            return min(self.high, max(self.low, value))
        if self.low == self.high:
            return self.low
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True, slots=True)
class Faults:
    """Probabilities of each fault, drawn per request (or per task) from the fake's RNG.

    Request-level probabilities are mutually exclusive (at most one fault per
    request) and must add up to at most 1. *only* restricts them to some endpoints,
    e.g. ``Faults(server_error=0.1, only=("poll",))``; ``drop_after_submit`` applies to
    submits only, ``balance_failed`` to balance reads only. For different rates per
    endpoint pass a mapping to the fake instead:
    ``FakeApimart(faults={"submit": Faults(rate_limit=0.2), "poll": Faults(stall=0.01)})``;
    task fates then come from the ``"submit"`` entry.

    Task-level probabilities (*task_failure*, *task_stuck*, *task_unknown_status*) are
    drawn once per created task and must also add up to at most 1.

    Knobs: *retry_after* is the ``Retry-After`` value in seconds (sent as whole
    delta-seconds, as HTTP requires: a fraction is rounded up, so ``0.01`` sends ``1``;
    ``None`` sends no header); *stall_seconds* how long a stalled answer is held back;
    *server_error_statuses* and *channel_failed_statuses* the statuses drawn from.
    """

    rate_limit: float = 0.0
    server_error: float = 0.0
    channel_failed: float = 0.0
    reset: float = 0.0
    connect_error: float = 0.0
    drop_after_submit: float = 0.0
    stall: float = 0.0
    malformed_json: float = 0.0
    error_in_200: float = 0.0
    balance_failed: float = 0.0
    task_failure: float = 0.0
    task_stuck: float = 0.0
    task_unknown_status: float = 0.0
    only: tuple[Endpoint, ...] | None = None
    retry_after: float | None = 1.0
    stall_seconds: float = 30.0
    server_error_statuses: tuple[int, ...] = (500, 502, 503)
    channel_failed_statuses: tuple[int, ...] = (500, 400)
    failure_reason: str = "upstream content policy violation"
    unknown_status: str = "queued_upstream"

    def __post_init__(self) -> None:
        for fault in (*_REQUEST_FAULTS, *_TASK_FATE_FIELDS):
            p = self.probability(fault)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Faults.{_field_name(fault)} must be in [0, 1], got {p}")
        if sum(self.probability(f) for f in _REQUEST_FAULTS) > 1.0 + 1e-9:
            raise ValueError("request-level fault probabilities add up to more than 1")
        if sum(self.probability(f) for f in _TASK_FATE_FIELDS) > 1.0 + 1e-9:
            raise ValueError("task fate probabilities add up to more than 1")
        for endpoint in self.only or ():
            if endpoint not in ENDPOINTS:
                raise ValueError(f"unknown endpoint {endpoint!r} in Faults.only; use {ENDPOINTS}")
        if not self.server_error_statuses or not self.channel_failed_statuses:
            raise ValueError("status tuples must not be empty")
        if self.retry_after is not None and not (
            self.retry_after >= 0 and math.isfinite(self.retry_after)
        ):
            raise ValueError(f"Faults.retry_after must be >= 0 seconds, got {self.retry_after}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Faults:
        """Build from JSON-like data (lists become tuples); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Faults fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v  # pyright: ignore[reportUnknownArgumentType]
            for k, v in data.items()
        }
        return cls(**kwargs)

    def probability(self, fault: Fault) -> float:
        """The configured probability of *fault*."""
        value: float = getattr(self, _field_name(fault))
        return value

    def applies_to(self, endpoint: Endpoint) -> bool:
        """Whether request-level faults are drawn for *endpoint*."""
        return self.only is None or endpoint in self.only

    @property
    def has_request_faults(self) -> bool:
        """Whether any request-level probability is non-zero (skips the RNG draw if not)."""
        return any(self.probability(f) > 0 for f in _REQUEST_FAULTS)

    @property
    def has_task_faults(self) -> bool:
        """Whether any task fate probability is non-zero."""
        return any(self.probability(f) > 0 for f in _TASK_FATE_FIELDS)

    def draw_request_fault(self, endpoint: Endpoint, rng: random.Random) -> Fault | None:
        """One draw: the fault for this request on *endpoint*, or ``None``."""
        r = rng.random()
        acc = 0.0
        for fault in _REQUEST_FAULTS:
            only = _ENDPOINT_ONLY.get(fault)
            if only is not None and only != endpoint:
                continue
            acc += self.probability(fault)
            if r < acc:
                return fault
        return None

    def draw_task_fate(self, rng: random.Random) -> Fault | None:
        """One draw: the fate of a new task (``None`` completes normally)."""
        r = rng.random()
        acc = 0.0
        for fault in _TASK_FATE_FIELDS:
            acc += self.probability(fault)
            if r < acc:
                return fault
        return None


_TASK_FATE_FIELDS: tuple[Fault, ...] = (
    Fault.TASK_FAILED,
    Fault.TASK_STUCK,
    Fault.TASK_UNKNOWN_STATUS,
)


def _field_name(fault: Fault) -> str:
    # The Faults field for TASK_FAILED is the noun "task_failure"; the others match.
    return "task_failure" if fault is Fault.TASK_FAILED else fault.value


FaultsSpec = Faults | Mapping[Endpoint, Faults]
"""What ``FakeApimart(faults=...)`` accepts: one ``Faults`` or one per endpoint."""

SubmitShape = Literal["list", "object", "top_level", "versioned", "auto", "result"]
UrlShape = Literal["list", "string", "entries"]
ErrorCodeShape = Literal["int", "string", "plain"]
UnlimitedShape = Literal["both", "minus_one", "flag"]


@dataclass(frozen=True, slots=True)
class Variants:
    """Which documented response shape the fake sends (apimart-api.md §3.3, §6.1, §7, §10).

    - *submit_shape*: ``"auto"`` (the default: shape D when the request pins
      ``X-APIMart-Response-Version``, as the official skill client does, shape A
      otherwise), or one fixed shape whatever the headers: ``"list"`` (shape A,
      ``data[0].task_id``), ``"object"`` (shape B, ``data.id`` with ``task_info``),
      ``"top_level"`` (shape C, top-level ``id``), ``"versioned"`` (shape D, ``data.id``
      plus an envelope ``request_id``), or ``"result"`` (shape D's synchronous answer:
      ``"object": "generation.result"``, the task already finished, its result and
      cost in ``data``, and queryable afterwards like any task; a task scripted to
      stay unfinished is answered as ``"generation.task"`` instead).
    - *url_shape*: ``"list"`` (one ``images[]`` entry whose ``url`` lists all n URLs),
      ``"string"`` (n entries, ``url`` a string) or ``"entries"`` (n entries, ``url`` a
      one-element list).
    - *error_code*: ``"int"`` (documented: ``code`` is the HTTP status or 500 for a
      failed task, per-class ``type``), ``"string"`` (observed: string codes, ``type``
      ``apimart_error``, ``param: ""``), ``"plain"`` (``error`` is a bare string).
      Applies to HTTP error bodies and failed tasks; the 401 bodies always have their
      observed shapes, and ``get_channel_failed`` / ``idempotency_key_reused`` are
      always string codes.
    - *processing_status*: ``"processing"`` or ``"in_progress"`` (gpt-image-2 spelling).
    - *include_cost* / *include_expires_at*: drop ``cost``/``credits_cost`` or a result's
      ``expires_at``, as older real responses did.
    - *unlimited_balance*: how a balance read describes an unlimited key: ``"both"``
      (``remain_balance: -1`` and ``unlimited_quota: true``, the default),
      ``"minus_one"`` (only ``remain_balance: -1``) or ``"flag"`` (only
      ``unlimited_quota: true``, with ``remain_balance: 0``), so a client can be
      tested on each half of the rule.
    """

    submit_shape: SubmitShape = "auto"
    url_shape: UrlShape = "list"
    error_code: ErrorCodeShape = "int"
    processing_status: Literal["processing", "in_progress"] = "processing"
    include_cost: bool = True
    include_expires_at: bool = True
    unlimited_balance: UnlimitedShape = "both"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("submit_shape", get_args(SubmitShape)),
            ("url_shape", get_args(UrlShape)),
            ("error_code", get_args(ErrorCodeShape)),
            ("processing_status", ("processing", "in_progress")),
            ("unlimited_balance", get_args(UnlimitedShape)),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Variants.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )

    @classmethod
    def all(cls) -> list[Variants]:
        """Every combination of fixed submit shape, URL shape and error code (36
        variants), for parametrising a client test over everything the service has sent
        for an asynchronous task (the synchronous ``"result"`` shape changes the task's
        timeline, so it is not among them)."""
        submit: tuple[SubmitShape, ...] = ("list", "object", "top_level", "versioned")
        urls: tuple[UrlShape, ...] = get_args(UrlShape)
        codes: tuple[ErrorCodeShape, ...] = get_args(ErrorCodeShape)
        return [
            cls(submit_shape=s, url_shape=u, error_code=e)
            for s, u, e in itertools.product(submit, urls, codes)
        ]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Variants:
        """Build from JSON-like data; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Variants fields: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True, slots=True)
class Webhooks:
    """How the fake delivers webhook callbacks (apimart-api.md §6.4).

    A submit whose body has a top-level ``webhook`` (a base URL) gets the task query's
    body (``{"code": 200, "data": {...}}``) POSTed to ``<webhook>/callback`` once the
    task is ``completed`` or ``failed`` (never for other states). As the service
    documents: an attempt without a 2xx answer (a 5xx, a 3xx, no answer within
    *timeout*, a connection error) is retried after each of *retry_delays* in turn
    (three retries, ~10 s/30 s/60 s), a 4xx ends the delivery, and a callback may
    arrive twice. URLs the service refuses (not http(s), a port other than 80/443, an
    APIMart domain, a loopback or private address) are dropped silently.

    - *delay*: service seconds between the terminal state and the first attempt
      (scaled by the fake's time scale, like task durations).
    - *duplicate*: probability that a delivered callback is sent a second time.
    - *drop*: probability that a callback is never sent at all (lost: only a poll
      can find the task's end).
    - *failures*: how many attempts of each callback are lost on the way before one
      reaches the receiver (each counts as an attempt without an answer).
    - *retry_delays*: service seconds before each retry (scaled); its length is the
      number of retries.
    - *timeout*: real seconds an attempt waits for the receiver's answer (not scaled:
      a loaded test machine is slow in real time, not in service time).
    - *callback_first*: hold each submit answer until the first delivery attempt for
      its task is over, so a receiver sees the callback *before* the client learns the
      task id (use it with short tasks; the hold is bounded, and skipped when no
      sender is running or the callback will never be sent).
    """

    delay: float = 0.0
    duplicate: float = 0.0
    drop: float = 0.0
    failures: int = 0
    retry_delays: tuple[float, ...] = (10.0, 30.0, 60.0)
    timeout: float = 10.0
    callback_first: bool = False

    def __post_init__(self) -> None:
        for name in ("duplicate", "drop"):
            p: float = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Webhooks.{name} must be in [0, 1], got {p}")
        if not (self.delay >= 0 and math.isfinite(self.delay)):
            raise ValueError(f"Webhooks.delay must be >= 0 service seconds, got {self.delay}")
        if isinstance(self.failures, bool) or self.failures < 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"Webhooks.failures must be an integer >= 0, got {self.failures}")
        if any(not (d >= 0 and math.isfinite(d)) for d in self.retry_delays):
            raise ValueError(
                f"Webhooks.retry_delays must be >= 0 service seconds, got {self.retry_delays}"
            )
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ValueError(f"Webhooks.timeout must be > 0 seconds, got {self.timeout}")

    @property
    def max_attempts(self) -> int:
        """The first attempt plus one per retry delay."""
        return 1 + len(self.retry_delays)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Webhooks:
        """Build from JSON-like data (lists become tuples); unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown Webhooks fields: {sorted(unknown)}")
        kwargs: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v  # pyright: ignore[reportUnknownArgumentType]
            for k, v in data.items()
        }
        return cls(**kwargs)


class ManualClock:
    """A clock that only moves when told to, for deterministic task-state tests.

    Pass it as ``FakeApimart(clock=clock)``; task phases then depend on
    ``clock.advance(...)`` alone. Request latency and stalls still sleep in real time.
    """

    __slots__ = ("_now",)

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the clock forward by *seconds* (real seconds, not service seconds)."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds
