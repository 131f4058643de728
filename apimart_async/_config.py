"""Every default in one place, normalised into small frozen value objects.

``None`` means "off" wherever a limit or deadline can be disabled; leaving an argument
out means "the client's default".
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import httpx

from ._exceptions import MissingAPIKeyError

__all__ = [
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_UPLOAD_TIMEOUT",
    "DEFAULT_WAIT_TIMEOUT",
    "MAX_DOWNLOAD_BYTES",
    "MAX_RESPONSE_BYTES",
    "MAX_UPLOAD_BYTES",
    "RESPONSE_VERSION",
    "RESULT_URL_TTL",
    "SUBMIT_SHIELD",
    "UPLOAD_REUSE_MARGIN",
    "UPLOAD_URL_TTL",
    "USER_AGENT_PREFIX",
    "Limits",
    "PollPolicy",
    "RetryPolicy",
    "proxy_from_env",
    "resolve_api_key",
    "resolve_base_url",
    "resolve_timeout",
]

DEFAULT_BASE_URL = "https://api.apimart.ai"
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
ENV_API_KEY = "APIMART_API_KEY"
ENV_BASE_URL = "APIMART_BASE_URL"

# Per HTTP request. Reads get a generous budget because an overloaded gateway can
# take tens of seconds to answer a submit; a stalled socket still trips it.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# An upload of 20 MB over a slow uplink needs more than a JSON call.
DEFAULT_UPLOAD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
DEFAULT_MAX_RETRIES = 4
# Whole-pipeline deadline of ``wait``/``generate`` when the caller gives none. The
# service's own examples give up after 300 s; 4K images can take longer.
DEFAULT_WAIT_TIMEOUT = 900.0

# The most JSON we read from the API before calling the body hostile.
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# Result images are a few MB; 64 MB is far beyond any real one.
MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
MAX_UPLOAD_BYTES = 20 * 1024 * 1024

UPLOAD_URL_TTL = 72 * 3600.0
RESULT_URL_TTL = 24 * 3600.0
# Reuse a cached upload URL only while it has at least this long to live, so a task
# submitted with it can still fetch it.
UPLOAD_REUSE_MARGIN = 6 * 3600.0

# How long a submit may keep running after its caller was cancelled (or the client
# closed): once bytes may be on the wire we stay to hear the answer, so the task id is
# known, not lost. A submit nobody cancels has its full request timeout.
SUBMIT_SHIELD = 30.0

# Pins the response structure where the service honours it (apimart-api.md §1).
RESPONSE_VERSION = "2026-07-27"
USER_AGENT_PREFIX = "apimart-async"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How idempotent calls (uploads, task queries, downloads) are retried.

    Backoff is exponential with jitter (``wait_initial * 2**n + U(0, wait_jitter)``,
    capped at *wait_max*). A server's ``Retry-After`` replaces the computed wait, capped
    at *retry_after_max*; a wait that would pass the caller's deadline is not taken.
    *attempts* counts the first try. *timeout* bounds the total time spent retrying
    one call (``None``: only the caller's deadline bounds it).
    """

    attempts: int = DEFAULT_MAX_RETRIES + 1
    wait_initial: float = 0.5
    wait_max: float = 20.0
    wait_jitter: float = 1.0
    timeout: float | None = 120.0
    retry_after_max: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """The adaptive schedule ``wait`` polls on, in seconds of the service's clock.

    First poll: *first_fraction* of the task's ``estimated_time`` (or *first_default*
    when the service gives none), clamped to [*first_min*, *first_max*]. Once the task
    reports progress, the next poll aims just after the completion time that progress
    implies (plus *eta_margin* of the elapsed time); without progress the interval grows
    by *backoff* per poll with ±*jitter*, up to *max_interval*.

    With webhooks the service pushes the result, and polling is only a safety net for
    a callback that never comes: the first query is at *push_safety_factor* times the
    task's ``estimated_time`` (or *push_expected_time*), at least *push_safety_min*,
    then every *push_safety_interval*. Every interval is multiplied by *time_scale*,
    so a test or benchmark can run the same schedule 1,000x faster against a fake
    whose clock is scaled the same way.
    """

    first_fraction: float = 0.2
    first_default: float = 3.0
    first_min: float = 1.0
    first_max: float = 15.0
    backoff: float = 1.6
    max_interval: float = 15.0
    min_interval: float = 0.5
    eta_margin: float = 0.04
    jitter: float = 0.1
    push_safety_factor: float = 3.0
    push_safety_min: float = 30.0
    push_safety_interval: float = 120.0
    push_expected_time: float = 60.0
    time_scale: float = 1.0

    def scaled(self, time_scale: float) -> PollPolicy:
        """A copy whose intervals are *time_scale* times as long (0.001: 1,000x faster)."""
        return dataclasses.replace(self, time_scale=time_scale)


@dataclass(frozen=True, slots=True)
class Limits:
    """Client-wide concurrency limits; they hold across every call on one client.

    *uploads*, *submits* and *downloads* bound requests in flight per stage. *poll_rate*
    is a budget of task queries per second shared by everything waiting on this client
    (*poll_burst* may be spent at once), so 10,000 waiting tasks cost the same request
    rate as 100. *max_connections* defaults to the sum of the stage limits plus a small
    headroom, so the limiters, not ``PoolTimeout``, provide backpressure.
    """

    uploads: int = 16
    submits: int = 32
    downloads: int = 16
    poll_rate: float = 50.0
    poll_burst: int = 50
    polls_in_flight: int = 32
    max_connections: int | None = None

    def __post_init__(self) -> None:
        for name in ("uploads", "submits", "downloads", "poll_burst", "polls_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1, got {getattr(self, name)}")
        if self.poll_rate <= 0:
            raise ValueError(f"Limits.poll_rate must be > 0, got {self.poll_rate}")

    @property
    def connections(self) -> int:
        """The connection pool size these limits need."""
        if self.max_connections is not None:
            return self.max_connections
        return self.uploads + self.submits + self.downloads + self.polls_in_flight + 4


def env(name: str) -> str | None:
    """An environment variable, with empty meaning unset."""
    value = os.environ.get(name, "").strip()
    return value or None


def resolve_api_key(api_key: str | None) -> str:
    """The key given, else ``APIMART_API_KEY``; ``MissingAPIKeyError`` if neither.

    Surrounding whitespace is dropped (a key read from a file keeps its newline); a key
    with anything else than visible ASCII inside is refused, without echoing it: an
    HTTP library would otherwise put it in its own error message.
    """
    key = (api_key if isinstance(api_key, str) else None) or env(ENV_API_KEY)
    if api_key is not None and not isinstance(api_key, str):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"api_key must be a string, not {type(api_key).__name__}")
    key = key.strip() if key else key
    if not key:
        raise MissingAPIKeyError(
            "no API key: pass api_key=... or set the APIMART_API_KEY environment variable"
        )
    if not _VISIBLE_ASCII.fullmatch(key):
        raise ValueError(
            f"the API key ({len(key)} characters) contains spaces, control or non-ASCII "
            "characters; check how it was copied (it is not shown here)"
        )
    return key


def resolve_base_url(base_url: str | httpx.URL | None) -> httpx.URL:
    """The base URL given, else ``APIMART_BASE_URL``, else the service's; checked."""
    base = httpx.URL(str(base_url or env(ENV_BASE_URL) or DEFAULT_BASE_URL))
    if base.scheme not in ("http", "https") or not base.host:
        raise ValueError(f"base_url must be an absolute http(s) URL, got {str(base)!r}")
    return base


def resolve_timeout(timeout: float | httpx.Timeout) -> httpx.Timeout:
    """A per-request timeout as httpx expresses it."""
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


def proxy_from_env() -> bool:
    """Whether the environment configures an HTTP proxy (httpx then builds its own pool)."""
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(env(n) or env(n.lower()) for n in names)
