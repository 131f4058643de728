"""Which failures deserve another attempt, and how the attempts are made (stamina).

Two kinds of call are retried, with different rules:

* safe calls (uploads, task queries, downloads): connection failures, 408, 429, 5xx,
  ``get_channel_failed`` and bodies we could not parse;
* paid submits: only what provably created nothing (a connection never made, 429, 503,
  ``get_channel_failed``, ``409 idempotency_in_progress``), unless the caller opted in
  to resending ambiguous ones under the same ``Idempotency-Key``.

``Retrier`` runs a call's first attempt bare: almost every call succeeds at once, and
stamina's machinery costs about 40 µs per call, more than parsing the answer. At the
first retryable failure, the remaining attempts are stamina's (its attempt and time
limits, its testing mode, its instrumentation). One backoff rule serves both: jittered
exponential, or the server's ``Retry-After`` (capped), and never a wait that would
pass the caller's deadline (the error is raised at once instead). Each retry is logged
at INFO on ``apimart_async.retry`` with the call, the attempt, the wait, the reason and
the service's request id; stamina's own bare ``stamina.retry_scheduled`` line is
filtered out for our calls only.
"""

from __future__ import annotations

import contextvars
import logging
import random
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    RateLimitError,
)
from ._parsing import parse_retry_after

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ._config import RetryPolicy
    from ._telemetry import Telemetry

__all__ = [
    "Retrier",
    "current_attempt",
    "is_ambiguous",
    "is_provably_not_acted",
    "is_transient",
    "submit_retryable",
]

logger = logging.getLogger("apimart_async.retry")

T = TypeVar("T")

# How many attempts of the call under way came before this one (0 on the first).
_RESENDS: contextvars.ContextVar[int] = contextvars.ContextVar("apimart_resends", default=0)


def current_attempt() -> int:
    """How many earlier attempts the request being sent now repeats (0: the first)."""
    return _RESENDS.get()


def is_transient(exc: Exception) -> bool:
    """Whether repeating a safe call could succeed."""
    if isinstance(exc, APIConnectionError):
        return exc.retryable
    if isinstance(exc, APIResponseValidationError):
        return True
    if isinstance(exc, APIStatusError):
        # get_channel_failed ("no upstream channel, try later") also comes as a 400.
        return (
            exc.status_code in (408, 429)
            or exc.status_code >= 500
            or exc.code == "get_channel_failed"
        )
    return False


def is_provably_not_acted(exc: Exception) -> bool:
    """Whether a failed submit certainly created no task, so resending is free."""
    if isinstance(exc, APIConnectionError):
        return not exc.sent and exc.retryable
    if isinstance(exc, APIStatusError):
        if exc.code == "get_channel_failed" or exc.status_code in (429, 503):
            return True
        # The idempotency layer says the original is still running: ask again later.
        return exc.status_code == 409 and exc.code == "idempotency_in_progress"
    return False


def is_ambiguous(exc: Exception) -> bool:
    """Whether a failed submit may have created a task we know nothing about."""
    if is_provably_not_acted(exc):
        return False
    if isinstance(exc, APIConnectionError):
        return exc.sent
    if isinstance(exc, APIResponseValidationError):
        return True
    if isinstance(exc, APIStatusError):
        if exc.code == "idempotency_result_indeterminate":
            return True
        return exc.status_code in (500, 502, 504) or exc.status_code > 504
    return False


def submit_retryable(*, retry_uncertain: bool) -> Callable[[Exception], bool]:
    """What a paid submit may retry: provably harmless failures, and with
    *retry_uncertain* (the caller's opt-in, safe only where the service honours
    ``Idempotency-Key``) ambiguous ones too, always with the same key and body."""
    if retry_uncertain:
        return lambda exc: is_provably_not_acted(exc) or is_ambiguous(exc)
    return is_provably_not_acted


def _honours_retry_after(exc: Exception) -> bool:
    # A 400 (get_channel_failed) or 408 hint is not a rate hint; 409, 429 and 5xx are.
    return isinstance(exc, APIStatusError) and exc.status_code not in (400, 408)


class Retrier:
    """Calls ``fn(*args)``, retrying the failures *retryable* accepts.

    *what* names the call in log records ("task query", "submit", ...).
    """

    __slots__ = ("_policy", "_random", "_retryable", "telemetry", "what")

    @property
    def attempts(self) -> int:
        """Attempts in all, the first included."""
        return self._policy.attempts

    def __init__(
        self,
        policy: RetryPolicy,
        retryable: Callable[[Exception], bool],
        what: str,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._policy = policy
        self._retryable = retryable
        self._random = random.Random()
        self.what = what
        self.telemetry = telemetry

    async def __call__(
        self, fn: Callable[..., Awaitable[T]], /, *args: Any, subject: str | None = None
    ) -> T:
        """``fn(*args)``, retried; *subject* names what it concerns in the log (a task)."""
        try:
            return await fn(*args)
        except Exception as exc:
            if not self._retryable(exc) or self._policy.attempts < 2:
                raise
            import stamina  # imported at the first retry: most processes never need it

            if not stamina.is_active():
                raise
            attempts = _Attempts(self, subject)
            first_wait = attempts.wait_after(exc)
            if first_wait is None:
                raise
        try:
            # stamina's test mode skips its own waits; ours follows it.
            await anyio.sleep(0 if stamina.is_testing() else first_wait)
            policy = self._policy
            # Decorated per failing call (rare): stamina then knows it by our function's
            # name, which is how its log filter below tells our retries from others'.
            _quiet_stamina_for_us()
            retrying = stamina.retry(
                on=attempts.hook,
                attempts=policy.attempts - 1,
                timeout=policy.timeout,
                wait_initial=policy.wait_initial,
                wait_max=policy.wait_max,
                wait_jitter=policy.wait_jitter,
            )(fn)
            return await retrying(*args)
        finally:
            _RESENDS.set(0)

    def backoff(self, failures: int, exc: Exception) -> float:
        """The wait after the *failures*-th failure: ``Retry-After``, or exponential."""
        policy = self._policy
        if _honours_retry_after(exc):
            hint = exc.retry_after if isinstance(exc, RateLimitError) else None
            if hint is None and isinstance(exc, APIStatusError):
                hint = parse_retry_after(exc.headers.get("retry-after"))
            if hint is not None:
                return min(float(hint), policy.retry_after_max)
        jitter = self._random.uniform(0, policy.wait_jitter) if policy.wait_jitter else 0.0
        try:
            wait = policy.wait_initial * 2.0 ** (failures - 1) + jitter
        except OverflowError:
            return policy.wait_max
        return min(policy.wait_max, wait)


class _Attempts:
    """One call's retry state, created at its first retryable failure."""

    __slots__ = ("_failures", "_retrier", "_subject")

    def __init__(self, retrier: Retrier, subject: str | None) -> None:
        self._retrier = retrier
        self._subject = subject
        self._failures = 0

    def wait_after(self, exc: Exception) -> float | None:
        """The wait before the next attempt, or None if there is none to make (the
        attempts are spent, or the wait would pass the caller's deadline)."""
        self._failures += 1
        retrier = self._retrier
        if self._failures >= retrier.attempts:
            return None  # stamina asks even after the last attempt: no retry to log
        wait = retrier.backoff(self._failures, exc)
        # Sleeping past the caller's deadline would only turn a clear error into a timeout.
        if wait >= anyio.current_effective_deadline() - anyio.current_time():
            return None
        _log_retry(retrier, self._subject, self._failures + 1, wait, exc)
        if retrier.telemetry is not None:
            retrier.telemetry.retry(retrier.what, self._failures + 1, wait, exc)
        _RESENDS.set(self._failures)
        return wait

    def hook(self, exc: Exception) -> bool | float:
        """stamina's backoff hook: False to stop, else the wait."""
        if not self._retrier._retryable(exc):  # pyright: ignore[reportPrivateUsage]
            return False
        wait = self.wait_after(exc)
        return False if wait is None else wait


def _log_retry(
    retrier: Retrier, subject: str | None, attempt: int, wait: float, exc: Exception
) -> None:
    if not logger.isEnabledFor(logging.INFO):
        return
    request_id: str | None = getattr(exc, "request_id", None)
    reason = _reason(exc)
    logger.info(
        "retrying %s%s, attempt %d of %d in %.2fs: %s%s",
        retrier.what,
        f" of {subject}" if subject else "",
        attempt,
        retrier.attempts,
        wait,
        reason,
        # The service puts the request id in its message; name it once.
        f" (request id {request_id})" if request_id and request_id not in reason else "",
        extra={
            "apimart.call": retrier.what,
            "apimart.subject": subject,
            "apimart.attempt": attempt,
            "apimart.wait": wait,
            "apimart.request_id": request_id,
        },
    )


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:199] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _NotOurs(logging.Filter):
    """Drops stamina's ``retry_scheduled`` records about our calls; we log our own."""

    def filter(self, record: logging.LogRecord) -> bool:
        name: Any = getattr(record, "stamina.callable", "")
        return not (isinstance(name, str) and name.startswith("apimart_async."))


def _quiet_stamina_for_us() -> None:
    # Idempotent; other users of stamina in the process keep every line they had.
    stamina_logger = logging.getLogger("stamina")
    if not any(isinstance(f, _NotOurs) for f in stamina_logger.filters):
        stamina_logger.addFilter(_NotOurs())
